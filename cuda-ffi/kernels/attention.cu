// Causal self-attention pieces (docs/math.md, attention). The products q·kᵀ and att·v are
// strided-batched cuBLAS calls; these kernels move heads in and out of the row layout and do
// the masked softmax.

// NVRTC has no math.h, so no INFINITY
#define NEG_INF __int_as_float(0xff800000)

// qkv (B, T, 3C) → q, k, v, each (B, H, T, hs), stored one after the other in `heads`.
// Index arithmetic is in 32 bits (64-bit division is slow on the GPU): buffers stay below 2^31.
extern "C" __global__ void qkv_to_heads(const float* qkv, float* heads, int batch, int seq, int n_head, int hs) {
    int c = n_head * hs;
    int per = batch * seq * c;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= 3 * per) return;
    int which = i / per;
    int rest = i - which * per;  // index into (B, H, T, hs)
    int d = rest % hs;
    int t = (rest / hs) % seq;
    int h = (rest / (hs * seq)) % n_head;
    int b = rest / (hs * seq * n_head);
    heads[i] = qkv[(b * seq + t) * 3 * c + which * c + h * hs + d];
}

// the inverse: dq, dk, dv (B, H, T, hs) → dqkv (B, T, 3C)
extern "C" __global__ void heads_to_qkv(const float* heads, float* qkv, int batch, int seq, int n_head, int hs) {
    int c = n_head * hs;
    int per = batch * seq * c;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= 3 * per) return;
    int which = i / per;
    int rest = i - which * per;
    int d = rest % hs;
    int t = (rest / hs) % seq;
    int h = (rest / (hs * seq)) % n_head;
    int b = rest / (hs * seq * n_head);
    qkv[(b * seq + t) * 3 * c + which * c + h * hs + d] = heads[i];
}

// heads (B, H, T, hs) → rows (B, T, C) when to_rows is 1; rows → heads when it is 0.
extern "C" __global__ void heads_rows(float* heads, float* rows, int batch, int seq, int n_head, int hs, int to_rows) {
    int total = batch * seq * n_head * hs;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int d = i % hs;
    int t = (i / hs) % seq;
    int h = (i / (hs * seq)) % n_head;
    int b = i / (hs * seq * n_head);
    int r = (b * seq + t) * n_head * hs + h * hs + d;
    if (to_rows) rows[r] = heads[i]; else heads[i] = rows[r];
}

__device__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

__device__ float warp_add(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// In place, each row (b, h, t) of T scores: att[j] = softmax_j≤t(scale·s[j]), 0 for j > t.
// One warp per row.
extern "C" __global__ void causal_softmax_forward(float* scores, int rows, int seq, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % seq;
    float* s = scores + (long)row * seq;
    float m = NEG_INF;
    for (int j = lane; j <= t; j += 32) m = fmaxf(m, scale * s[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j <= t; j += 32) sum += expf(scale * s[j] - m);
    float inv = 1.0f / warp_add(sum);
    for (int j = lane; j < seq; j += 32) s[j] = j <= t ? expf(scale * s[j] - m) * inv : 0.0f;
}

// In place: d[j] ← scale · att[j] · (d[j] − Σ_k att[k] d[k]) for j ≤ t, 0 above the diagonal:
// the gradient with respect to the unscaled scores.
extern "C" __global__ void causal_softmax_backward(const float* att, float* d, int rows, int seq, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % seq;
    const float* a = att + (long)row * seq;
    float* g = d + (long)row * seq;
    float dot = 0.0f;
    for (int j = lane; j <= t; j += 32) dot += a[j] * g[j];
    dot = warp_add(dot);
    for (int j = lane; j < seq; j += 32) g[j] = j <= t ? scale * a[j] * (g[j] - dot) : 0.0f;
}
