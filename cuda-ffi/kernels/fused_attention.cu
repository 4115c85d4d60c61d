// Causal self-attention in one pass over key tiles (the FlashAttention-2 scheme), in f32.
//
// q, k and v are read where c_attn wrote them, rows (B, T, 3C), and y is written into rows
// (B, T, C): no head-layout copies, and the (T, T) weights never exist. The forward pass keeps
// the running maximum and sum of each query row's scores (the online softmax) and saves the
// row's log-sum-exp; the backward pass recomputes each tile of weights from it
// (docs/math.md, AT1–AT3).
//
// One block of 256 threads, 16 × 16, works on 64 × 64 tiles. Thread (ty, tx) owns queries
// ty·4 + i (i < 4) and keys tx + 16·j (j < 4) of a score tile, or queries (keys) ty·4 + i and
// dimensions tx·DPT + j of an output tile (DPT = HS / 16). Tiles sit in shared memory one row
// per query or key, rows padded by 4 floats: reading four floats along a row (float4) then hits
// distinct banks both for the 16 rows tx + 16·j and for the 16 neighbouring columns.
// Scores are kept in base 2: s·scale·log2(e), so that exp2 does the exponentials.

#define LOG2E 1.4426950408889634f

// Row stride of a (64, width) tile in shared memory.
template <int WIDTH>
struct Padded {
    static constexpr int stride = WIDTH + ATTENTION_TILE_PADDING;
};

// Rows first..first + 64 of one head's (T, HS) matrix, whose rows are `ld` floats apart in
// global memory, into a tile; rows at or past `seq` read as zeros.
template <int HS>
__device__ void load_tile(float* tile, const float* source, long ld, int first, int seq) {
    constexpr int per_row = HS / 4;
    for (int i = threadIdx.x; i < ATTENTION_TILE * per_row; i += ATTENTION_THREADS) {
        int row = i / per_row, col = (i - row * per_row) * 4;
        float4 value = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (first + row < seq) value = *reinterpret_cast<const float4*>(source + (long)(first + row) * ld + col);
        *reinterpret_cast<float4*>(tile + row * Padded<HS>::stride + col) = value;
    }
}

// N consecutive floats of shared memory, in the widest loads their alignment allows.
template <int N>
__device__ void load_run(const float* source, float* out) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            float4 v = *reinterpret_cast<const float4*>(source + j);
            out[j] = v.x, out[j + 1] = v.y, out[j + 2] = v.z, out[j + 3] = v.w;
        }
    } else if constexpr (N == 2) {
        float2 v = *reinterpret_cast<const float2*>(source);
        out[0] = v.x, out[1] = v.y;
    } else {
#pragma unroll
        for (int j = 0; j < N; j++) out[j] = source[j];
    }
}

__device__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

__device__ float lane(float4 v, int e) {
    return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

// acc[i][j] += Σ_d a[row_i][d] · b[col_j][d] over a tile's HS columns: rows ty·4 + i of `a`,
// rows tx + 16·j of `b` (the score-tile layout).
template <int HS>
__device__ void add_row_products(float acc[4][4], const float* a, const float* b, int tx, int ty) {
    constexpr int S = Padded<HS>::stride;
#pragma unroll 4
    for (int d = 0; d < HS; d += 4) {
        float4 x[4], y[4];
#pragma unroll
        for (int i = 0; i < 4; i++) x[i] = *reinterpret_cast<const float4*>(a + (ty * 4 + i) * S + d);
#pragma unroll
        for (int j = 0; j < 4; j++) y[j] = *reinterpret_cast<const float4*>(b + (tx + 16 * j) * S + d);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] += dot4(x[i], y[j]);
    }
}

// Grid (⌈T/64⌉, B·H): block (x, bh) computes query tile ⌈T/64⌉ − 1 − x of head bh (the longest
// rows first). y (B, T, C); lse (B·H, T) the log2-sum-exp2 of each row's base-2 scores.
template <int HS>
__device__ void attention_forward(const float* qkv, float* y, float* lse, int seq, int n_head, float scale) {
    constexpr int S = Padded<HS>::stride, P = Padded<ATTENTION_TILE>::stride, DPT = HS / 16;
    extern __shared__ float4 shared4[];
    float* q_tile = reinterpret_cast<float*>(shared4);
    float* k_tile = q_tile + ATTENTION_TILE * S;
    float* v_tile = k_tile + ATTENTION_TILE * S;
    float* p_tile = v_tile + ATTENTION_TILE * S;  // (64 queries, 64 keys)
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int query_tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
    int b = bh / n_head, h = bh - b * n_head, c = n_head * HS;
    long ld = 3L * c;
    const float* q = qkv + (long)b * seq * ld + h * HS;
    const float* k = q + c;
    const float* v = q + 2 * c;
    int first_query = query_tile * ATTENTION_TILE;
    load_tile<HS>(q_tile, q, ld, first_query, seq);
    float o[4][DPT], running_max[4], running_sum[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        running_max[i] = NEG_INF, running_sum[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPT; j++) o[i][j] = 0.0f;
    }
    float score_scale = scale * LOG2E;
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        __syncthreads();  // the previous tile's k, v and p are read
        load_tile<HS>(k_tile, k, ld, key_tile * ATTENTION_TILE, seq);
        load_tile<HS>(v_tile, v, ld, key_tile * ATTENTION_TILE, seq);
        __syncthreads();
        float s[4][4] = {};
        add_row_products<HS>(s, q_tile, k_tile, tx, ty);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float tile_max = NEG_INF;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                bool masked = key_tile == query_tile && tx + 16 * j > ty * 4 + i;
                s[i][j] = masked ? NEG_INF : s[i][j] * score_scale;
                tile_max = fmaxf(tile_max, s[i][j]);
            }
            // over the 16 threads of the tile row; the diagonal's first key is visible to every
            // row, so new_max is finite
            float new_max = fmaxf(running_max[i], warp_max(tile_max, 16));
            float correction = exp2f(running_max[i] - new_max);
            float tile_sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                s[i][j] = exp2f(s[i][j] - new_max);
                tile_sum += s[i][j];
                p_tile[(ty * 4 + i) * P + tx + 16 * j] = s[i][j];
            }
            running_sum[i] = running_sum[i] * correction + warp_sum(tile_sum, 16);
            running_max[i] = new_max;
#pragma unroll
            for (int j = 0; j < DPT; j++) o[i][j] *= correction;
        }
        __syncthreads();
        // o += p v
#pragma unroll 2
        for (int key = 0; key < ATTENTION_TILE; key += 4) {
            float4 p[4];
            float values[4][DPT];
#pragma unroll
            for (int i = 0; i < 4; i++) p[i] = *reinterpret_cast<const float4*>(p_tile + (ty * 4 + i) * P + key);
#pragma unroll
            for (int e = 0; e < 4; e++) load_run<DPT>(v_tile + (key + e) * S + tx * DPT, values[e]);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int e = 0; e < 4; e++)
#pragma unroll
                    for (int j = 0; j < DPT; j++) o[i][j] += lane(p[i], e) * values[e][j];
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = first_query + ty * 4 + i;
        if (t >= seq) continue;
        float inverse = 1.0f / running_sum[i];
        float* out = y + ((long)b * seq + t) * c + h * HS + tx * DPT;
#pragma unroll
        for (int j = 0; j < DPT; j++) out[j] = o[i][j] * inverse;
        if (tx == 0) lse[(long)bh * seq + t] = running_max[i] + log2f(running_sum[i]);
    }
}

// Grid (⌈T/64⌉, B·H): block (x, bh) owns key tile x of head bh and walks the query tiles that
// see it. Per query tile it recomputes p = exp2(s − lse) and dp = dy vᵀ, forms
// ds = p (dp − dot) with dot = Σ_d y·dy of the query row (AT3), adds pᵀ dy to dv and dsᵀ q to dk in
// registers, and adds ds k to dq in global memory. Other key tiles add to the same rows of dq,
// so the additions take turns, with no float atomics, in an order fixed by the shape: query
// tile i gets key tile i's part first (its diagonal, the first tile that block walks), then key
// tile i − 1's, and so on down to key tile 0. `turns` (B·H, query tiles), zero at the start,
// counts the parts added so far. Every block walks its query tiles in increasing order, so key
// tile x reaches query tile i one step after key tile x + 1 did: in the steady state nobody
// waits. A block takes its key tile from a ticket counter per head (`tickets`, zero at the
// start), highest tile first, so the block it may wait for has always started before it,
// whatever order the hardware starts blocks in. dqkv (B, T, 3C) must hold zeros in its q
// columns; the k and v columns are written whole.
template <int HS>
__device__ void attention_backward(const float* qkv, const float* dy, const float* lse, const float* dot, float* dqkv, int* turns,
                                   int* tickets, int seq, int n_head, float scale) {
    constexpr int S = Padded<HS>::stride, P = Padded<ATTENTION_TILE>::stride, DPT = HS / 16;
    extern __shared__ float4 shared4[];
    float* k_tile = reinterpret_cast<float*>(shared4);
    float* v_tile = k_tile + ATTENTION_TILE * S;
    float* q_tile = v_tile + ATTENTION_TILE * S;
    float* dy_tile = q_tile + ATTENTION_TILE * S;
    float* p_tile = dy_tile + ATTENTION_TILE * S;  // (64 queries, 64 keys)
    float* ds_tile = p_tile + ATTENTION_TILE * P;
    float* lse_tile = ds_tile + ATTENTION_TILE * P;
    float* dot_tile = lse_tile + ATTENTION_TILE;
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    __shared__ int ticket;
    int query_tiles = gridDim.x, bh = blockIdx.y;
    if (threadIdx.x == 0) ticket = atomicAdd(tickets + bh, 1);
    __syncthreads();
    int key_tile = query_tiles - 1 - ticket;
    int b = bh / n_head, h = bh - b * n_head, c = n_head * HS;
    long ld = 3L * c;
    const float* q = qkv + (long)b * seq * ld + h * HS;
    const float* dy_rows = dy + (long)b * seq * c + h * HS;
    float* dq = dqkv + (long)b * seq * ld + h * HS;
    int first_key = key_tile * ATTENTION_TILE;
    load_tile<HS>(k_tile, q + c, ld, first_key, seq);
    load_tile<HS>(v_tile, q + 2 * c, ld, first_key, seq);
    float dk[4][DPT] = {}, dv[4][DPT] = {};
    float score_scale = scale * LOG2E;
    for (int query_tile = key_tile; query_tile < query_tiles; query_tile++) {
        int first_query = query_tile * ATTENTION_TILE;
        __syncthreads();  // the previous query tile is read
        load_tile<HS>(q_tile, q, ld, first_query, seq);
        load_tile<HS>(dy_tile, dy_rows, c, first_query, seq);
        if (threadIdx.x < ATTENTION_TILE) {
            int t = first_query + threadIdx.x;
            // rows past the end get p = 0
            lse_tile[threadIdx.x] = t < seq ? lse[(long)bh * seq + t] : POS_INF;
            dot_tile[threadIdx.x] = t < seq ? dot[(long)bh * seq + t] : 0.0f;
        }
        __syncthreads();
        float s[4][4] = {}, dp[4][4] = {};
        add_row_products<HS>(s, q_tile, k_tile, tx, ty);
        add_row_products<HS>(dp, dy_tile, v_tile, tx, ty);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int query = ty * 4 + i;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int key = tx + 16 * j;
                bool masked = query_tile == key_tile && key > query;
                float p = masked ? 0.0f : exp2f(s[i][j] * score_scale - lse_tile[query]);
                p_tile[query * P + key] = p;
                ds_tile[query * P + key] = p * (dp[i][j] - dot_tile[query]);
            }
        }
        __syncthreads();
        // dv (keys ty·4 + i) += pᵀ dy, dk += dsᵀ q
#pragma unroll 2
        for (int query = 0; query < ATTENTION_TILE; query++) {
            float4 p = *reinterpret_cast<const float4*>(p_tile + query * P + ty * 4);
            float4 ds = *reinterpret_cast<const float4*>(ds_tile + query * P + ty * 4);
            float dy_run[DPT], q_run[DPT];
            load_run<DPT>(dy_tile + query * S + tx * DPT, dy_run);
            load_run<DPT>(q_tile + query * S + tx * DPT, q_run);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < DPT; j++) {
                    dv[i][j] += lane(p, i) * dy_run[j];
                    dk[i][j] += lane(ds, i) * q_run[j];
                }
        }
        // dq (queries ty·4 + i) += ds k
        float dq_tile[4][DPT] = {};
#pragma unroll 2
        for (int key = 0; key < ATTENTION_TILE; key += 4) {
            float4 ds[4];
            float keys[4][DPT];
#pragma unroll
            for (int i = 0; i < 4; i++) ds[i] = *reinterpret_cast<const float4*>(ds_tile + (ty * 4 + i) * P + key);
#pragma unroll
            for (int e = 0; e < 4; e++) load_run<DPT>(k_tile + (key + e) * S + tx * DPT, keys[e]);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int e = 0; e < 4; e++)
#pragma unroll
                    for (int j = 0; j < DPT; j++) dq_tile[i][j] += lane(ds[i], e) * keys[e][j];
        }
        // wait for key tiles query_tile .. key_tile + 1 to have added their parts to this query tile
        int* turn = turns + (long)bh * query_tiles + query_tile;
        if (threadIdx.x == 0) {
            while (atomicAdd(turn, 0) != query_tile - key_tile) {
            }
            __threadfence();
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int t = first_query + ty * 4 + i;
            if (t >= seq) continue;
            float* target = dq + (long)t * ld + tx * DPT;
            // past L1 both ways: the last tile's additions were made by another block
#pragma unroll
            for (int j = 0; j < DPT; j++) __stcg(target + j, __ldcg(target + j) + scale * dq_tile[i][j]);
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicExch(turn, query_tile - key_tile + 1);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = first_key + ty * 4 + i;
        if (t >= seq) continue;
        float* dk_out = dq + (long)t * ld + c + tx * DPT;
        float* dv_out = dk_out + c;
#pragma unroll
        for (int j = 0; j < DPT; j++) dk_out[j] = scale * dk[i][j], dv_out[j] = dv[i][j];
    }
}

// dot (B·H, T): Σ_d y·dy over each head's slice of each row, one warp per (row, head).
extern "C" __global__ void attention_row_dots(const float* y, const float* dy, float* dot, int rows, int seq, int n_head, int hs) {
    int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane_id = threadIdx.x % 32;
    if (warp >= rows * n_head) return;
    int row = warp / n_head, h = warp - row * n_head;
    long offset = (long)row * n_head * hs + h * hs;
    float sum = 0.0f;
    for (int d = lane_id; d < hs; d += 32) sum += y[offset + d] * dy[offset + d];
    for (int step = 16; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffff, sum, step);
    int b = row / seq, t = row - b * seq;
    if (lane_id == 0) dot[((long)b * n_head + h) * seq + t] = sum;
}

// One pair of kernels per supported head size; larger heads hold more registers per thread.
#define FUSED_ATTENTION(HS)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(ATTENTION_THREADS, HS <= 64 ? 2 : 1)                                              \
        fused_attention_forward_##HS(const float* qkv, float* y, float* lse, int seq, int n_head, float scale) {               \
        attention_forward<HS>(qkv, y, lse, seq, n_head, scale);                                                                \
    }                                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATTENTION_THREADS, HS <= 64 ? 2 : 1)                                              \
        fused_attention_backward_##HS(const float* qkv, const float* dy, const float* lse, const float* dot, float* dqkv,     \
                                      int* turns, int* tickets, int seq, int n_head, float scale) {                            \
        attention_backward<HS>(qkv, dy, lse, dot, dqkv, turns, tickets, seq, n_head, scale);                                   \
    }

FUSED_ATTENTION(16)
FUSED_ATTENTION(32)
FUSED_ATTENTION(64)
FUSED_ATTENTION(128)
