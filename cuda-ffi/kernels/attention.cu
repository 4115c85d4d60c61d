// Causal self-attention pieces (docs/math.md, attention). The products q·kᵀ and att·v are
// strided-batched cuBLAS calls; these kernels move heads in and out of the row layout and do
// the masked softmax.

// NVRTC has no math.h, so no INFINITY
#define NEG_INF __int_as_float(0xff800000)

// qkv (B, T, 3C) ↔ q, k, v, each (B, H, T, hs), stored one after the other in `heads`.
// One block per row (b, t): the row is read (or written) whole, the heads in runs of hs.
// Index arithmetic is in 32 bits where it can be (64-bit division is slow on the GPU).
__device__ long head_index(int j, int row, int batch, int seq, int n_head, int hs) {
    int c = n_head * hs;
    int which = j / c;
    int rest = j - which * c;
    int h = rest / hs;
    int d = rest - h * hs;
    int b = row / seq, t = row - (row / seq) * seq;
    return which * ((long)batch * seq * c) + (((long)b * n_head + h) * seq + t) * hs + d;
}

extern "C" __global__ void qkv_to_heads(const float* qkv, float* heads, int batch, int seq, int n_head, int hs) {
    int row = blockIdx.x, width = 3 * n_head * hs;
    const float* source = qkv + (long)row * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) heads[head_index(j, row, batch, seq, n_head, hs)] = source[j];
}

extern "C" __global__ void heads_to_qkv(const float* heads, float* qkv, int batch, int seq, int n_head, int hs) {
    int row = blockIdx.x, width = 3 * n_head * hs;
    float* target = qkv + (long)row * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) target[j] = heads[head_index(j, row, batch, seq, n_head, hs)];
}

// heads (B, H, T, hs) → rows (B, T, C) when to_rows is 1; rows → heads when it is 0.
extern "C" __global__ void heads_rows(float* heads, float* rows, int batch, int seq, int n_head, int hs, int to_rows) {
    int row = blockIdx.x, width = n_head * hs;
    float* r = rows + (long)row * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        long i = head_index(j, row, batch, seq, n_head, hs);
        if (to_rows) r[j] = heads[i]; else heads[i] = r[j];
    }
}

__device__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

__device__ float warp_add(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// In place, each row of `keys` scores: rows come in matrices of `queries` rows, query t of a
// matrix sees keys j ≤ t + keys − queries (the cache before it, then the causal part):
// att[j] = softmax(scale·s[j]) there, 0 beyond. Training has queries = keys = T. One warp per row.
extern "C" __global__ void causal_softmax_forward(float* scores, int rows, int queries, int keys, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int last = row % queries + keys - queries;
    float* s = scores + (long)row * keys;
    float m = NEG_INF;
    for (int j = lane; j <= last; j += 32) m = fmaxf(m, scale * s[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j <= last; j += 32) sum += expf(scale * s[j] - m);
    float inv = 1.0f / warp_add(sum);
    for (int j = lane; j < keys; j += 32) s[j] = j <= last ? expf(scale * s[j] - m) * inv : 0.0f;
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

// Decoding: m new rows of qkv (m, 3C) → q (H, m, hs), and their keys and values appended to the
// cache (H, positions, hs) at positions start..start + m. One block per new row.
extern "C" __global__ void append_kv(const float* qkv, float* q, float* keys, float* values, int m, int n_head, int hs, int positions, int start) {
    int j = blockIdx.x, c = n_head * hs;
    const float* row = qkv + (long)j * 3 * c;
    for (int i = threadIdx.x; i < 3 * c; i += blockDim.x) {
        int which = i / c, rest = i - (i / c) * c;
        int h = rest / hs, d = rest - (rest / hs) * hs;
        if (which == 0) q[((long)h * m + j) * hs + d] = row[i];
        else (which == 1 ? keys : values)[((long)h * positions + start + j) * hs + d] = row[i];
    }
}
