// AdamW, PyTorch semantics (docs/math.md A1): p ← p(1 − lr·wd); m, v moments; bias-corrected step.
// The gradient is multiplied by grad_scale first (global-norm clipping).

__device__ void adamw_element(float* p, const float* g, float* m, float* v, long i, float grad_scale, float lr, float beta1, float beta2,
                              float eps, float weight_decay, float bias_correction1, float bias_correction2_sqrt) {
    float gi = g[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
    p[i] = p[i] * (1.0f - lr * weight_decay) - lr * (mi / bias_correction1) / denom;
}

// Every parameter of a flat buffer in one launch. Parameter s spans [starts[s], starts[s + 1]);
// flags[s] bit 0: update it, bit 1: apply weight decay. Each element finds its parameter by
// binary search over the (a few hundred) starts.
extern "C" __global__ void adamw_update_segments(float* p, const float* g, float* m, float* v, long n, const long* starts,
                                                const unsigned int* flags, int segments, float grad_scale, float lr, float beta1,
                                                float beta2, float eps, float weight_decay, float bias_correction1,
                                                float bias_correction2_sqrt) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int lo = 0, hi = segments;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (starts[mid] <= i) lo = mid; else hi = mid;
    }
    unsigned int f = flags[lo];
    if (!(f & 1u)) return;
    float decay = (f & 2u) ? weight_decay : 0.0f;
    adamw_element(p, g, m, v, i, grad_scale, lr, beta1, beta2, eps, decay, bias_correction1, bias_correction2_sqrt);
}
