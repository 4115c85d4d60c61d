// Products on a few rows, for decoding: out (rows, n) = x' (rows, k) · wᵀ + b, with w given by
// output column, (n, k) (the layout of wte, of the head's expanders, and of the copy of each
// linear layer's weight that decoding keeps), x' either x or its LayerNorm, and a GELU or a
// residual added last. On one to eight rows a product reads every weight once and does a
// handful of multiply-adds with it, so its time is the time to stream w from memory: the kernel
// spreads w over enough warps to keep every SM's loads in flight, in one launch, and each warp
// reads whole contiguous spans of a column, so no block waits on another's partial sums.
//
// Block of FEW_ROW_WARPS warps; a warp takes FEW_ROW_COLUMNS neighbouring output columns, so
// that each float4 of x it reads serves that many float4s of w (on four rows x outweighs w: with
// one column a warp, reading x from L1 took longer than w took to arrive). `split` warps share a
// group of columns (a power of two, chosen by the launcher from n and k so that there are enough
// blocks), warp p of a group taking the p-th of its k weights in float4s, lane l the float4s l,
// l + 32, … of each column. A warp's sums meet by shuffles, the group's warps' sums in shared
// memory, in order. Every sum runs in an order fixed by k and split, never by `rows`: a row's
// result is the same bits whether it is decoded alone or with others, and from run to run.

// the LayerNorm prologue strides over x by THREADS, the launch's block size
static_assert(FEW_ROW_WARPS * 32 == THREADS, "a few-row block is FEW_ROW_WARPS warps of THREADS threads in all");

// A weight's four neighbouring entries as stored, W the element: f32 (a float4) or bf16 (four
// 16-bit halves in a uint2, bf16 decoding's copies). A thread keeps IN_FLIGHT of them loading at
// once, shared among its columns: 96 bytes of f32 (128 spilled past the 80 registers that leave
// room for three blocks an SM), 128 of bf16. Either widens to a float4 exactly (a bf16's bits are the
// upper half of the f32 it stands for), and everything after the load is the same arithmetic:
// on bf16 weights a kernel gives the bits it gives on f32 weights holding the same values.
template <typename W>
struct WeightQuad;
template <>
struct WeightQuad<float> {
    using type = float4;
    static constexpr int IN_FLIGHT = 6;
};
template <>
struct WeightQuad<unsigned short> {
    using type = uint2;
    static constexpr int IN_FLIGHT = 16;
};

__device__ __forceinline__ float4 widen(float4 quad) { return quad; }
__device__ __forceinline__ float4 widen(uint2 quad) { return bf16x4_values(quad); }

// The quads q, q + 32, … (IN_FLIGHT of them, those below `quads`) of a warp's span of its
// column, all in flight at once
template <typename Quad, int IN_FLIGHT>
__device__ __forceinline__ void load_column_quads(Quad (&w_quads)[IN_FLIGHT], const Quad* span, int q, int quads) {
#pragma unroll
    for (int u = 0; u < IN_FLIGHT; u++)
        if (q + 32 * u < quads) w_quads[u] = __ldg(span + q + 32 * u);
}

// s += x · w over a float4's four entries, in order (every product sums a column in this order)
__device__ __forceinline__ void add_dot(float& s, float4 x, float4 w) {
    s += x.x * w.x;
    s += x.y * w.y;
    s += x.z * w.z;
    s += x.w * w.w;
}

// The sums over a warp's lanes of each of a lane's N values (N a power of two, at most 64), by
// handing values off instead of every lane summing every value: at each of warp_sum's steps
// (offsets 16, 8, …, 1) a lane holding two or more values keeps half of them and adds its
// partner's share of that half; with one value left it adds its partner's, as warp_sum does.
// Lanes l and l ^ offset pair up as there, and a + b = b + a, so every sum is the same bits as
// warp_sum gives it, for fewer shuffles (62 for 64 values where warp_sum takes 320) in one chain
// of five. Afterwards lane l holds the sums of values l / (32 / N) for N ≤ 32, and of 2l and
// 2l + 1 (in values[0] and values[1]) for N = 64.
template <int COUNT, int N>
__device__ __forceinline__ void hand_off_step(float (&values)[N], int offset) {
    if (COUNT > 1) {
        bool upper = (threadIdx.x & offset) != 0;
#pragma unroll
        for (int i = 0; i < COUNT / 2; i++) {
            float keep = upper ? values[i + COUNT / 2] : values[i];
            float send = upper ? values[i] : values[i + COUNT / 2];
            values[i] = keep + __shfl_xor_sync(0xffffffff, send, offset);
        }
    } else {
        values[0] += __shfl_xor_sync(0xffffffff, values[0], offset);
    }
}

template <int N>
__device__ __forceinline__ void warp_sums_by_hand_off(float (&values)[N]) {
    static_assert(N >= 1 && N <= 64 && (N & (N - 1)) == 0, "a power of two, at most 64 values");
    hand_off_step<N>(values, 16);
    hand_off_step<(N > 2 ? N / 2 : 1)>(values, 8);
    hand_off_step<(N > 4 ? N / 4 : 1)>(values, 4);
    hand_off_step<(N > 8 ? N / 8 : 1)>(values, 2);
    hand_off_step<(N > 16 ? N / 16 : 1)>(values, 1);
}

// ROWS_MAX: the most rows an instance takes (its sums live in registers). The LayerNorm prologue
// stages x's rows, normalised, in shared memory: rows of at most FEW_ROW_LAYERNORM_K_MAX entries.
template <int ROWS_MAX, typename W>
__device__ void linear_few_rows(const float* x, const float* ln_weight, const float* ln_bias, const W* wt, const float* b,
                                const float* residual, float* out, int rows, int k, int n, int split, int apply_gelu) {
    constexpr int COLUMNS = FEW_ROW_COLUMNS, SUMS = ROWS_MAX * COLUMNS;
    __shared__ float4 staged[ROWS_MAX * FEW_ROW_LAYERNORM_K_MAX / 4];
    __shared__ float row_mean[ROWS_MAX], row_rstd[ROWS_MAX];
    __shared__ float warp_sums[FEW_ROW_WARPS][SUMS];
    let_next_kernel_start();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int groups_per_block = FEW_ROW_WARPS / split;
    int first_column = (blockIdx.x * groups_per_block + warp / split) * COLUMNS;
    int quads = k / 4 / split, first_quad = (warp % split) * quads;
    bool active = first_column < n;
    using Quad = typename WeightQuad<W>::type;
    constexpr int IN_FLIGHT_PER_COLUMN = WeightQuad<W>::IN_FLIGHT / COLUMNS;
    static_assert(WeightQuad<W>::IN_FLIGHT % COLUMNS == 0, "a thread's loads in flight shared evenly among its columns");
    static_assert(FEW_ROW_WARPS * COLUMNS * ROWS_MAX <= THREADS, "the last step gives each of a block's outputs a thread");
    // columns past n read column n − 1 and are not written
    const Quad* spans[COLUMNS];
#pragma unroll
    for (int c = 0; c < COLUMNS; c++) spans[c] = (const Quad*)(wt + (long)min(first_column + c, n - 1) * k) + first_quad;

    // the warp's first float4s of w, and the LayerNorm's gains and shifts of the entries this
    // thread normalises, loaded before the kernel ahead has finished (no kernel writes a weight)
    // and all at once, where loading them as they are used would wait for each in turn
    Quad w_quads[COLUMNS][IN_FLIGHT_PER_COLUMN];
    if (active) {
#pragma unroll
        for (int c = 0; c < COLUMNS; c++) load_column_quads(w_quads[c], spans[c], lane, quads);
    }
    constexpr int NORMALISED_PER_THREAD = (FEW_ROW_LAYERNORM_K_MAX + THREADS - 1) / THREADS;
    float gains[NORMALISED_PER_THREAD], shifts[NORMALISED_PER_THREAD];
    if (ln_weight != nullptr) {
#pragma unroll
        for (int u = 0; u < NORMALISED_PER_THREAD; u++) {
            int j = threadIdx.x + u * THREADS;
            if (j < k) {
                gains[u] = __ldg(ln_weight + j);
                shifts[u] = __ldg(ln_bias + j);
            }
        }
    }
    wait_for_previous_kernel();

    // x's rows as float4s: x itself, or staged in shared memory and layer-normed there (warp r
    // takes row r's statistics, as layernorm_forward does)
    const float4* x_rows = (const float4*)x;
    if (ln_weight != nullptr) {
        // x's rows into shared memory, all of a thread's loads in flight at once
        constexpr int STAGED_PER_THREAD = (ROWS_MAX * FEW_ROW_LAYERNORM_K_MAX / 4 + THREADS - 1) / THREADS;
        float4 loaded[STAGED_PER_THREAD];
#pragma unroll
        for (int u = 0; u < STAGED_PER_THREAD; u++) {
            int i = threadIdx.x + u * THREADS;
            if (i < rows * k / 4) loaded[u] = __ldg((const float4*)x + i);
        }
#pragma unroll
        for (int u = 0; u < STAGED_PER_THREAD; u++) {
            int i = threadIdx.x + u * THREADS;
            if (i < rows * k / 4) staged[i] = loaded[u];
        }
        __syncthreads();
        float* staged_floats = (float*)staged;
        if (warp < rows) {
            float m, r;
            warp_row_statistics(staged_floats + warp * k, k, &m, &r);
            if (lane == 0) { row_mean[warp] = m; row_rstd[warp] = r; }
        }
        __syncthreads();
        // thread t normalises entries t, t + THREADS, … of every row (no division to find an
        // entry's row), with each row's statistics read once
        float mean[ROWS_MAX], rstd[ROWS_MAX];
#pragma unroll
        for (int r = 0; r < ROWS_MAX; r++) {
            mean[r] = row_mean[min(r, rows - 1)];
            rstd[r] = row_rstd[min(r, rows - 1)];
        }
        // an entry's rows read before any is written back, so that the reads are in flight
        // together (a write could otherwise alias the next read, as far as the compiler knows)
#pragma unroll
        for (int u = 0; u < NORMALISED_PER_THREAD; u++) {
            int j = threadIdx.x + u * THREADS;
            float entries[ROWS_MAX];
#pragma unroll
            for (int r = 0; r < ROWS_MAX; r++)
                if (j < k && r < rows) entries[r] = staged_floats[r * k + j];
#pragma unroll
            for (int r = 0; r < ROWS_MAX; r++)
                if (j < k && r < rows) staged_floats[r * k + j] = (entries[r] - mean[r]) * rstd[r] * gains[u] + shifts[u];
        }
        __syncthreads();
        x_rows = staged;
    }

    float sum[SUMS];  // sum[r · COLUMNS + c]: row r, column first_column + c
#pragma unroll
    for (int i = 0; i < SUMS; i++) sum[i] = 0.0f;
    if (active) {
        int k4 = k / 4;
        for (int q0 = 0; q0 < quads; q0 += 32 * IN_FLIGHT_PER_COLUMN) {
            if (q0 > 0) {
#pragma unroll
                for (int c = 0; c < COLUMNS; c++) load_column_quads(w_quads[c], spans[c], q0 + lane, quads);
            }
#pragma unroll
            for (int u = 0; u < IN_FLIGHT_PER_COLUMN; u++) {
                int q = q0 + lane + 32 * u;
                if (q >= quads) break;
                float4 wv[COLUMNS];
#pragma unroll
                for (int c = 0; c < COLUMNS; c++) wv[c] = widen(w_quads[c][u]);
#pragma unroll
                for (int r = 0; r < ROWS_MAX; r++) {
                    if (r < rows) {
                        float4 xv = x_rows[(long)r * k4 + first_quad + q];
#pragma unroll
                        for (int c = 0; c < COLUMNS; c++) add_dot(sum[r * COLUMNS + c], xv, wv[c]);
                    }
                }
            }
        }
    }
    // the warp's sums at once (rows past `rows` sum zeros), each the bits warp_sum gives; the
    // first lane holding one writes it
    warp_sums_by_hand_off(sum);
    constexpr int LANES_PER_SUM = 32 / SUMS;
    int held = lane / LANES_PER_SUM;
    if (lane % LANES_PER_SUM == 0 && held / COLUMNS < rows) warp_sums[warp][held] = sum[0];
    __syncthreads();

    // thread t < columns_per_block · rows: the block's column t / rows at row t % rows
    int columns_per_block = groups_per_block * COLUMNS;
    if (threadIdx.x >= columns_per_block * rows) return;
    int r = threadIdx.x % rows, column_in_block = threadIdx.x / rows;
    int group = column_in_block / COLUMNS, c = column_in_block % COLUMNS;
    int o = blockIdx.x * columns_per_block + column_in_block;
    if (o >= n) return;
    float y = 0.0f;
    for (int p = 0; p < split; p++) y += warp_sums[group * split + p][r * COLUMNS + c];
    if (b != nullptr) y += b[o];
    if (residual != nullptr) y += residual[(long)r * n + o];
    if (apply_gelu) y = gelu(y);
    out[(long)r * n + o] = y;
}

// Two instances: up to 4 rows (decoding's usual passes), with registers to spare for more blocks
// per SM, and up to 8; each on f32 weights and on bf16 (`_bf16`). All split w alike, so a row's
// bits do not depend on which runs it. (More rows read x from L1 more often than w arrives: the
// head's logits on more than 4 rows take linear_column_tiles below.)
#define FEW_ROWS_ARGUMENTS(W)                                                                                                     \
    const float *x, const float *ln_weight, const float *ln_bias, const W *wt, const float *b, const float *residual, float *out, \
        int rows, int k, int n, int split, int apply_gelu
#define FEW_ROWS_CALL x, ln_weight, ln_bias, wt, b, residual, out, rows, k, n, split, apply_gelu
extern "C" __global__ void __launch_bounds__(THREADS, 3) linear_few_rows_small(FEW_ROWS_ARGUMENTS(float)) {
    linear_few_rows<FEW_ROWS_SMALL>(FEW_ROWS_CALL);
}
extern "C" __global__ void __launch_bounds__(THREADS) linear_few_rows_large(FEW_ROWS_ARGUMENTS(float)) {
    linear_few_rows<FEW_ROWS_LARGE>(FEW_ROWS_CALL);
}
extern "C" __global__ void __launch_bounds__(THREADS, 3) linear_few_rows_small_bf16(FEW_ROWS_ARGUMENTS(unsigned short)) {
    linear_few_rows<FEW_ROWS_SMALL>(FEW_ROWS_CALL);
}
extern "C" __global__ void __launch_bounds__(THREADS) linear_few_rows_large_bf16(FEW_ROWS_ARGUMENTS(unsigned short)) {
    linear_few_rows<FEW_ROWS_LARGE>(FEW_ROWS_CALL);
}

// Products on up to TILE_ROWS_MAX rows, with no prologue and no bias: the head's logits, a
// pass's rows times r components against wte (by output column). There x has too many rows for
// the kernel above, whose warp reads every row of x once for each float4 of its two columns;
// here a warp takes TILE_COLUMNS neighbouring columns, so that each float4 of x serves that many
// float4s of w. Lane l sums the float4s l, l + 32, … of each column in order, as the kernel above
// does with one warp a column group (split 1, which its launcher chooses wherever this kernel
// takes the logits), and the warp's sums meet by the same pairs of lanes
// (warp_sums_by_hand_off): each output is the same bits as it gives.
#define TILE_SUMS (TILE_ROWS_MAX * TILE_COLUMNS)
static_assert(TILE_SUMS == 64, "a tile's 64 sums a lane end as 2 a lane after warp_sums_by_hand_off");

template <typename W>
__device__ void column_tiles(const float* x, const W* wt, float* out, int rows, int k, int n) {
    using Quad = typename WeightQuad<W>::type;
    let_next_kernel_start();
    int lane = threadIdx.x % 32;
    int first_column = (blockIdx.x * FEW_ROW_WARPS + threadIdx.x / 32) * TILE_COLUMNS;
    int quads = k / 4;
    // columns past n read column n − 1 and are not written
    const Quad* columns[TILE_COLUMNS];
#pragma unroll
    for (int c = 0; c < TILE_COLUMNS; c++) columns[c] = (const Quad*)(wt + (long)min(first_column + c, n - 1) * k);

    // the next float4 of each column, loaded while the current one is used (the first before
    // the kernel ahead has finished: no kernel writes a weight)
    Quad next_w[TILE_COLUMNS];
    if (lane < quads) {
#pragma unroll
        for (int c = 0; c < TILE_COLUMNS; c++) next_w[c] = __ldg(columns[c] + lane);
    }
    wait_for_previous_kernel();

    float sum[TILE_SUMS];  // sum[r · TILE_COLUMNS + c]: row r, column first_column + c
#pragma unroll
    for (int i = 0; i < TILE_SUMS; i++) sum[i] = 0.0f;
    const float4* x_quads = (const float4*)x;
    for (int q = lane; q < quads; q += 32) {
        float4 w[TILE_COLUMNS];
#pragma unroll
        for (int c = 0; c < TILE_COLUMNS; c++) w[c] = widen(next_w[c]);
        if (q + 32 < quads) {
#pragma unroll
            for (int c = 0; c < TILE_COLUMNS; c++) next_w[c] = __ldg(columns[c] + q + 32);
        }
        // every row's sums, rows past `rows` repeating the last one (not written): a branch on
        // the row count would wait for each row's x before loading the next
#pragma unroll
        for (int r = 0; r < TILE_ROWS_MAX; r++) {
            float4 xv = __ldg(x_quads + (long)min(r, rows - 1) * quads + q);
#pragma unroll
            for (int c = 0; c < TILE_COLUMNS; c++) add_dot(sum[r * TILE_COLUMNS + c], xv, w[c]);
        }
    }
    warp_sums_by_hand_off(sum);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int index = 2 * lane + i, r = index / TILE_COLUMNS, column = first_column + index % TILE_COLUMNS;
        if (r < rows && column < n) out[(long)r * n + column] = sum[i];
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    linear_column_tiles(const float* x, const float* wt, float* out, int rows, int k, int n) {
    column_tiles(x, wt, out, rows, k, n);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    linear_column_tiles_bf16(const float* x, const unsigned short* wt, float* out, int rows, int k, int n) {
    column_tiles(x, wt, out, rows, k, n);
}
