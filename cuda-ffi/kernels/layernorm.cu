// LayerNorm over rows of C (docs/math.md LN1, LN2). One warp per row; sums by warp shuffles.

// out = (x − mean)·rstd·w + b; keeps mean and rstd of each row for the backward pass
extern "C" __global__ void layernorm_forward(const float* x, const float* w, const float* b, float* out, float* mean, float* rstd, int rows, int c) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    float m, r;
    warp_row_statistics(xr, c, &m, &r);
    for (int j = lane; j < c; j += 32) out[(long)row * c + j] = (xr[j] - m) * r * w[j] + b[j];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// The backward pass in two kernels, with no atomics, so that its sums run in an order fixed by
// the shape (docs/math.md LN2):
// layernorm_backward: a block of 8 warps takes LAYERNORM_ROWS_PER_BLOCK rows. Each warp writes
// dx = rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm)) for its rows; then each thread takes
// columns and sums dout·norm and dout over the block's rows in order, into the block's partials
// (2·c floats: dw then db), which `column_sums_finish` (elementwise.cu) adds in block order.
extern "C" __global__ void layernorm_backward(const float* x, const float* dout, const float* w, const float* mean, const float* rstd,
                                              float* dx, float* partials, int rows, int c) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int first = blockIdx.x * LAYERNORM_ROWS_PER_BLOCK;
    int last = min(first + LAYERNORM_ROWS_PER_BLOCK, rows);
    for (int row = first + warp; row < last; row += warps) {
        const float* xr = x + (long)row * c;
        const float* gr = dout + (long)row * c;
        float m = mean[row], r = rstd[row];
        float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
        for (int j = lane; j < c; j += 32) {
            float norm = (xr[j] - m) * r;
            float dnorm = gr[j] * w[j];
            sum_dnorm += dnorm;
            sum_dnorm_norm += dnorm * norm;
        }
        float mean_dnorm = warp_sum(sum_dnorm) / c;
        float mean_dnorm_norm = warp_sum(sum_dnorm_norm) / c;
        float* dxr = dx + (long)row * c;
        for (int j = lane; j < c; j += 32) {
            float norm = (xr[j] - m) * r;
            dxr[j] = r * (gr[j] * w[j] - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
    float* dw_block = partials + (long)blockIdx.x * 2 * c;
    float* db_block = dw_block + c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (int row = first; row < last; row++) {
            float g = dout[(long)row * c + j];
            dw += g * (x[(long)row * c + j] - mean[row]) * rstd[row];
            db += g;
        }
        dw_block[j] = dw;
        db_block[j] = db;
    }
}

// The forward for a few rows (decoding): one block of 256 threads per row, so that a row's
// three passes run wide instead of one warp walking it alone.
extern "C" __global__ void layernorm_forward_wide(const float* x, const float* w, const float* b, float* out, float* mean, float* rstd, int c) {
    let_next_kernel_start();
    wait_for_previous_kernel();
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
