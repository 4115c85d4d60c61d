// AdamW, PyTorch semantics (docs/math.md A1): p ← p(1 − lr·wd); m, v moments; bias-corrected step.
// The gradient is multiplied by grad_scale first (global-norm clipping).
extern "C" __global__ void adamw_update(float* p, const float* g, float* m, float* v, long n, float grad_scale,
                                       float lr, float beta1, float beta2, float eps, float weight_decay,
                                       float bias_correction1, float bias_correction2_sqrt) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
    p[i] = p[i] * (1.0f - lr * weight_decay) - lr * (mi / bias_correction1) / denom;
}
