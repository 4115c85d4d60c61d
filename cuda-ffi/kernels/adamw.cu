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

// Every parameter tensor of a model in one launch, as PyTorch's fused AdamW: tensor s has
// lengths[s] elements at params[s], grads[s], ms[s], vs[s], its own weight decay, and its chunks
// of ADAMW_CHUNK elements are blocks first_block[s] .. first_block[s + 1]. Each block finds its
// tensor by binary search over the (a few hundred) first blocks (`segment_of`).
extern "C" __global__ void adamw_tensors(const unsigned long long* params, const unsigned long long* grads, const unsigned long long* ms,
                                         const unsigned long long* vs, const long* lengths, const float* decays, const int* first_block,
                                         int tensors, float grad_scale, float lr, float beta1, float beta2, float eps, float bias_correction1,
                                         float bias_correction2_sqrt) {
    int block = blockIdx.x, lo = segment_of(first_block, tensors, block);
    float* p = reinterpret_cast<float*>(params[lo]);
    const float* g = reinterpret_cast<const float*>(grads[lo]);
    float* m = reinterpret_cast<float*>(ms[lo]);
    float* v = reinterpret_cast<float*>(vs[lo]);
    long start = (long)(block - first_block[lo]) * ADAMW_CHUNK;
    long end = min(start + (long)ADAMW_CHUNK, lengths[lo]);
    for (long i = start + threadIdx.x; i < end; i += blockDim.x)
        adamw_element(p, g, m, v, i, grad_scale, lr, beta1, beta2, eps, decays[lo], bias_correction1, bias_correction2_sqrt);
}
