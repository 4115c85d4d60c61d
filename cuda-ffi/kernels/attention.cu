// Causal self-attention pieces (docs/math.md, attention). The products q·kᵀ and att·v are
// strided-batched cuBLAS calls; these kernels move heads in and out of the row layout and do
// the masked softmax.

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
    float inv = 1.0f / warp_sum(sum);
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
    dot = warp_sum(dot);
    for (int j = lane; j < seq; j += 32) g[j] = j <= t ? scale * a[j] * (g[j] - dot) : 0.0f;
}

// Decoding: m new rows of qkv (m, 3C) → q (H, m, hs), and their keys and values appended to the
// caches (S, H, positions, hs) of several sequences: row j goes to sequence rows[3j + 1] at
// position rows[3j + 2] (rows holds (token id, sequence, position) per new row). One thread per
// element. The decoding kernels read the rows' places from device memory, so that a captured
// pass replays for any sequences at any positions.
extern "C" __global__ void append_kv(const float* qkv, float* q, float* keys, float* values, int m, int n_head, int hs, int positions,
                                     const unsigned int* rows) {
    int c = n_head * hs;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= m * 3 * c) return;
    int j = index / (3 * c), i = index - j * 3 * c;
    int which = i / c, rest = i - which * c;
    int h = rest / hs, d = rest - h * hs;
    long sequence = rows[3 * j + 1], position = rows[3 * j + 2];
    if (which == 0) q[((long)h * m + j) * hs + d] = qkv[index];
    else (which == 1 ? keys : values)[((sequence * n_head + h) * positions + position) * hs + d] = qkv[index];
}


// Decoding: the attention of m new query rows q (H, m, hs), each over its own sequence's cache
// (of the caches (S, H, positions, hs)): row i, of sequence rows[3i + 1] at position
// rows[3i + 2] (after append_kv), sees that sequence's positions ≤ its own. Writes rows y (m, C).
// One block per (new row, head) with the row's scores in shared memory (after the query itself):
// one launch for what training does in four, and for every sequence of a batch.
extern "C" __global__ void decode_attention(const float* q, const float* keys, const float* values, float* y, int m, int n_head, int hs,
                                            int positions, const unsigned int* rows, float scale) {
    extern __shared__ float decode_shared[];
    __shared__ float reduce[DECODE_THREADS / 32];
    int i = blockIdx.x, h = blockIdx.y, visible = rows[3 * i + 2] + 1;
    long sequence = rows[3 * i + 1];
    float* query = decode_shared;
    float* scores = decode_shared + hs;
    for (int d = threadIdx.x; d < hs; d += DECODE_THREADS) query[d] = q[((long)h * m + i) * hs + d];
    __syncthreads();
    const float* k = keys + (sequence * n_head + h) * positions * hs;
    const float* v = values + (sequence * n_head + h) * positions * hs;
    // one warp per key, its lanes along the head (coalesced reads of the cached row)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float local_max = NEG_INF;
    for (int j = warp; j < visible; j += DECODE_THREADS / 32) {
        float s = 0.0f;
        for (int d = lane; d < hs; d += 32) s += query[d] * k[(long)j * hs + d];
        s = scale * warp_sum(s);
        if (lane == 0) scores[j] = s;
        local_max = fmaxf(local_max, s);
    }
    float row_max = block_reduce(local_max, true, reduce);
    float local_sum = 0.0f;  // (the reduction's barriers have published every score)
    for (int j = threadIdx.x; j < visible; j += DECODE_THREADS) {
        float e = expf(scores[j] - row_max);
        scores[j] = e;
        local_sum += e;
    }
    float inverse = 1.0f / block_reduce(local_sum, false, reduce);
    // y = Σ_j p_j v_j: the threads in groups of hs, group g taking keys g, g + groups, …, so
    // that more loads are in flight than one walk over the keys would have; then the groups' sums
    __shared__ float group_sums[DECODE_THREADS];
    int groups = hs <= DECODE_THREADS ? DECODE_THREADS / hs : 1;
    int group = threadIdx.x / hs;
    for (int d0 = 0; d0 < hs; d0 += DECODE_THREADS) {
        int d = d0 + threadIdx.x % hs;
        float acc = 0.0f;
        if (group < groups && d < hs) {
#pragma unroll 4
            for (int j = group; j < visible; j += groups) acc += scores[j] * v[(long)j * hs + d];
        }
        __syncthreads();
        group_sums[threadIdx.x] = acc;
        __syncthreads();
        if (group == 0 && d < hs) {
            float sum = 0.0f;
            for (int g = 0; g < groups; g++) sum += group_sums[g * hs + threadIdx.x];
            y[(long)i * n_head * hs + h * hs + d] = sum * inverse;
        }
    }
}
