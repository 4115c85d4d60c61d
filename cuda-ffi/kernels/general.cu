// The general ops a model is composed from (src/ops/elementwise.rs, reduce.rs, shape.rs,
// softmax.rs of the main crate): elementwise functions, arithmetic with a row or a scalar
// broadcast, sums along an axis, the transpose of the last two axes, softmax along the last
// axis, and their backward passes. Plain kernels: a thread per element, or a block per row.

// Unary ops, their codes OP_NEG … OP_SCALE defined by `Unary` in cuda-ffi/src/general.rs:
// y = f(x); `p` is pow's exponent or scale's factor.

__device__ float unary_value(int op, float x, float p) {
    switch (op) {
        case OP_NEG: return -x;
        case OP_EXP: return expf(x);
        case OP_LOG: return logf(x);
        case OP_TANH: return tanhf(x);
        case OP_RELU: return x > 0.0f ? x : 0.0f;
        case OP_SIGMOID: return 1.0f / (1.0f + expf(-x));
        case OP_POW: return powf(x, p);
        default: return x * p;
    }
}

// f'(x) from x and y = f(x)
__device__ float unary_slope(int op, float x, float y, float p) {
    switch (op) {
        case OP_NEG: return -1.0f;
        case OP_EXP: return y;
        case OP_LOG: return 1.0f / x;
        case OP_TANH: return 1.0f - y * y;
        case OP_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case OP_SIGMOID: return y * (1.0f - y);
        case OP_POW: return p == 0.0f ? 0.0f : p * powf(x, p - 1.0f);
        default: return p;
    }
}

extern "C" __global__ void unary_forward(int op, const float* x, float* y, long n, float p) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = unary_value(op, x[i], p);
}

// dx = dy · f'(x)
extern "C" __global__ void unary_backward(int op, const float* x, const float* y, const float* dy, float* dx, long n, float p) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dx[i] = dy[i] * unary_slope(op, x[i], y[i], p);
}

// Binary ops, OP_ADD … OP_DIV defined by `Binary` in general.rs: out[i] = a[i mod a_len] ∘
// b[i mod b_len], so that either operand may be a row repeated over the output's leading
// dimensions, or a scalar.

extern "C" __global__ void binary_forward(int op, const float* a, long a_len, const float* b, long b_len, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = a[i % a_len], y = b[i % b_len];
    out[i] = op == OP_ADD ? x + y : op == OP_SUB ? x - y : op == OP_MUL ? x * y : x / y;
}

// The gradients with respect to each operand, at the output's full size (the caller sums them
// back over the repeats of a broadcast operand): d(a + b) = (g, g), d(a − b) = (g, −g),
// d(a·b) = (g·b, g·a), d(a/b) = (g/b, −g·a/b²).
extern "C" __global__ void binary_backward(int op, const float* g, const float* a, long a_len, const float* b, long b_len, float* da,
                                           float* db, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = a[i % a_len], y = b[i % b_len], gi = g[i];
    float ga = op == OP_MUL ? gi * y : op == OP_DIV ? gi / y : gi;
    float gb = op == OP_ADD ? gi : op == OP_SUB ? -gi : op == OP_MUL ? gi * x : -gi * x / (y * y);
    if (da) da[i] = ga;
    if (db) db[i] = gb;
}

// out[o, i] = scale · Σ_j x[o, j, i] over an (outer, axis, inner) view: a block per (o, i), its
// threads over j, then a tree over the threads: an order fixed by the shape.
extern "C" __global__ void sum_axis(const float* x, float* out, int outer, int axis, int inner, float scale) {
    __shared__ float partial[THREADS];
    int o = blockIdx.x / inner, i = blockIdx.x - o * inner;
    const float* row = x + (long)o * axis * inner + i;
    float s = 0.0f;
    for (int j = threadIdx.x; j < axis; j += THREADS) s += row[(long)j * inner];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = scale * partial[0];
}

// The backward of sum_axis: out[o, j, i] = scale · g[o, i].
extern "C" __global__ void expand_axis(const float* g, float* out, int outer, int axis, int inner, float scale) {
    long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long)outer * axis * inner) return;
    long i = index % inner, o = index / ((long)axis * inner);
    out[index] = scale * g[o * inner + i];
}

// out (batch, cols, rows) = x (batch, rows, cols) transposed; a thread per element.
extern "C" __global__ void transpose_last(const float* x, float* out, int batch, int rows, int cols) {
    long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long per = (long)rows * cols;
    if (index >= batch * per) return;
    long b = index / per, rest = index - b * per;
    long r = rest / cols, c = rest - r * cols;
    out[b * per + c * rows + r] = x[index];
}

// y = log_softmax(x) of each row of v, a block per row (softmax itself is softmax_rows in head.cu).
extern "C" __global__ void log_softmax_rows(const float* x, float* y, int v) {
    __shared__ float shared[THREADS / 32];
    const float* row = x + (long)blockIdx.x * v;
    float* out = y + (long)blockIdx.x * v;
    float lse = block_log_sum_exp(row, v, shared);
    for (int j = threadIdx.x; j < v; j += THREADS) out[j] = row[j] - lse;
}

// The backward of softmax (y the probabilities): dx = y ⊙ (g − Σ g⊙y); of log_softmax (y the log
// probabilities, `log` = 1): dx = g − exp(y) · Σ g. A block per row.
extern "C" __global__ void softmax_backward_rows(const float* y, const float* g, float* dx, int v, int log) {
    __shared__ float shared[THREADS / 32];
    long base = (long)blockIdx.x * v;
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += THREADS) s += log ? g[base + j] : g[base + j] * y[base + j];
    s = block_reduce(s, false, shared);
    for (int j = threadIdx.x; j < v; j += THREADS) {
        float yj = y[base + j], gj = g[base + j];
        dx[base + j] = log ? gj - expf(yj) * s : yj * (gj - s);
    }
}
