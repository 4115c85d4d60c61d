// LayerNorm over rows of C (docs/math.md LN1, LN2). One warp per row; sums by warp shuffles.

// out = (x − mean)·rstd·w + b; keeps mean and rstd of each row for the backward pass
extern "C" __global__ void layernorm_forward(const float* x, const float* w, const float* b, float* out, float* mean, float* rstd, int rows, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    float m, r;
    warp_row_statistics(xr, c, &m, &r);
    for (int j = lane; j < c; j += 32) out[(long)row * c + j] = (xr[j] - m) * r * w[j] + b[j];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// dx += rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm)); dw += dout·norm; db += dout.
// dx accumulates because in a transformer it is the residual stream's gradient. A block of 8
// warps takes ROWS_PER_BLOCK rows and sums its share of dw and db in shared memory (2·c
// floats, dynamic), then adds it to the global sums: one atomic per column per block instead
// of one per row, which would all contend for the same 2·c addresses.
#define ROWS_PER_BLOCK 32
extern "C" __global__ void layernorm_backward(const float* x, const float* dout, const float* w, const float* mean, const float* rstd,
                                              float* dx, float* dw, float* db, int rows, int c) {
    extern __shared__ float block_sums[];  // dw then db, c each
    float* dw_block = block_sums;
    float* db_block = block_sums + c;
    for (int j = threadIdx.x; j < 2 * c; j += blockDim.x) block_sums[j] = 0.0f;
    __syncthreads();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int first = blockIdx.x * ROWS_PER_BLOCK;
    for (int row = first + warp; row < first + ROWS_PER_BLOCK && row < rows; row += warps) {
        const float* xr = x + (long)row * c;
        const float* gr = dout + (long)row * c;
        float m = mean[row], r = rstd[row];
        float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
        for (int j = lane; j < c; j += 32) {
            float norm = (xr[j] - m) * r;
            float dnorm = gr[j] * w[j];
            sum_dnorm += dnorm;
            sum_dnorm_norm += dnorm * norm;
            atomicAdd(&dw_block[j], gr[j] * norm);
            atomicAdd(&db_block[j], gr[j]);
        }
        float mean_dnorm = warp_sum(sum_dnorm) / c;
        float mean_dnorm_norm = warp_sum(sum_dnorm_norm) / c;
        for (int j = lane; j < c; j += 32) {
            float norm = (xr[j] - m) * r;
            dx[(long)row * c + j] += r * (gr[j] * w[j] - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        atomicAdd(&dw[j], dw_block[j]);
        atomicAdd(&db[j], db_block[j]);
    }
}

// The forward for a few rows (decoding): one block of 256 threads per row, so that a row's
// three passes run wide instead of one warp walking it alone.
extern "C" __global__ void layernorm_forward_wide(const float* x, const float* w, const float* b, float* out, float* mean, float* rstd, int c) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    const float* xr = x + (long)row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    float m = block_reduce(s, false, shared) / c;
    float v = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { float d = xr[j] - m; v += d * d; }
    float r = rsqrtf(block_reduce(v, false, shared) / c + 1e-5f);
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(long)row * c + j] = (xr[j] - m) * r * w[j] + b[j];
    if (threadIdx.x == 0) { mean[row] = m; rstd[row] = r; }
}
