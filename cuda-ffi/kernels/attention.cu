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

// Decoding: the attention of m new rows of qkv (m, 3C), each over its own sequence's cache (of
// the caches (S, H, positions, hs)); rows holds (token id, sequence, position) per new row, read
// from device memory so that a captured pass replays for any sequences at any positions. Row
// i, of sequence rows[3i + 1] at position rows[3i + 2], sees that sequence's positions up to its
// own; writes rows y (m, C). One block per (new row, head), one launch for every sequence of a
// batch.
//
// Block (i, h) also writes row i's key and value for head h into the cache. Within the launch
// no block reads a new row's key or value from there, only from qkv: a sequence's new rows are
// consecutive, at consecutive positions (write_cache_rows checks), so the rows i, i − 1, … that
// hold positions p, p − 1, … of row i's sequence are exactly its new ones.
//
// width: 4 where the head size and every pointer allow float4 loads (the launcher checks), else 1.
extern "C" __global__ void decode_attention(const float* qkv, float* keys, float* values, float* y, int m, int n_head, int hs,
                                            int positions, const unsigned int* rows, float scale, int width) {
    // The block meets at three barriers (for heads wider than a pass of the weighted sum, two
    // more a pass): after the scores' maxima, after the exponentials, after the weighted sums.
    // Everything else a warp works out alone, so that no warp waits for another's loads.
    extern __shared__ __align__(16) float scores[];
    __shared__ float warp_maxima[DECODE_THREADS / 32], warp_sums[DECODE_THREADS / 32];
    __shared__ float group_sums[DECODE_THREADS * 4];
    let_next_kernel_start();
    // Before the wait, only what no kernel of this pass writes: the rows' table (the host's, from
    // before the pass) and the cache below position − i (earlier passes').
    int i = blockIdx.x, h = blockIdx.y, c = n_head * hs, lane = threadIdx.x % 32, warps = DECODE_THREADS / 32;
    long sequence = rows[3 * i + 1];
    int position = rows[3 * i + 2], visible = position + 1;
    const float* own = qkv + (long)i * 3 * c + h * hs;  // row i's query; its key and value C and 2C on
    float* k = keys + (sequence * n_head + h) * positions * hs;
    float* v = values + (sequence * n_head + h) * positions * hs;
    // the cache's keys and values below position − i are read whichever rows turn out new (at
    // most i + 1 are): into the L2 now, while the kernel before may still run (early launch), so
    // that their loads below find them there instead of waiting on memory
    long cached_bytes = (long)max(0, position - i) * hs * sizeof(float);
    for (long line = threadIdx.x; line * L2_LINE < cached_bytes; line += DECODE_THREADS) {
        prefetch_to_l2((const char*)k + line * L2_LINE);
        prefetch_to_l2((const char*)v + line * L2_LINE);
    }
    wait_for_previous_kernel();
    for (int d = threadIdx.x; d < hs; d += DECODE_THREADS) {
        k[(long)position * hs + d] = own[c + d];
        v[(long)position * hs + d] = own[2 * c + d];
    }
    // how many of rows i, i − 1, … hold positions p, p − 1, … of this sequence: those are new
    // (each warp counts them itself: the same answer in every warp, no barrier)
    int fresh = i + 1;
    for (int t = lane; t <= i; t += 32) {
        int r = i - t;
        if (rows[3 * r + 1] != sequence || (int)rows[3 * r + 2] != position - t) fresh = min(fresh, t);
    }
    for (int offset = 16; offset > 0; offset /= 2) fresh = min(fresh, __shfl_xor_sync(0xffffffff, fresh, offset));
    int first_new = visible - fresh;
    // position j's key (value one C further on): from qkv when new, else from the cache
#define DECODE_KEY(j) ((j) >= first_new ? own - (long)(position - (j)) * 3 * c + c : k + (long)(j) * hs)
#define DECODE_VALUE(j) ((j) >= first_new ? own - (long)(position - (j)) * 3 * c + 2 * c : v + (long)(j) * hs)

    // the scores: thread t takes keys t, t + DECODE_THREADS, …, a whole dot product each, so
    // that all of its loads are independent; the query is read where qkv holds it (the same
    // float4s in every thread, so the L1 serves all but the first)
    float local_max = NEG_INF;
    for (int j = threadIdx.x; j < visible; j += DECODE_THREADS) {
        const float* key = DECODE_KEY(j);
        float s = 0.0f;
        if (width == 4) {
            // in float4s, all in flight together (the same sum, in the same order, as below)
#pragma unroll 16
            for (int d4 = 0; d4 < hs / 4; d4++) {
                float4 k4 = ((const float4*)key)[d4], q4 = ((const float4*)own)[d4];
                s += q4.x * k4.x;
                s += q4.y * k4.y;
                s += q4.z * k4.z;
                s += q4.w * k4.w;
            }
        } else {
#pragma unroll 8
            for (int d = 0; d < hs; d++) s += own[d] * key[d];
        }
        s *= scale;
        scores[j] = s;
        local_max = fmaxf(local_max, s);
    }
    local_max = warp_max(local_max);
    if (lane == 0) warp_maxima[threadIdx.x / 32] = local_max;
    __syncthreads();  // barrier 1: every warp's maximum
    float row_max = warp_maxima[0];
    for (int w = 1; w < warps; w++) row_max = fmaxf(row_max, warp_maxima[w]);
    // a thread's own scores become their exponentials, so no barrier between
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < visible; j += DECODE_THREADS) {
        float e = expf(scores[j] - row_max);
        scores[j] = e;
        local_sum += e;
    }
    local_sum = warp_sum(local_sum);
    if (lane == 0) warp_sums[threadIdx.x / 32] = local_sum;
    __syncthreads();  // barrier 2: every exponential and every warp's sum
    float total = warp_sums[0];
    for (int w = 1; w < warps; w++) total += warp_sums[w];
    float inverse = 1.0f / total;
    // y = Σ_j p_j v_j: a value row is taken by a team of threads, `width` neighbouring entries
    // each, in passes over the head of team · width entries; the block holds `groups` such
    // teams, team g taking keys g, g + groups, …; then the teams' sums are added in order
    int team = min(hs / width, DECODE_THREADS), groups = DECODE_THREADS / team;
    int group = threadIdx.x / team;
    for (int base = 0; base < hs; base += team * width) {
        int d0 = base + (threadIdx.x % team) * width;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (group < groups && d0 < hs && width == 4) {
#pragma unroll 8
            for (int j = group; j < visible; j += groups) {
                float4 value = *(const float4*)(DECODE_VALUE(j) + d0);
                float p = scores[j];
                acc[0] += p * value.x;
                acc[1] += p * value.y;
                acc[2] += p * value.z;
                acc[3] += p * value.w;
            }
        } else if (group < groups && d0 < hs) {
#pragma unroll 8
            for (int j = group; j < visible; j += groups) acc[0] += scores[j] * DECODE_VALUE(j)[d0];
        }
        if (base > 0) __syncthreads();  // the previous pass's sums have been read (`base` is the block's)
#pragma unroll
        for (int e = 0; e < 4; e++) group_sums[threadIdx.x * 4 + e] = acc[e];
        __syncthreads();  // barrier 3: every team's sums
        for (int d = base + threadIdx.x; d < min(hs, base + team * width); d += DECODE_THREADS) {
            int lane_of_team = (d - base) / width, e = (d - base) % width;
            float sum = 0.0f;
            for (int g = 0; g < groups; g++) sum += group_sums[(g * team + lane_of_team) * 4 + e];
            y[(long)i * c + h * hs + d] = sum * inverse;
        }
    }
#undef DECODE_KEY
#undef DECODE_VALUE
}
