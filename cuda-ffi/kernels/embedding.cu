// Token and position embeddings: x[b,t] = wte[idx[b,t]] + wpe[offset + t] (docs/math.md E1).

extern "C" __global__ void embedding_forward(const unsigned int* idx, const float* wte, const float* wpe, float* out, int rows, int seq,
                                             int offset, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * c) return;
    int row = i / c, j = i % c;
    out[i] = wte[(long)idx[row] * c + j] + wpe[(long)(offset + row % seq) * c + j];
}

// Decoding: x[row] = wte[token] + wpe[position] for new rows given as (token id, sequence,
// position) in device memory (see decode_attention).
extern "C" __global__ void embedding_forward_at(const unsigned int* new_rows, const float* wte, const float* wpe, float* out, int rows,
                                                int c) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * c) return;
    int row = i / c, j = i % c;
    out[i] = wte[(long)new_rows[3 * row] * c + j] + wpe[(long)new_rows[3 * row + 2] * c + j];
}

// dwte[v] += Σ dout[row] over the rows whose token is v, without atomics: the host groups the
// rows by token (`order` lists the rows token by token, in row order within a token; token
// group g is order[starts[g]] .. order[starts[g + 1]] with token tokens[g]), and block
// (g, column chunk) adds group g's rows in that order.
extern "C" __global__ void embedding_backward_tokens(const unsigned int* order, const unsigned int* starts, const unsigned int* tokens,
                                                     const float* dout, float* dwte, int c) {
    int group = blockIdx.x;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.0f;
    for (unsigned int k = starts[group]; k < starts[group + 1]; k++) s += dout[(long)order[k] * c + j];
    dwte[(long)tokens[group] * c + j] += s;
}

// dwpe[offset + t] += Σ_b dout[b,t]: one thread per (t, j), summing over the batch in order.
extern "C" __global__ void embedding_backward_positions(const float* dout, float* dwpe, int batch, int seq, int offset, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)seq * c) return;
    float s = 0.0f;
    for (int b = 0; b < batch; b++) s += dout[(long)b * seq * c + i];
    dwpe[(long)offset * c + i] += s;
}
