// The rank-r CP head, block by block over positions (docs/math.md H1–H11; the CPU op is
// src/ops/cp_head.rs of the main crate). A block holds the logits of rows (t, α, s) for a run
// of consecutive positions t: row i of the block belongs to position i / (r·n), component
// (i mod r·n) / n and horizon i mod n.

// NVRTC has no math.h, so no INFINITY
#define NEG_INF __int_as_float(0xff800000)
#define NEG_INF_F64 __longlong_as_double(0xfff0000000000000LL)

#define THREADS 256
#define MAX_HORIZON 16
#define MAX_RANK 16

__device__ float block_reduce(float v, bool take_max, float* shared) {
    for (int offset = 16; offset > 0; offset /= 2) {
        float other = __shfl_xor_sync(0xffffffff, v, offset);
        v = take_max ? fmaxf(v, other) : v + other;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = shared[0];
    for (int w = 1; w < THREADS / 32; w++) v = take_max ? fmaxf(v, shared[w]) : v + shared[w];
    return v;
}

// (H2) In place, each row of V logits becomes its probabilities P; log_p[i] = ℓ[y] − lse(ℓ),
// y the row's target. One block of 256 threads per row.
extern "C" __global__ void head_row_softmax(float* logits, const unsigned int* targets, float* log_p, int v, int n, int rn) {
    __shared__ float shared[THREADS / 32];
    long i = blockIdx.x;
    float* row = logits + i * v;
    unsigned int y = targets[(i / rn) * n + i % n];
    float logit_y = row[y];
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += THREADS) m = fmaxf(m, row[j]);
    m = block_reduce(m, true, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += THREADS) s += expf(row[j] - m);
    s = block_reduce(s, false, shared);
    float inv = 1.0f / s;
    for (int j = threadIdx.x; j < v; j += THREADS) row[j] = expf(row[j] - m) * inv;
    if (threadIdx.x == 0) log_p[i] = logit_y - (m + logf(s));
}

// The posterior over components of each position: π = softmax_α(log w[α] + Σ_s log_p[α,s]).
extern "C" __global__ void head_posterior(const float* log_p, const float* log_w, float* posterior, int positions, int r, int n) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= positions) return;
    float score[MAX_RANK];
    float m = NEG_INF;
    for (int a = 0; a < r; a++) {
        float s = log_w[t * r + a];
        for (int h = 0; h < n; h++) s += log_p[((long)t * r + a) * n + h];
        score[a] = s;
        m = fmaxf(m, s);
    }
    float sum = 0.0f;
    for (int a = 0; a < r; a++) sum += expf(score[a] - m);
    for (int a = 0; a < r; a++) posterior[t * r + a] = expf(score[a] - m) / sum;
}

// (H7) In place: dℓ = π[α]/N · (P − onehot(y)).
extern "C" __global__ void head_dlogits(float* probs, const unsigned int* targets, const float* posterior, int v, int n, int r, float inv_count) {
    long i = blockIdx.x;
    int rn = r * n;
    long t = i / rn;
    int alpha = (i % rn) / n;
    unsigned int y = targets[t * n + i % n];
    float coef = posterior[t * r + alpha] * inv_count;
    float* row = probs + i * v;
    for (int j = threadIdx.x; j < v; j += THREADS) row[j] = row[j] * coef - (j == y ? coef : 0.0f);
}

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
