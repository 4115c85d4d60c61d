// LayerNorm over rows of C (docs/math.md LN1, LN2). One warp per row; sums by warp shuffles.

__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// out = (x − mean)·rstd·w + b; keeps mean and rstd of each row for the backward pass
extern "C" __global__ void layernorm_forward(const float* x, const float* w, const float* b, float* out, float* mean, float* rstd, int rows, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    float s = 0.0f;
    for (int j = lane; j < c; j += 32) s += xr[j];
    float m = warp_sum(s) / c;
    float v = 0.0f;
    for (int j = lane; j < c; j += 32) { float d = xr[j] - m; v += d * d; }
    float r = rsqrtf(warp_sum(v) / c + 1e-5f);
    for (int j = lane; j < c; j += 32) out[(long)row * c + j] = (xr[j] - m) * r * w[j] + b[j];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// dx = rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm)); dw += dout·norm; db += dout
extern "C" __global__ void layernorm_backward(const float* x, const float* dout, const float* w, const float* mean, const float* rstd,
                                              float* dx, float* dw, float* db, int rows, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    const float* gr = dout + (long)row * c;
    float m = mean[row], r = rstd[row];
    float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
    for (int j = lane; j < c; j += 32) {
        float norm = (xr[j] - m) * r;
        float dnorm = gr[j] * w[j];
        sum_dnorm += dnorm;
        sum_dnorm_norm += dnorm * norm;
        atomicAdd(&dw[j], gr[j] * norm);
        atomicAdd(&db[j], gr[j]);
    }
    float mean_dnorm = warp_sum(sum_dnorm) / c;
    float mean_dnorm_norm = warp_sum(sum_dnorm_norm) / c;
    for (int j = lane; j < c; j += 32) {
        float norm = (xr[j] - m) * r;
        dx[(long)row * c + j] = r * (gr[j] * w[j] - mean_dnorm - norm * mean_dnorm_norm);
    }
}
