// Linear layers on a few rows, for decoding: out (rows, n) = x (rows, k) · w (k, n) + b, with
// optionally a LayerNorm of x first, and a GELU or a residual added last. On one to eight rows a
// product reads every weight once and does a handful of multiply-adds with it, so its time is
// the time to stream w from memory. A general GEMM (cuBLAS) spends most of its time on such
// shapes launching and scheduling tiles; this kernel spreads w over enough blocks to keep every
// SM's loads in flight, in one launch.
//
// Block (x, y) of 256 threads takes 128 columns (a warp's 32 lanes × float4) and rows
// y·k_chunk .. (y + 1)·k_chunk of w; its 8 warps take every 8th of those rows. Per block the
// warps' sums meet in shared memory; when gridDim.y > 1 each block leaves its sum in
// `partials`, and the last block of a column tile to arrive (counted in `arrivals`, which it
// resets) adds them and writes out. Every sum runs in an order fixed by k, n and k_chunk,
// never by `rows`: a row's result is the same bits whether it is decoded alone or with others,
// and from run to run.

#define LOADS_IN_FLIGHT 8

__device__ float4 operator+(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

// Rows k0 + j, k0 + j + FEW_ROW_WARPS, … (LOADS_IN_FLIGHT of them, those below k0 + width) of
// w at a warp's columns, all in flight at once
__device__ __forceinline__ void load_weight_rows(float4 (&w_rows)[LOADS_IN_FLIGHT], const float* w, int k0, int j, int width, int n, int column) {
#pragma unroll
    for (int u = 0; u < LOADS_IN_FLIGHT; u++)
        if (j + u * FEW_ROW_WARPS < width) w_rows[u] = __ldg((const float4*)(w + (long)(k0 + j + u * FEW_ROW_WARPS) * n + column));
}

// FEW_ROWS_MAX: the most rows an instance takes (its sums live in registers); the LayerNorm
// prologue stages x's whole rows in the warps' sums' shared memory, rows · k ≤ 1024 · FEW_ROWS_MAX
template <int FEW_ROWS_MAX>
__device__ void linear_few_rows(const float* x, const float* ln_weight, const float* ln_bias, const float* w, const float* b,
                                const float* residual, float* out, float* partials, unsigned int* arrivals, int rows, int k, int n,
                                int k_chunk, int apply_gelu) {
    __shared__ float x_chunk[FEW_ROWS_MAX][FEW_ROW_K_CHUNK_MAX];
    // the warps' sums (FEW_ROW_WARPS, FEW_ROWS_MAX, 32 float4s); before them, x's whole rows for the LayerNorm
    __shared__ float4 pool[FEW_ROW_WARPS * FEW_ROWS_MAX * 32];
    __shared__ float row_mean[FEW_ROWS_MAX], row_rstd[FEW_ROWS_MAX];
    __shared__ bool last_to_arrive;
    let_next_kernel_start();
    float4 (*warp_sums)[FEW_ROWS_MAX][32] = (float4 (*)[FEW_ROWS_MAX][32])pool;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int k0 = blockIdx.y * k_chunk, k1 = min(k, k0 + k_chunk), width = k1 - k0;
    int column = blockIdx.x * FEW_ROW_TILE_COLUMNS + lane * 4;

    // this warp's first rows of w (every 8th of the block's), loaded before the kernel ahead
    // has finished: no kernel writes a weight
    float4 w_rows[LOADS_IN_FLIGHT];
    if (column < n) load_weight_rows(w_rows, w, k0, warp, width, n, column);
    wait_for_previous_kernel();

    // x's rows k0..k1, layer-normed over the whole row first when asked: the rows come into
    // shared memory in one sweep of float4 loads, then warp r takes row r's two passes (as
    // layernorm_forward does) there
    if (ln_weight != nullptr) {
        float* x_rows = (float*)pool;
        for (int i = threadIdx.x; i < rows * k / 4; i += blockDim.x) ((float4*)x_rows)[i] = __ldg((const float4*)x + i);
        __syncthreads();
        if (warp < rows) {
            float m, r;
            warp_row_statistics(x_rows + warp * k, k, &m, &r);
            if (lane == 0) { row_mean[warp] = m; row_rstd[warp] = r; }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
            int r = i / width, j = i % width;
            x_chunk[r][j] = (x_rows[r * k + k0 + j] - row_mean[r]) * row_rstd[r] * ln_weight[k0 + j] + ln_bias[k0 + j];
        }
    } else {
        for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
            int r = i / width, j = i % width;
            x_chunk[r][j] = x[(long)r * k + k0 + j];
        }
    }
    __syncthreads();

    // the warp's rows of w, eight loads in flight at a time (the first eight already are)
    float4 sum[FEW_ROWS_MAX];
#pragma unroll
    for (int r = 0; r < FEW_ROWS_MAX; r++) sum[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (column < n) {
        for (int j = warp; j < width; j += LOADS_IN_FLIGHT * FEW_ROW_WARPS) {
            if (j != warp) load_weight_rows(w_rows, w, k0, j, width, n, column);
#pragma unroll
            for (int u = 0; u < LOADS_IN_FLIGHT; u++) {
                if (j + u * FEW_ROW_WARPS >= width) break;
#pragma unroll
                for (int r = 0; r < FEW_ROWS_MAX; r++) {
                    if (r < rows) {
                        float xv = x_chunk[r][j + u * FEW_ROW_WARPS];
                        float4 wv = w_rows[u];
                        sum[r].x += xv * wv.x; sum[r].y += xv * wv.y; sum[r].z += xv * wv.z; sum[r].w += xv * wv.w;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FEW_ROWS_MAX; r++)
        if (r < rows) warp_sums[warp][r][lane] = sum[r];
    __syncthreads();

    // thread t < rows·32 takes row t / 32 at the float4 of lane t % 32; warps summed in order
    int r = threadIdx.x / 32, quad = threadIdx.x % 32;
    int col = blockIdx.x * FEW_ROW_TILE_COLUMNS + quad * 4;
    bool mine = r < rows && col < n;
    float4 total = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (mine)
        for (int v = 0; v < FEW_ROW_WARPS; v++) total = total + warp_sums[v][r][quad];
    if (gridDim.y > 1) {
        if (mine) *(float4*)(partials + ((long)blockIdx.y * rows + r) * n + col) = total;
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last_to_arrive = atomicAdd(&arrivals[blockIdx.x], 1) == gridDim.y - 1;
        __syncthreads();
        if (!last_to_arrive) return;
        if (threadIdx.x == 0) arrivals[blockIdx.x] = 0;
        // the last block adds the partial sums: warp g sums parts g, g + 8, … of each row in
        // turn, their loads in flight together; then the warps' sums are added in order
        int my_col = blockIdx.x * FEW_ROW_TILE_COLUMNS + lane * 4;
        float4 group[FEW_ROWS_MAX];
#pragma unroll
        for (int q = 0; q < FEW_ROWS_MAX; q++) {
            group[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (q >= rows || my_col >= n) continue;
            for (int part = warp; part < gridDim.y; part += LOADS_IN_FLIGHT * FEW_ROW_WARPS) {
                float4 p[LOADS_IN_FLIGHT];
#pragma unroll
                for (int u = 0; u < LOADS_IN_FLIGHT; u++)
                    if (part + u * FEW_ROW_WARPS < gridDim.y) p[u] = __ldcg((const float4*)(partials + ((long)(part + u * FEW_ROW_WARPS) * rows + q) * n + my_col));
#pragma unroll
                for (int u = 0; u < LOADS_IN_FLIGHT; u++)
                    if (part + u * FEW_ROW_WARPS < gridDim.y) group[q] = group[q] + p[u];
            }
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < FEW_ROWS_MAX; q++)
            if (q < rows) warp_sums[warp][q][lane] = group[q];
        __syncthreads();
        if (mine) {
            total = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int v = 0; v < FEW_ROW_WARPS; v++) total = total + warp_sums[v][r][quad];
        }
    }
    if (!mine) return;
    float4 bias = *(const float4*)(b + col);
    float4 y = total + bias;
    if (residual != nullptr) y = y + *(const float4*)(residual + (long)r * n + col);
    if (apply_gelu) y = make_float4(gelu(y.x), gelu(y.y), gelu(y.z), gelu(y.w));
    *(float4*)(out + (long)r * n + col) = y;
}

// Two instances: up to 4 rows (decoding's usual passes), with registers to spare for three
// blocks per SM, and up to 8. Both split w alike, so a row's bits do not depend on which runs it.
#define FEW_ROWS_ARGUMENTS                                                                                                           \
    const float *x, const float *ln_weight, const float *ln_bias, const float *w, const float *b, const float *residual, float *out, \
        float *partials, unsigned int *arrivals, int rows, int k, int n, int k_chunk, int apply_gelu
extern "C" __global__ void __launch_bounds__(THREADS, 3) linear_few_rows_small(FEW_ROWS_ARGUMENTS) {
    linear_few_rows<FEW_ROWS_SMALL>(x, ln_weight, ln_bias, w, b, residual, out, partials, arrivals, rows, k, n, k_chunk, apply_gelu);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2) linear_few_rows_large(FEW_ROWS_ARGUMENTS) {
    linear_few_rows<FEW_ROWS_LARGE>(x, ln_weight, ln_bias, w, b, residual, out, partials, arrivals, rows, k, n, k_chunk, apply_gelu);
}
