// Token and position embeddings: x[b,t] = wte[idx[b,t]] + wpe[t].

extern "C" __global__ void embedding_forward(const unsigned int* idx, const float* wte, const float* wpe, float* out, int rows, int seq, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * c) return;
    int row = i / c, j = i % c;
    out[i] = wte[(long)idx[row] * c + j] + wpe[(long)(row % seq) * c + j];
}

// Decoding: x[row] = wte[idx[row]] + wpe[start + row], start read from device memory (see
// append_kv).
extern "C" __global__ void embedding_forward_at(const unsigned int* idx, const unsigned int* start_at, const float* wte, const float* wpe,
                                                float* out, int rows, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * c) return;
    int row = i / c, j = i % c;
    out[i] = wte[(long)idx[row] * c + j] + wpe[(long)(*start_at + row) * c + j];
}

// dwte[idx[row]] += dout[row]. Rows with the same token collide, hence the atomics (the order
// of the additions, and so the last bits, vary from run to run).
extern "C" __global__ void embedding_backward_tokens(const unsigned int* idx, const float* dout, float* dwte, int rows, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * c) return;
    int row = i / c, j = i % c;
    atomicAdd(&dwte[(long)idx[row] * c + j], dout[i]);
}

// dwpe[t] += Σ_b dout[b,t]: one thread per (t, j), summing over the batch in order.
extern "C" __global__ void embedding_backward_positions(const float* dout, float* dwpe, int batch, int seq, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)seq * c) return;
    float s = 0.0f;
    for (int b = 0; b < batch; b++) s += dout[(long)b * seq * c + i];
    dwpe[i] += s;
}
