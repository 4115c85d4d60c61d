// The rank-r CP head, block by block over positions (docs/math.md H1–H11; the op is
// src/ops/cp_head.rs of the main crate). A block holds the logits of rows (t, α, s) for a run
// of consecutive positions t: row i of the block belongs to position i / (r·n), component
// (i mod r·n) / n and horizon i mod n.

// (H2, H7) One block of 256 threads per position t of the block, over its r·n rows of V
// logits: log_p[t, α, s] = ℓ[y_s] − lse(ℓ); with `gradient`, also the posterior π (H7's
// weights) and dℓ = π[α]/N · (P − onehot(y_s)): in place, or where `rounded_gradient` is not
// null, there in bf16 (in bf16 only the products read dℓ, and they read it rounded). Two passes
// over the logits: one for each row's max and sum (online), one to write dℓ.
extern "C" __global__ void head_position(float* logits, const unsigned int* targets, const float* log_w, float* log_p, float* posterior,
                                         unsigned short* rounded_gradient, int v, int n, int r, float inv_count, int gradient) {
    __shared__ float shared[THREADS / 32];
    __shared__ float row_lse[MAX_RANK * MAX_HORIZON];
    __shared__ float row_coef[MAX_RANK];
    long t = blockIdx.x;
    int rn = r * n;
    float* rows = logits + t * rn * v;
    for (int k = 0; k < rn; k++) {
        const float* row = rows + (long)k * v;
        float m = NEG_INF, s = 0.0f;
        for (int j = threadIdx.x; j < v; j += THREADS) {
            float x = row[j];
            if (x > m) {
                s = s * expf(m - x) + 1.0f;
                m = x;
            } else {
                s += expf(x - m);
            }
        }
        float block_max = block_reduce(m, true, shared);
        float block_sum = block_reduce(s * expf(m - block_max), false, shared);
        if (threadIdx.x == 0) {
            float lse = block_max + logf(block_sum);
            row_lse[k] = lse;
            log_p[t * rn + k] = row[targets[t * n + k % n]] - lse;
        }
    }
    if (!gradient) return;
    __syncthreads();
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
    for (int k = 0; k < rn; k++) {
        float* row = rows + (long)k * v;
        float coef = row_coef[k / n], lse = row_lse[k];
        unsigned int y = targets[t * n + k % n];
        if (rounded_gradient != nullptr) {
            unsigned short* out = rounded_gradient + t * rn * v + (long)k * v;
            for (int j = threadIdx.x; j < v; j += THREADS) out[j] = (unsigned short)bf16_bits(coef * expf(row[j] - lse) - (j == y ? coef : 0.0f));
        } else {
            for (int j = threadIdx.x; j < v; j += THREADS) row[j] = coef * expf(row[j] - lse) - (j == y ? coef : 0.0f);
        }
    }
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

// Decoding: each row of V logits becomes its probabilities, in place. One block per row.
extern "C" __global__ void softmax_rows(float* logits, int v) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    __shared__ float shared[THREADS / 32];
    float* row = logits + (long)blockIdx.x * v;
    float lse = block_log_sum_exp(row, v, shared);
    for (int j = threadIdx.x; j < v; j += THREADS) row[j] = expf(row[j] - lse);
}
