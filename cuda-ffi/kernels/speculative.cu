// The speculative step on the device (docs/decoding.md, "One step"; the host's version is
// src/decode/generate.rs of the main crate): the gate at each new row, the verification of the
// drafts against each row's next-token marginal, and the drafts of the next step from the
// state S it keeps. One block of STEP_THREADS threads walks a whole step, so that the host learns
// only a few numbers: how many drafts were accepted, the token after them, and the next drafts.
//
// Probabilities, not logs, as on the host: a row's marginal is Σ_α w[α] P[α,0], a draft's
// distribution Σ_α π[α] P[α,s]. Sampling tempers a distribution p into p^(1/T) / Σ p^(1/T),
// which is softmax(log p / T); random numbers come from the host, one per decision.

// What the host reads back of a step (`readback`): STEP_ACCEPTED, STEP_NEXT, STEP_NOT_FINITE,
// then the next step's drafts from STEP_DRAFTS on; how sampled drafts are accepted: ACCEPT_EXACT,
// or, for the test that must catch them, ACCEPT_ALWAYS and ACCEPT_RESAMPLE_FROM_TARGET (all from
// cuda-ffi/src/constants.rs).

// p^(1/T) relative to the distribution's largest entry, (p / p_max)^(1/T), so that a low
// temperature cannot underflow every entry to 0 (the host subtracts the largest log too); 0
// stays 0. At T = 1, p itself.
__device__ float tempered(float p, float log_max, float inv_temperature) {
    if (inv_temperature == 1.0f) return p;
    return p > 0.0f ? expf((logf(p) - log_max) * inv_temperature) : 0.0f;
}

// p[0..v) tempered in place, each entry p^(1/T) relative to the largest (`best`: each thread's
// largest entry, the block's taken here), by a block of STEP_THREADS threads; returns the sum
// of the tempered entries (every thread gets it). `shared` holds one float per warp.
__device__ float temper_in_place(float* p, int v, float best, float inv_temperature, float* shared) {
    float log_max = logf(block_reduce(best, true, shared));
    float total = 0.0f;
    for (int i = threadIdx.x; i < v; i += STEP_THREADS) {
        p[i] = tempered(p[i], log_max, inv_temperature);
        total += p[i];
    }
    return block_reduce(total, false, shared);
}

// (value, index) of the largest of a warp's (value, index), the lowest index among equals;
// every lane gets it.
__device__ void warp_argmax(float* value, int* index) {
    for (int offset = 16; offset > 0; offset /= 2) {
        float other = __shfl_xor_sync(0xffffffff, *value, offset);
        int other_index = __shfl_xor_sync(0xffffffff, *index, offset);
        if (other > *value || (other == *value && other_index < *index)) {
            *value = other;
            *index = other_index;
        }
    }
}

// The index of the largest of each thread's (value, index), the lowest index among equals, as
// the host's argmax; every thread gets it. The warps' winners meet in warp 0. `values` and
// `indices` hold one entry per warp (STEP_THREADS / 32 ≤ 32).
__device__ int block_argmax(float value, int index, float* values, int* indices) {
    warp_argmax(&value, &index);
    __syncthreads();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        values[warp] = value;
        indices[warp] = index;
    }
    __syncthreads();
    if (warp == 0) {
        bool held = lane < blockDim.x / 32;
        value = held ? values[lane] : NEG_INF;
        index = held ? indices[lane] : 0x7fffffff;
        warp_argmax(&value, &index);
        if (lane == 0) indices[0] = index;
    }
    __syncthreads();
    return indices[0];
}

// The mixture Σ_α weight[α] · p[α·v + i] of r rows of v probabilities at every entry i, each
// sum in the order of α, by a block of STEP_THREADS threads: thread t takes entries
// t·width … t·width + width − 1, then those STEP_THREADS·width further on, and so on (width 4
// where v and p allow float4 loads, else 1: fewer instructions for the one SM a step runs on).
// Each thread keeps its largest sum and, among equals, the lowest index (`best`, `best_index`),
// and adds its sums to `mass`; every sum goes to `out` unless it is null. Returns whether the
// thread's sums were all finite.
__device__ bool mixture_row(const float* p, const float* weight, int r, int v, int width, float* out, float* best, int* best_index,
                            float* mass) {
    bool finite = true;
    for (int i0 = threadIdx.x * width; i0 < v; i0 += STEP_THREADS * width) {
        float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (width == 4) {
#pragma unroll 4
            for (int a = 0; a < r; a++) {
                float wa = weight[a];
                float4 pa = __ldg((const float4*)(p + (long)a * v + i0));
                sums[0] += wa * pa.x;
                sums[1] += wa * pa.y;
                sums[2] += wa * pa.z;
                sums[3] += wa * pa.w;
            }
        } else {
            for (int a = 0; a < r; a++) sums[0] += weight[a] * p[(long)a * v + i0];
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (e < width) {
                finite &= isfinite(sums[e]);
                *mass += sums[e];
                if (sums[e] > *best) {
                    *best = sums[e];
                    *best_index = i0 + e;
                }
                if (out != nullptr) out[i0 + e] = sums[e];
            }
        }
    }
    return finite;
}

// A draw from weights[0..v) (not normalised) with the uniform u: the first index whose running
// sum passes u·Σ weights, else (rounding) the last index with weight. By the whole block of
// STEP_THREADS threads, so that the draw waits for memory about twice, not once per entry a
// thread walks: thread t sums a contiguous chunk of the entries, a scan over the block gives the
// running sum before each chunk (and the total), and the first chunk with weight whose end
// passes the target takes the draw: the thread walks it entry by entry. A chunk's end (its start
// plus its sum) and the next chunk's start are added in different orders and may differ in the
// last bits, so a target can fall between them, or short of the end of a chunk that claims it:
// the first case draws the next chunk's first entry with weight, the second the chunk's last;
// either way the mass moved is of the order of f32 rounding and goes to a neighbour. Every
// thread gets the index. The weights may have just been written by other threads of the block.
#define DRAW_LOADS 8

// weights[i0 … i0 + DRAW_LOADS), all loads in flight together; 0 from `last` on.
__device__ __forceinline__ void load_draw_run(float (&loaded)[DRAW_LOADS], const float* weights, int i0, int last) {
#pragma unroll
    for (int e = 0; e < DRAW_LOADS; e++) loaded[e] = i0 + e < last ? weights[i0 + e] : 0.0f;
}

__device__ int block_draw(const float* weights, int v, float u, int* chosen) {
    __shared__ float warp_sums[STEP_THREADS / 32];
    __shared__ int last_with_weight;
    __syncthreads();  // the weights are written, and the previous draw's shared values read
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int chunk = (v + STEP_THREADS - 1) / STEP_THREADS;
    int first = min(v, threadIdx.x * chunk), last = min(v, first + chunk);
    float s = 0.0f;
    int first_with_weight = -1, with_weight = -1;
    for (int i0 = first; i0 < last; i0 += DRAW_LOADS) {
        float loaded[DRAW_LOADS];
        load_draw_run(loaded, weights, i0, last);
#pragma unroll
        for (int e = 0; e < DRAW_LOADS; e++) {
            s += loaded[e];
            if (loaded[e] > 0.0f) {
                if (first_with_weight < 0) first_with_weight = i0 + e;
                with_weight = i0 + e;
            }
        }
    }
    // the running sum to the end of each thread's chunk: within the warp by shuffles, then the
    // warps' totals scanned by warp 0
    float through = warp_inclusive_sum(s);
    float before = __shfl_up_sync(0xffffffff, through, 1);
    if (lane == 0) before = 0.0f;
    if (threadIdx.x == 0) {
        *chosen = v;
        last_with_weight = -1;
    }
    if (lane == 31) warp_sums[warp] = through;
    __syncthreads();
    atomicMax(&last_with_weight, with_weight);
    if (warp == 0) {
        float total = warp_inclusive_sum(lane < warps ? warp_sums[lane] : 0.0f);
        if (lane < warps) warp_sums[lane] = total;
    }
    __syncthreads();
    float running = (warp > 0 ? warp_sums[warp - 1] : 0.0f) + before;
    float target = u * warp_sums[warps - 1];
    int claim = v;
    if (with_weight >= 0 && running + s > target) {
        claim = first_with_weight;
        if (running <= target) {
            claim = with_weight;
            for (int i0 = first; i0 < last && claim == with_weight; i0 += DRAW_LOADS) {
                float loaded[DRAW_LOADS];
                load_draw_run(loaded, weights, i0, last);
#pragma unroll
                for (int e = 0; e < DRAW_LOADS; e++) {
                    running += loaded[e];
                    if (running > target && i0 + e < claim) claim = i0 + e;
                }
            }
        }
    }
    // the lowest claim: a warp's by shuffles, then the block's
    for (int offset = 16; offset > 0; offset /= 2) claim = min(claim, __shfl_xor_sync(0xffffffff, claim, offset));
    if (lane == 0 && claim < v) atomicMin(chosen, claim);
    __syncthreads();
    int index = *chosen;
    return index < v ? index : max(last_with_weight, 0);
}

// The gate at each of m rows of h (m, C), one block a row: w = softmax(G h + g) (m, r); w = 1
// without a gate (r = 1). Thread t takes entries t, t + THREADS, … of h against every
// component's row of G, so that all of a thread's loads are in flight together; the warps'
// sums then meet in order.
extern "C" __global__ void decode_gate(const float* hidden, const float* gate_weight, const float* gate_bias, float* w, int c, int r) {
    __shared__ float warp_logits[MAX_RANK][THREADS / 32];
    __shared__ float logits[MAX_RANK];
    let_next_kernel_start();
    wait_for_previous_kernel();
    const float* h = hidden + (long)blockIdx.x * c;
    if (gate_weight == nullptr) {
        if (threadIdx.x == 0) w[blockIdx.x] = 1.0f;
        return;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float s[MAX_RANK];
#pragma unroll
    for (int a = 0; a < MAX_RANK; a++) s[a] = 0.0f;
    for (int j = threadIdx.x; j < c; j += THREADS) {
        float hj = h[j];
#pragma unroll
        for (int a = 0; a < MAX_RANK; a++)
            if (a < r) s[a] += __ldg(gate_weight + (long)a * c + j) * hj;
    }
#pragma unroll
    for (int a = 0; a < MAX_RANK; a++) {
        if (a < r) {
            float total = warp_sum(s[a]);
            if (lane == 0) warp_logits[a][warp] = total;
        }
    }
    __syncthreads();
    if (threadIdx.x < r) {
        float total = gate_bias[threadIdx.x];
        for (int v = 0; v < THREADS / 32; v++) total += warp_logits[threadIdx.x][v];
        logits[threadIdx.x] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = NEG_INF;
        for (int a = 0; a < r; a++) m = fmaxf(m, logits[a]);
        float total = 0.0f;
        for (int a = 0; a < r; a++) total += expf(logits[a] - m);
        for (int a = 0; a < r; a++) w[(long)blockIdx.x * r + a] = expf(logits[a] - m) / total;
    }
}

// Steps 3–4 of a step over a run of m tokens c, d_1, …, d_{m−1} (their ids in `rows`, the
// pass's table of (token, sequence, position)), by one block. Row j's marginal
// p_j = Σ_α w[j,α] P[j,α,0] (P: `probs` (m, r, V), each row a softmax) verifies d_{j+1}: greedy,
// d_{j+1} must be p_j's argmax; sampling, d_{j+1} is kept with probability
// min(1, p_j(d)/q_j(d)), q_j (`draft_q`, (n − 1, V)) the distribution it was drawn from, and a
// rejection draws from normalise(max(0, p_j − q_j)). The first rejected row k, or the last row,
// chooses the next token. Then S becomes row k: its hidden state into `s_hidden` (C) and the
// drafts' first posterior π[α] = w[k,α] P[k,α,0](next) into `posterior` (r).
// With forced ≥ 0 (m = 1, priming S after a prefill) nothing is verified: next = forced.
// uniforms: [0, n − 1) the acceptance tests, [n − 1] the draw of the next token.
extern "C" __global__ void __launch_bounds__(STEP_THREADS) speculative_verify(const float* probs, const float* w, const unsigned int* rows, float* draft_q,
                                              const float* uniforms, const float* hidden, float* s_hidden, float* posterior, float* work,
                                              unsigned int* readback, int m, int v, int r, int c, int n, int greedy, float inv_temperature,
                                              int rule, int forced, int width) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    __shared__ float warp_values[STEP_THREADS / 32];
    __shared__ int warp_indices[STEP_THREADS / 32];
    __shared__ int chosen;
    int k = 0, next = forced, not_finite = 0;
    for (int j = 0; j < m && forced < 0; j++) {
        // the previous row's reads of `work` are done before this row writes it
        __syncthreads();
        const float* p = probs + (long)j * r * v;
        // the marginal; greedy: its argmax; sampling: its largest entry, to temper against
        float best = NEG_INF, mass = 0.0f;
        int best_index = 0;
        bool finite = mixture_row(p, w + (long)j * r, r, v, width, greedy ? nullptr : work, &best, &best_index, &mass);
        int bad = __syncthreads_or(!finite);
        bool last = j == m - 1;
        unsigned int draft = last ? 0 : rows[3 * (j + 1)];
        k = j;
        if (greedy) {
            next = block_argmax(best, best_index, warp_values, warp_indices);
            if (!last && (unsigned int)next == draft) continue;
        } else {
            // at T = 1 the marginal stays as it is, its total the sum of its entries
            float total = inv_temperature == 1.0f ? block_reduce(mass, false, warp_values)
                                                  : temper_in_place(work, v, best, inv_temperature, warp_values);
            const float* drawn_from = work;
            if (!last) {
                float* q = draft_q + (long)j * v;
                float ratio = (work[draft] / total) / q[draft];
                if (rule == ACCEPT_ALWAYS || uniforms[j] < fminf(1.0f, ratio)) continue;
                if (rule == ACCEPT_EXACT) {
                    // the residual max(0, p − q), written over q's row (no later step reads it)
                    // once every thread has read q(d); where it has no mass, p itself
                    __syncthreads();
                    float residual_total = 0.0f;
                    for (int i = threadIdx.x; i < v; i += STEP_THREADS) {
                        float residual = fmaxf(0.0f, work[i] / total - q[i]);
                        q[i] = residual;
                        residual_total += residual;
                    }
                    if (block_reduce(residual_total, false, warp_values) > 0.0f) drawn_from = q;
                }
            }
            next = block_draw(drawn_from, v, uniforms[n - 1], &chosen);
        }
        not_finite = bad;
        break;
    }
    // S is row k
    for (int i = threadIdx.x; i < c; i += STEP_THREADS) s_hidden[i] = hidden[(long)k * c + i];
    if (threadIdx.x < r) posterior[threadIdx.x] = w[(long)k * r + threadIdx.x] * probs[((long)k * r + threadIdx.x) * v + next];
    if (threadIdx.x == 0) {
        readback[STEP_ACCEPTED] = k;
        readback[STEP_NEXT] = next;
        readback[STEP_NOT_FINITE] = not_finite;
    }
}

// Step 1 of the next step, by one block: `count` drafts after the token just chosen, from S's
// distributions P[α,s] (`probs_s`, (count, r, V), horizons 1..count) and the posterior π that
// speculative_verify left: q_s = Σ_α π[α] P[α,s] with π normalised, d_s its argmax (greedy) or
// a draw from q_s tempered (kept in `draft_q` for the acceptance test; at T = 1 as the mixture
// is written, not divided by its sum, which is 1 up to rounding), then π[α] *= P[α,s](d_s).
// top_component: π is one-hot at its largest entry (the top-component draft, whose horizons
// draft independently). uniforms: one per draft. The drafts go to readback[STEP_DRAFTS..].
extern "C" __global__ void __launch_bounds__(STEP_THREADS) speculative_draft(const float* probs_s, const float* posterior, const float* uniforms, float* draft_q,
                                             unsigned int* readback, int count, int v, int r, int greedy, float inv_temperature,
                                             int top_component, int width) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    __shared__ float warp_values[STEP_THREADS / 32];
    __shared__ int warp_indices[STEP_THREADS / 32];
    __shared__ float pi[MAX_RANK];
    __shared__ int chosen;
    // thread α < r reads (and, each draft, updates) π[α], so that the r loads wait together
    if (threadIdx.x < r) pi[threadIdx.x] = posterior[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0 && top_component) {
        int top = 0;
        for (int a = 0; a < r; a++)
            if (pi[a] > pi[top]) top = a;
        for (int a = 0; a < r; a++) pi[a] = a == top ? 1.0f : 0.0f;
    }
    for (int s = 0; s < count; s++) {
        if (threadIdx.x == 0) {
            float total = 0.0f;
            for (int a = 0; a < r; a++) total += pi[a];
            for (int a = 0; a < r; a++) pi[a] = total > 0.0f ? pi[a] / total : 1.0f / r;
        }
        __syncthreads();
        const float* p = probs_s + (long)s * r * v;
        float* q = draft_q + (long)s * v;
        float best = NEG_INF, mass = 0.0f;
        int best_index = 0;
        mixture_row(p, pi, r, v, width, greedy ? nullptr : q, &best, &best_index, &mass);
        int d;
        if (greedy) {
            d = block_argmax(best, best_index, warp_values, warp_indices);
        } else {
            // at T = 1, q stays the mixture as written: softmax rows weighted by a normalised π
            // sum to 1 up to f32 rounding. Else tempered and normalised (temper_in_place reads q
            // only after its reduction's barriers; each thread then divides the entries it wrote).
            if (inv_temperature != 1.0f) {
                float total = temper_in_place(q, v, best, inv_temperature, warp_values);
                for (int i = threadIdx.x; i < v; i += STEP_THREADS) q[i] /= total;
            }
            d = block_draw(q, v, uniforms[s], &chosen);
        }
        if (threadIdx.x == 0) readback[STEP_DRAFTS + s] = d;
        if (threadIdx.x < r) pi[threadIdx.x] *= p[(long)threadIdx.x * v + d];
        __syncthreads();
    }
}
