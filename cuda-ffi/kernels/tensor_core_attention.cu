// Causal self-attention on bf16 tensor cores (`--precision bf16`): the FlashAttention-2 scheme
// of fused_attention.cu, with every product a warp's mma.sync of 16 × 8 × 16 bf16 tiles and f32
// accumulation. q, k, v are read in bf16, c_attn's rows (B, T, 3C) rounded (what the backward
// keeps of them); dy is read as f32 and rounded as it enters shared memory; y and the gradients
// are written as f32, and y rounded to bf16 too where asked (what c_proj reads). The softmax,
// its running statistics and log-sum-exp are f32. The log-sum-exp saved per query row has the f32
// kernels' meaning (base 2, of s·scale·log2 e), so both backward passes read one format.
//
// A block of 4 warps works on 64 rows (queries, or keys in the key-side backward); warp w owns
// rows 16w .. 16w + 15 of them. Three kernels:
//   forward        block per query tile:  S = Q Kᵀ, online softmax, O += P V
//   backward_kv    block per key tile:    Sᵀ = K Qᵀ, Pᵀ, dV += Pᵀ dY, dPᵀ = V dYᵀ, dSᵀ, dK += dSᵀ Q
//   backward_q     block per query tile:  S, P, dP = dY Vᵀ, dS, dQ += dS K
// dQ has its own kernel (recomputing S and dP) so that every gradient element is written by one
// block, in a fixed order: no atomics, the same bits on every run.
//
// A warp product Out (16 × 8·N) += X (16 × K) · Yᵀ, with X and Y row-major bf16 tiles in shared
// memory (Out[i][j] = Σ_k X[i][k] Y[j][k]), is mma's "row.col" form. Its fragments, for lane
// = 4g + t: X rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9; Y row g, the same columns;
// Out rows g, g + 8, columns 2t, 2t + 1 of each 8-column tile. An Out in registers is, packed to
// bf16, already the X fragment of a next product over its columns (P V, Pᵀ dY, dSᵀ Q, dS K);
// there the second operand is a row-major tile over the summed index (V's rows are keys), whose
// fragments `ldmatrix.trans` reads transposed, so no tile is ever stored transposed.
// Tiles are padded by 8 elements a row, so the 8 rows × 4 words of a fragment load hit 32
// distinct banks, and every row starts on 16 bytes, as ldmatrix needs.

#define LOG2E 1.4426950408889634f
#define TC_TILE 64
#define TC_THREADS 128
#define TC_PAD 8

typedef unsigned short bf16_t;

template <int WIDTH>
struct Row {
    static constexpr int stride = WIDTH + TC_PAD;
};

// Two floats rounded to bf16 (to nearest, ties to even: bf16_bits's rounding of every number;
// a NaN becomes the canonical NaN) in one instruction, `lo` in the low half.
__device__ unsigned int pack_bf16(float lo, float hi) {
    unsigned int packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// 2^x in one instruction; 2^−∞ = 0, and results below f32's normal range flush to 0 (weights
// that small add nothing to a sum of at least 1).
__device__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ void mma_bf16(float d[4], const unsigned int a[4], unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 × 8 bf16 matrices from shared memory, lane l naming row l % 8 of matrix l / 8; lane
// 4g + t receives row g, elements 2t and 2t + 1, of each (transposed: column g, rows 2t, 2t + 1).
template <bool TRANSPOSED>
__device__ void load_matrices(unsigned int r[4], const bf16_t* row) {
    unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    if (TRANSPOSED)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
}

// out[j] (16 × 8 tiles j < N, N even) += X rows (x_row .. x_row + 15) · Y rows (8j ..)ᵀ over K
// columns; X, Y row-major with row strides XS, YS. One ldmatrix brings X's fragment for 16
// columns (its matrices: rows 0–7 and 8–15 at column k, then at k + 8: lane l names row l % 16,
// column k + 8·(l / 16)); one more brings Y's for two output tiles (rows 8j.. at k and k + 8,
// then rows 8j + 8.. at k and k + 8).
template <int N, int K, int XS, int YS>
__device__ void warp_product(float out[N][4], const bf16_t* x, int x_row, const bf16_t* y) {
    int lane = threadIdx.x % 32;
    const bf16_t* x_lane = x + (x_row + lane % 16) * XS + 8 * (lane / 16);
    const bf16_t* y_lane = y + (lane % 8 + 8 * (lane / 16)) * YS + 8 * (lane / 8 % 2);
#pragma unroll
    for (int k = 0; k < K; k += 16) {
        unsigned int a[4];
        load_matrices<false>(a, x_lane + k);
#pragma unroll
        for (int j = 0; j < N; j += 2) {
            unsigned int b[4];
            load_matrices<false>(b, y_lane + 8 * j * YS + k);
            mma_bf16(out[j], a, b[0], b[1]);
            mma_bf16(out[j + 1], a, b[2], b[3]);
        }
    }
}

// out[j] (16 × 8 tiles j < N, N even) += P · Y[.., 8j .. 8j + 7], P (16 × 64) in registers as
// the Out of an earlier product (8 tiles), rounded to bf16 here; Y (64, ·) row-major with row
// stride YS. Y's fragment (rows 2t, 2t + 1 and 2t + 8, 2t + 9 of column g) for two output tiles
// comes from one transposing ldmatrix: lane l names row 16k + l % 16 at column 8j + 8·(l / 16).
template <int N, int YS>
__device__ void warp_product_from_registers(float out[N][4], const float p[8][4], const bf16_t* y) {
    int lane = threadIdx.x % 32;
    const bf16_t* y_lane = y + (lane % 16) * YS + 8 * (lane / 16);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        unsigned int a[4] = {pack_bf16(p[2 * k][0], p[2 * k][1]), pack_bf16(p[2 * k][2], p[2 * k][3]),
                             pack_bf16(p[2 * k + 1][0], p[2 * k + 1][1]), pack_bf16(p[2 * k + 1][2], p[2 * k + 1][3])};
#pragma unroll
        for (int j = 0; j < N; j += 2) {
            unsigned int b[4];
            load_matrices<true>(b, y_lane + 16 * k * YS + 8 * j);
            mma_bf16(out[j], a, b[0], b[1]);
            mma_bf16(out[j + 1], a, b[2], b[3]);
        }
    }
}

// The causal mask on a diagonal tile (the first row and the first column have the same
// position): a warp's 16 × 64 tile, rows 16·warp + g and + 8, columns 8j + 2t and + 1, set to
// `masked` where the column's position is after the row's (KEEP_COLUMNS_BEFORE: keys after
// their query) or before it (else: queries before their key, in the transposed tiles).
template <bool KEEP_COLUMNS_BEFORE>
__device__ void mask_diagonal_tile(float s[8][4], float masked) {
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int row = 16 * warp + g + 8 * (e / 2), column = 8 * j + 2 * t + e % 2;
            if (KEEP_COLUMNS_BEFORE ? column > row : column < row) s[j][e] = masked;
        }
}

// Four neighbouring elements as four bf16s, two to a word: f32s rounded, or bf16s as they are.
__device__ uint2 quad_as_bf16(const float* p) {
    float4 v = *reinterpret_cast<const float4*>(p);
    return make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
}
__device__ uint2 quad_as_bf16(const bf16_t* p) {
    return *reinterpret_cast<const uint2*>(p);
}

// Rows first .. first + 63 of one head's (T, HS) matrix of f32s or bf16s (rows `ld` elements
// apart) in bf16 into `tile` (64, HS); rows past `seq` are 0.
template <int HS, typename E>
__device__ void load_bf16(bf16_t* tile, const E* source, long ld, int first, int seq) {
    constexpr int per_row = HS / 4;
    for (int i = threadIdx.x; i < TC_TILE * per_row; i += TC_THREADS) {
        int row = i / per_row, col = (i - row * per_row) * 4;
        uint2 quad = make_uint2(0u, 0u);
        if (first + row < seq) quad = quad_as_bf16(source + (long)(first + row) * ld + col);
        *reinterpret_cast<uint2*>(tile + row * Row<HS>::stride + col) = quad;
    }
}

// cp.async: `bytes` (4, 8 or 16) from global to shared memory without passing through
// registers; zeros instead when `inside` is false (the source is then not read).
template <int BYTES>
__device__ void copy_async(void* shared, const void* global, bool inside) {
    unsigned int address = (unsigned int)__cvta_generic_to_shared(shared);
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(inside ? 16 : 0));
    else if (BYTES == 8)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(address), "l"(global), "r"(inside ? 8 : 0));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(address), "l"(global), "r"(inside ? 4 : 0));
}

// Waits for this thread's copies in flight (none: returns at once); a barrier after it makes
// every thread's visible.
__device__ void copies_wait() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// The next two (64, HS) tiles a kernel works on (k and v, or q and dy), in bf16 from rows of A
// and of B (bf16 or f32) `lda` and `ldb` elements apart, rows past `seq` 0; and, for the
// key-side backward, the next 64 values of two per-query vectors (lse and the row dots). Up to
// head size TC_STAGED_HEAD_SIZE_MAX, `fetch` starts copying them as they are into staging in
// shared memory (cp.async), so that they arrive while the block works on the present tiles, and
// `take`, after copies_wait and a barrier, puts them in place in bf16; above it the staging
// would take more shared memory than a block can spare, so `take` loads them itself.
template <int HS, typename A, typename B>
struct NextTiles {
    static constexpr bool ahead = HS <= TC_STAGED_HEAD_SIZE_MAX;
    static constexpr int per_row = HS / 4;
    unsigned char* staging;  // (64, HS) of A, (64, HS) of B, then 2 × 64 per-query floats
    const A* a;
    const B* b;
    const float *row_a, *row_b;
    long lda, ldb;
    int first, seq;

    __device__ A* staged_a() const { return reinterpret_cast<A*>(staging); }
    __device__ B* staged_b() const { return reinterpret_cast<B*>(staging + TC_TILE * HS * sizeof(A)); }
    __device__ float* staged_rows() const { return reinterpret_cast<float*>(staging + TC_TILE * HS * (sizeof(A) + sizeof(B))); }

    __device__ void fetch(const A* a_, long lda_, const B* b_, long ldb_, const float* row_a_, const float* row_b_, int first_, int seq_) {
        a = a_, b = b_, row_a = row_a_, row_b = row_b_, lda = lda_, ldb = ldb_, first = first_, seq = seq_;
        if (!ahead) return;
        for (int i = threadIdx.x; i < TC_TILE * per_row; i += TC_THREADS) {
            int row = i / per_row, col = (i - row * per_row) * 4;
            bool inside = first + row < seq;
            long at = inside ? (long)(first + row) : 0;
            copy_async<4 * sizeof(A)>(staged_a() + row * HS + col, a + at * lda + col, inside);
            copy_async<4 * sizeof(B)>(staged_b() + row * HS + col, b + at * ldb + col, inside);
        }
        if (row_a != nullptr && threadIdx.x < TC_TILE) {
            bool inside = first + threadIdx.x < seq;
            long at = inside ? first + threadIdx.x : 0;
            copy_async<4>(staged_rows() + threadIdx.x, row_a + at, inside);
            copy_async<4>(staged_rows() + TC_TILE + threadIdx.x, row_b + at, inside);
        }
    }

    __device__ void take(bf16_t* tile_a, bf16_t* tile_b, float* values_a, float* values_b) const {
        if (ahead) {
            for (int i = threadIdx.x; i < TC_TILE * per_row; i += TC_THREADS) {
                int row = i / per_row, col = (i - row * per_row) * 4;
                *reinterpret_cast<uint2*>(tile_a + row * Row<HS>::stride + col) = quad_as_bf16(staged_a() + row * HS + col);
                *reinterpret_cast<uint2*>(tile_b + row * Row<HS>::stride + col) = quad_as_bf16(staged_b() + row * HS + col);
            }
        } else {
            load_bf16<HS>(tile_a, a, lda, first, seq);
            load_bf16<HS>(tile_b, b, ldb, first, seq);
        }
        if (row_a != nullptr && threadIdx.x < TC_TILE) {
            bool inside = first + threadIdx.x < seq;
            values_a[threadIdx.x] = ahead ? staged_rows()[threadIdx.x] : inside ? row_a[first + threadIdx.x] : 0.0f;
            values_b[threadIdx.x] = ahead ? staged_rows()[TC_TILE + threadIdx.x] : inside ? row_b[first + threadIdx.x] : 0.0f;
        }
    }
};

// Two neighbouring results, as f32s or rounded to bf16 (one 4-byte word)
__device__ void store_pair(float* target, float a, float b) {
    *reinterpret_cast<float2*>(target) = make_float2(a, b);
}
__device__ void store_pair(bf16_t* target, float a, float b) {
    *reinterpret_cast<unsigned int*>(target) = pack_bf16(a, b);
}

// Writes a warp's 16 rows × HS of f32 results (HS/8 tiles of Out fragments), times `factor`, as
// f32s or rounded to bf16, to rows first + row0 + … of a (T, ·) matrix `ld` elements apart; rows
// past `seq` are skipped.
template <int HS, typename E>
__device__ void store_rows(E* target, long ld, int first, int seq, const float acc[HS / 8][4], float factor) {
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = first + 16 * warp + g + 8 * half;
        if (row >= seq) continue;
#pragma unroll
        for (int j = 0; j < HS / 8; j++)
            store_pair(target + (long)row * ld + 8 * j + 2 * t, acc[j][2 * half] * factor, acc[j][2 * half + 1] * factor);
    }
}

// The head of block (x, bh): C, the row stride of qkv (3C), and where the head's columns start
// in rows (B, T, 3C) (its q; k is C further, v 2C) and in rows (B, T, C) (y, dy).
struct HeadColumns {
    int c;
    long ld, in_qkv, in_rows;
};

template <int HS>
__device__ HeadColumns head_columns(int seq, int n_head) {
    int bh = blockIdx.y, b = bh / n_head, h = bh - b * n_head, c = n_head * HS;
    return HeadColumns{c, 3L * c, (long)b * seq * 3 * c + h * HS, (long)b * seq * c + h * HS};
}

// Grid (⌈T/64⌉, B·H): block (x, bh) computes query tile ⌈T/64⌉ − 1 − x of head bh.
template <int HS>
__device__ void tc_attention_forward(const bf16_t* qkv, float* y, bf16_t* y_rounded, float* lse, int seq, int n_head, float scale) {
    constexpr int S = Row<HS>::stride, NT = HS / 8;
    extern __shared__ float4 shared4[];
    bf16_t* q_tile = reinterpret_cast<bf16_t*>(shared4);
    bf16_t* k_tile = q_tile + TC_TILE * S;
    bf16_t* v_tile = k_tile + TC_TILE * S;
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    int query_tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
    HeadColumns head = head_columns<HS>(seq, n_head);
    int c = head.c;
    long ld = head.ld;
    const bf16_t* q = qkv + head.in_qkv;
    int first_query = query_tile * TC_TILE;
    load_bf16<HS>(q_tile, q, ld, first_query, seq);
    float o[NT][4] = {}, running_max[2] = {NEG_INF, NEG_INF}, running_sum[2] = {0.0f, 0.0f};
    float score_scale = scale * LOG2E;
    NextTiles<HS, bf16_t, bf16_t> next{reinterpret_cast<unsigned char*>(v_tile + TC_TILE * S)};
    next.fetch(q + c, ld, q + 2 * c, ld, nullptr, nullptr, 0, seq);
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        copies_wait();
        __syncthreads();  // the next tiles have arrived, and the previous ones are read
        next.take(k_tile, v_tile, nullptr, nullptr);
        __syncthreads();
        if (key_tile < query_tile) next.fetch(q + c, ld, q + 2 * c, ld, nullptr, nullptr, (key_tile + 1) * TC_TILE, seq);
        float s[8][4] = {};
        warp_product<8, HS, S, S>(s, q_tile, 16 * warp, k_tile);
        if (key_tile == query_tile) mask_diagonal_tile<true>(s, NEG_INF);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float tile_max = NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; j++) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
            // the scale is positive, so the largest scaled score is the largest score scaled
            tile_max = warp_max(tile_max, 4) * score_scale;
            float new_max = fmaxf(running_max[half], tile_max);
            float base = new_max == NEG_INF ? 0.0f : new_max;
            float correction = fast_exp2(running_max[half] - base);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float p = fast_exp2(fmaf(s[j][2 * half + e], score_scale, -base));
                    s[j][2 * half + e] = p;
                    sum += p;
                }
            running_sum[half] = running_sum[half] * correction + warp_sum(sum, 4);
            running_max[half] = new_max;
#pragma unroll
            for (int j = 0; j < NT; j++) o[j][2 * half] *= correction, o[j][2 * half + 1] *= correction;
        }
        warp_product_from_registers<NT, S>(o, s, v_tile);
    }
    float inverse[2] = {1.0f / running_sum[0], 1.0f / running_sum[1]};
#pragma unroll
    for (int j = 0; j < NT; j++) o[j][0] *= inverse[0], o[j][1] *= inverse[0], o[j][2] *= inverse[1], o[j][3] *= inverse[1];
    store_rows<HS>(y + head.in_rows, c, first_query, seq, o, 1.0f);
    if (y_rounded != nullptr) store_rows<HS>(y_rounded + head.in_rows, c, first_query, seq, o, 1.0f);
    if (t == 0) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int query = first_query + 16 * warp + g + 8 * half;
            if (query < seq) lse[(long)bh * seq + query] = running_max[half] + log2f(running_sum[half]);
        }
    }
}

// Grid (⌈T/64⌉, B·H): block (x, bh) owns key tile x of head bh and writes its dK and dV whole,
// over the query tiles x .. last. `dot` (B·H, T) holds Σ_d y·dy of each query row.
template <int HS>
__device__ void tc_attention_backward_kv(const bf16_t* qkv, const float* dy, const float* lse, const float* dot, float* dqkv, int seq,
                                         int n_head, float scale) {
    constexpr int S = Row<HS>::stride, NT = HS / 8;
    extern __shared__ float4 shared4[];
    bf16_t* k_tile = reinterpret_cast<bf16_t*>(shared4);
    bf16_t* v_tile = k_tile + TC_TILE * S;
    bf16_t* q_tile = v_tile + TC_TILE * S;
    bf16_t* dy_tile = q_tile + TC_TILE * S;
    float* lse_tile = reinterpret_cast<float*>(dy_tile + TC_TILE * S);
    float* dot_tile = lse_tile + TC_TILE;
    int warp = threadIdx.x / 32, t = threadIdx.x % 4;
    int key_tile = blockIdx.x, bh = blockIdx.y, query_tiles = gridDim.x;
    HeadColumns head = head_columns<HS>(seq, n_head);
    int c = head.c;
    long ld = head.ld;
    const bf16_t* q = qkv + head.in_qkv;
    const float* dy_head = dy + head.in_rows;
    int first_key = key_tile * TC_TILE;
    load_bf16<HS>(k_tile, q + c, ld, first_key, seq);
    load_bf16<HS>(v_tile, q + 2 * c, ld, first_key, seq);
    float dk[NT][4] = {}, dv[NT][4] = {};
    float score_scale = scale * LOG2E;
    NextTiles<HS, bf16_t, float> next{reinterpret_cast<unsigned char*>(dot_tile + TC_TILE)};
    const float *head_lse = lse + (long)bh * seq, *head_dot = dot + (long)bh * seq;
    next.fetch(q, ld, dy_head, c, head_lse, head_dot, first_key, seq);
    for (int query_tile = key_tile; query_tile < query_tiles; query_tile++) {
        copies_wait();
        __syncthreads();  // the next query tile has arrived, and the previous one is read
        next.take(q_tile, dy_tile, lse_tile, dot_tile);
        __syncthreads();
        if (query_tile + 1 < query_tiles) next.fetch(q, ld, dy_head, c, head_lse, head_dot, (query_tile + 1) * TC_TILE, seq);
        // pᵀ (16 keys × 64 queries) = exp2(k qᵀ · scale·log2 e − lse), 0 where the query is before the key
        // (only in the diagonal tile: every other query tile is after the key tile)
        float p[8][4] = {};
        warp_product<8, HS, S, S>(p, k_tile, 16 * warp, q_tile);
        float dp[8][4] = {};
        warp_product<8, HS, S, S>(dp, v_tile, 16 * warp, dy_tile);
        if (query_tile == key_tile) mask_diagonal_tile<false>(p, NEG_INF);
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int query_in_tile = 8 * j + 2 * t + e % 2;
                float weight = fast_exp2(fmaf(p[j][e], score_scale, -lse_tile[query_in_tile]));
                p[j][e] = weight;
                dp[j][e] = weight * (dp[j][e] - dot_tile[query_in_tile]);  // dsᵀ, the gradient of the unscaled scores
            }
        warp_product_from_registers<NT, S>(dv, p, dy_tile);
        warp_product_from_registers<NT, S>(dk, dp, q_tile);
    }
    float* dk_rows = dqkv + head.in_qkv + c;
    store_rows<HS>(dk_rows, ld, first_key, seq, dk, scale);
    store_rows<HS>(dk_rows + c, ld, first_key, seq, dv, 1.0f);
}

// Grid (⌈T/64⌉, B·H): block (x, bh) owns query tile ⌈T/64⌉ − 1 − x of head bh and writes its dQ
// whole, over the key tiles 0 .. its own.
template <int HS>
__device__ void tc_attention_backward_q(const bf16_t* qkv, const float* dy, const float* lse, const float* dot, float* dqkv, int seq,
                                        int n_head, float scale) {
    constexpr int S = Row<HS>::stride, NT = HS / 8;
    extern __shared__ float4 shared4[];
    bf16_t* q_tile = reinterpret_cast<bf16_t*>(shared4);
    bf16_t* dy_tile = q_tile + TC_TILE * S;
    bf16_t* k_tile = dy_tile + TC_TILE * S;
    bf16_t* v_tile = k_tile + TC_TILE * S;
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
    int query_tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
    HeadColumns head = head_columns<HS>(seq, n_head);
    int c = head.c;
    long ld = head.ld;
    const bf16_t* q = qkv + head.in_qkv;
    int first_query = query_tile * TC_TILE;
    load_bf16<HS>(q_tile, q, ld, first_query, seq);
    load_bf16<HS>(dy_tile, dy + head.in_rows, c, first_query, seq);
    float row_lse[2], row_dot[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int query = first_query + 16 * warp + g + 8 * half;
        row_lse[half] = query < seq ? lse[(long)bh * seq + query] : 0.0f;
        row_dot[half] = query < seq ? dot[(long)bh * seq + query] : 0.0f;
    }
    float dq[NT][4] = {};
    float score_scale = scale * LOG2E;
    NextTiles<HS, bf16_t, bf16_t> next{reinterpret_cast<unsigned char*>(v_tile + TC_TILE * S)};
    next.fetch(q + c, ld, q + 2 * c, ld, nullptr, nullptr, 0, seq);
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        copies_wait();
        __syncthreads();  // the next tiles have arrived, and the previous ones are read
        next.take(k_tile, v_tile, nullptr, nullptr);
        __syncthreads();
        if (key_tile < query_tile) next.fetch(q + c, ld, q + 2 * c, ld, nullptr, nullptr, (key_tile + 1) * TC_TILE, seq);
        float p[8][4] = {}, dp[8][4] = {};
        warp_product<8, HS, S, S>(p, q_tile, 16 * warp, k_tile);
        warp_product<8, HS, S, S>(dp, dy_tile, 16 * warp, v_tile);
        if (key_tile == query_tile) mask_diagonal_tile<true>(p, NEG_INF);
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float weight = fast_exp2(fmaf(p[j][e], score_scale, -row_lse[e / 2]));
                dp[j][e] = weight * (dp[j][e] - row_dot[e / 2]);
            }
        warp_product_from_registers<NT, S>(dq, dp, k_tile);
    }
    store_rows<HS>(dqkv + head.in_qkv, ld, first_query, seq, dq, scale);
}

#define TC_ATTENTION(HS)                                                                                                     \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) tc_attention_forward_##HS(const bf16_t* qkv, float* y, bf16_t* y_rounded, float* lse, \
                                                                                      int seq, int n_head, float scale) {     \
        tc_attention_forward<HS>(qkv, y, y_rounded, lse, seq, n_head, scale);                                                           \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                                 \
        tc_attention_backward_kv_##HS(const bf16_t* qkv, const float* dy, const float* lse, const float* dot, float* dqkv,   \
                                      int seq, int n_head, float scale) {                                                    \
        tc_attention_backward_kv<HS>(qkv, dy, lse, dot, dqkv, seq, n_head, scale);                                           \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                                 \
        tc_attention_backward_q_##HS(const bf16_t* qkv, const float* dy, const float* lse, const float* dot, float* dqkv,    \
                                     int seq, int n_head, float scale) {                                                     \
        tc_attention_backward_q<HS>(qkv, dy, lse, dot, dqkv, seq, n_head, scale);                                            \
    }

TC_ATTENTION(16)
TC_ATTENTION(32)
TC_ATTENTION(64)
TC_ATTENTION(128)
