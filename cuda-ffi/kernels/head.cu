// The rank-r CP head, block by block over positions (docs/math.md H1–H11; the op is
// src/ops/cp_head.rs of the main crate). A block holds the logits of rows (t, α, s) for a run
// of consecutive positions t: row i of the block belongs to position i / (r·n), component
// (i mod r·n) / n and horizon i mod n.

// (H2, H7) One block of THREADS threads per position t of the block, over its r·n rows of V
// logits: log_p[t, α, s] = ℓ[y_s] − lse(ℓ); with `gradient`, also the posterior π (H7's
// weights) and dℓ = π[α]/N · (P − onehot(y_s)), written in place. The logits are f32, or bf16
// (L = unsigned short: bf16 training, where the product writes them rounded, as autocast does,
// and only the products read dℓ, rounded); every sum is f32 and runs in the same order either
// way, so on bf16 logits the kernel gives what it gives on f32 logits of the same values, dℓ
// then rounded. Two passes over the logits: one for each row's max and sum (online), one to
// write dℓ. A row is taken by `part_count` warps (8 / r·n of them, so that a plain cross
// entropy, r·n = 1, keeps every warp busy), each lane by runs of HEAD_RUN neighbouring entries
// (one or two 16-byte loads) where `vector` says the rows allow it, else one by one.
#define HEAD_RUN 8
#define HEAD_WARPS (THREADS / 32)

__device__ __forceinline__ float logit_value(float x) { return x; }
__device__ __forceinline__ float logit_value(unsigned short bits) { return bf16_value(bits); }
__device__ __forceinline__ void store_logit(float* at, float x) { *at = x; }
__device__ __forceinline__ void store_logit(unsigned short* at, float x) { *at = (unsigned short)bf16_bits(x); }

// HEAD_RUN neighbouring logits from a 16-byte aligned address, and back
__device__ __forceinline__ void load_run(const float* at, float (&x)[HEAD_RUN]) {
    float4 lo = *(const float4*)at, hi = *(const float4*)(at + 4);
    x[0] = lo.x; x[1] = lo.y; x[2] = lo.z; x[3] = lo.w; x[4] = hi.x; x[5] = hi.y; x[6] = hi.z; x[7] = hi.w;
}
__device__ __forceinline__ void load_run(const unsigned short* at, float (&x)[HEAD_RUN]) {
    uint4 q = *(const uint4*)at;
    float4 lo = bf16x4_values(make_uint2(q.x, q.y)), hi = bf16x4_values(make_uint2(q.z, q.w));
    x[0] = lo.x; x[1] = lo.y; x[2] = lo.z; x[3] = lo.w; x[4] = hi.x; x[5] = hi.y; x[6] = hi.z; x[7] = hi.w;
}
__device__ __forceinline__ void store_run(float* at, const float (&x)[HEAD_RUN]) {
    *(float4*)at = make_float4(x[0], x[1], x[2], x[3]);
    *(float4*)(at + 4) = make_float4(x[4], x[5], x[6], x[7]);
}
__device__ __forceinline__ void store_run(unsigned short* at, const float (&x)[HEAD_RUN]) {
    *(uint4*)at = make_uint4(bf16x2_bits(x[0], x[1]), bf16x2_bits(x[2], x[3]), bf16x2_bits(x[4], x[5]), bf16x2_bits(x[6], x[7]));
}

// The running (max m, sum s of exp(x − m)) with x added
__device__ __forceinline__ void online_add(float x, float* m, float* s) {
    if (x > *m) {
        *s = *s * expf(*m - x) + 1.0f;
        *m = x;
    } else {
        *s += expf(x - *m);
    }
}

template <typename L>
__device__ void head_position_rows(L* logits, const unsigned int* targets, const float* log_w, float* log_p, float* posterior, int v,
                                   int n, int r, float inv_count, int gradient, int vector) {
    __shared__ float part_max[HEAD_WARPS], part_sum[HEAD_WARPS];
    __shared__ float row_lse[MAX_RANK * MAX_HORIZON];
    __shared__ float row_coef[MAX_RANK];
    long t = blockIdx.x;
    int rn = r * n, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int part_count = max(1, HEAD_WARPS / rn), rows_at_once = HEAD_WARPS / part_count;
    int part = warp % part_count;
    L* rows = logits + t * rn * v;
    for (int k0 = 0; k0 < rn; k0 += rows_at_once) {
        int k = k0 + warp / part_count;
        float m = NEG_INF, s = 0.0f;
        if (k < rn) {
            const L* row = rows + (long)k * v;
            if (vector) {
#pragma unroll 4
                for (int j = (part * 32 + lane) * HEAD_RUN; j < v; j += part_count * 32 * HEAD_RUN) {
                    float x[HEAD_RUN];
                    load_run(row + j, x);
#pragma unroll
                    for (int e = 0; e < HEAD_RUN; e++) online_add(x[e], &m, &s);
                }
            } else {
                for (int j = part * 32 + lane; j < v; j += part_count * 32) online_add(logit_value(row[j]), &m, &s);
            }
        }
        // the warp's (max, sum), then the row's parts', in order
        float warp_m = warp_max(m);
        s = warp_sum(m == NEG_INF ? 0.0f : s * expf(m - warp_m));
        if (lane == 0) {
            part_max[warp] = warp_m;
            part_sum[warp] = s;
        }
        __syncthreads();
        if (threadIdx.x < rows_at_once && k0 + threadIdx.x < rn) {
            int row_k = k0 + threadIdx.x, first = threadIdx.x * part_count;
            float row_m = NEG_INF, row_s = 0.0f;
            for (int p = 0; p < part_count; p++) row_m = fmaxf(row_m, part_max[first + p]);
            for (int p = 0; p < part_count; p++)
                if (part_max[first + p] != NEG_INF) row_s += part_sum[first + p] * expf(part_max[first + p] - row_m);
            float lse = row_m + logf(row_s);
            row_lse[row_k] = lse;
            log_p[t * rn + row_k] = logit_value(rows[(long)row_k * v + targets[t * n + row_k % n]]) - lse;
        }
        __syncthreads();
    }
    if (!gradient) return;
    if (threadIdx.x == 0) {
        float score[MAX_RANK];
        float m = NEG_INF;
        for (int a = 0; a < r; a++) {
            float sum = log_w[t * r + a];
            for (int h = 0; h < n; h++) sum += log_p[t * rn + a * n + h];
            score[a] = sum;
            m = fmaxf(m, sum);
        }
        float total = 0.0f;
        for (int a = 0; a < r; a++) total += expf(score[a] - m);
        for (int a = 0; a < r; a++) {
            float pi = expf(score[a] - m) / total;
            posterior[t * r + a] = pi;
            row_coef[a] = pi * inv_count;
        }
    }
    __syncthreads();
    for (int k = warp / part_count; k < rn; k += rows_at_once) {
        L* row = rows + (long)k * v;
        float coef = row_coef[k / n], lse = row_lse[k];
        int y = targets[t * n + k % n];
        if (vector) {
#pragma unroll 4
            for (int j = (part * 32 + lane) * HEAD_RUN; j < v; j += part_count * 32 * HEAD_RUN) {
                float x[HEAD_RUN];
                load_run(row + j, x);
#pragma unroll
                for (int e = 0; e < HEAD_RUN; e++) x[e] = coef * expf(x[e] - lse) - (j + e == y ? coef : 0.0f);
                store_run(row + j, x);
            }
        } else {
            for (int j = part * 32 + lane; j < v; j += part_count * 32)
                store_logit(row + j, coef * expf(logit_value(row[j]) - lse) - (j == y ? coef : 0.0f));
        }
    }
}

#define HEAD_POSITION_ARGUMENTS(L) \
    L *logits, const unsigned int *targets, const float *log_w, float *log_p, float *posterior, int v, int n, int r, float inv_count, \
        int gradient, int vector
#define HEAD_POSITION_CALL logits, targets, log_w, log_p, posterior, v, n, r, inv_count, gradient, vector
extern "C" __global__ void head_position(HEAD_POSITION_ARGUMENTS(float)) { head_position_rows(HEAD_POSITION_CALL); }
extern "C" __global__ void head_position_bf16(HEAD_POSITION_ARGUMENTS(unsigned short)) { head_position_rows(HEAD_POSITION_CALL); }

// (H3) log_softmax of each position's r gate logits, in place.
extern "C" __global__ void gate_log_softmax(float* a, int positions, int r) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= positions) return;
    float* row = a + (long)t * r;
    float m = NEG_INF;
    for (int k = 0; k < r; k++) m = fmaxf(m, row[k]);
    float s = 0.0f;
    for (int k = 0; k < r; k++) s += expf(row[k] - m);
    float lse = m + logf(s);
    for (int k = 0; k < r; k++) row[k] -= lse;
}

// (H4–H6) Sums over all positions, in f64, by one block:
// out[0] Σ −log p(y), out[1] Σ gate entropy, out[2 + s] Σ −log p(y_s),
// out[2 + n + α] how many positions have α as their top component, out[2 + n + r + α] Σ w[α].
extern "C" __global__ void head_statistics(const float* log_p, const float* log_w, double* out, int positions, int r, int n) {
    __shared__ double shared[THREADS];
    const int quantities = 2 + n + 2 * r;
    double local[2 + MAX_HORIZON + 2 * MAX_RANK];
    for (int q = 0; q < quantities; q++) local[q] = 0.0;
    for (int t = threadIdx.x; t < positions; t += THREADS) {
        const float* a = log_p + (long)t * r * n;
        const float* lw = log_w + (long)t * r;
        double score[MAX_RANK];
        double m = NEG_INF_F64;
        for (int k = 0; k < r; k++) {
            double s = lw[k];
            for (int h = 0; h < n; h++) s += a[k * n + h];
            score[k] = s;
            m = fmax(m, s);
        }
        double sum = 0.0;
        for (int k = 0; k < r; k++) sum += exp(score[k] - m);
        local[0] -= m + log(sum);
        for (int h = 0; h < n; h++) {
            double mh = NEG_INF_F64;
            for (int k = 0; k < r; k++) mh = fmax(mh, (double)lw[k] + a[k * n + h]);
            double sh = 0.0;
            for (int k = 0; k < r; k++) sh += exp((double)lw[k] + a[k * n + h] - mh);
            local[2 + h] -= mh + log(sh);
        }
        int top = 0;
        for (int k = 0; k < r; k++) {
            double w = exp((double)lw[k]);
            if (w > exp((double)lw[top])) top = k;
            local[2 + n + r + k] += w;
            if (w > 0.0) local[1] -= w * log(w);
        }
        local[2 + n + top] += 1.0;
    }
    for (int q = 0; q < quantities; q++) {
        shared[threadIdx.x] = local[q];
        __syncthreads();
        for (int stride = THREADS / 2; stride > 0; stride /= 2) {
            if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
            __syncthreads();
        }
        if (threadIdx.x == 0) out[q] = shared[0];
        __syncthreads();
    }
}

// (H10) da = (w − π)/N + λ·w ⊙ (u − ⟨w, u⟩), u[α] = r·f[α]/N, f[α] = top_count[α]/N.
extern "C" __global__ void gate_gradient(const float* log_w, const float* posterior, const double* top_count, float* da, int positions, int r,
                                         float inv_count, float lambda) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= positions) return;
    float w[MAX_RANK], u[MAX_RANK];
    float w_dot_u = 0.0f;
    for (int k = 0; k < r; k++) {
        w[k] = expf(log_w[t * r + k]);
        u[k] = (float)(r * (top_count[k] * inv_count) * inv_count);
        w_dot_u += w[k] * u[k];
    }
    for (int k = 0; k < r; k++) da[t * r + k] = (w[k] - posterior[t * r + k]) * inv_count + lambda * w[k] * (u[k] - w_dot_u);
}

// Decoding: each row of V logits becomes its probabilities, in place. One block per row.
extern "C" __global__ void softmax_rows(float* logits, int v) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    __shared__ float shared[THREADS / 32];
    float* row = logits + (long)blockIdx.x * v;
    float lse = block_log_sum_exp(row, v, shared);
    for (int j = threadIdx.x; j < v; j += THREADS) row[j] = expf(row[j] - lse);
}
