// Elementwise and reduction kernels. Compiled at run time by NVRTC (cuda-ffi/src/device.rs); the
// math is the CPU version's (src/kernels/gelu.rs of the main crate, docs/math.md eq. G1 and G2).
//
// Every reduction here adds in an order fixed by the sizes alone: a block's partial sum by a
// fixed tree, the blocks' partial sums in block order by a second kernel (or by the host). No
// atomics, so the same inputs give the same bits on every run.

// gelu, add and scale take four neighbouring elements a thread (`first_of_four`), as float4s
// where every buffer starts on 16 bytes (the pool's do; a view into one may not), so that each
// thread has several loads in flight; a thread past the last whole four takes the rest singly.
__device__ long first_of_four() {
    return 4 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
}

__device__ bool on_16_bytes(const void* a, const void* b, const void* c = nullptr) {
    return (((unsigned long long)a | (unsigned long long)b | (unsigned long long)c) & 15) == 0;
}

__device__ float4 load4(const float* p, long i) {
    return *reinterpret_cast<const float4*>(p + i);
}

__device__ void store4(float* p, long i, float4 v) {
    *reinterpret_cast<float4*>(p + i) = v;
}

// gelu'(v), the derivative of docs/math.md G1
__device__ float gelu_derivative(float v) {
    float u = GELU_SCALE * (v + 0.044715f * v * v * v);
    float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * v * v);
}

extern "C" __global__ void gelu_forward(const float* x, float* out, long n) {
    long first = first_of_four();
    if (first + 4 <= n && on_16_bytes(x, out)) {
        float4 v = load4(x, first);
        store4(out, first, make_float4(gelu(v.x), gelu(v.y), gelu(v.z), gelu(v.w)));
    } else {
        for (long i = first; i < min(first + 4, n); i++) out[i] = gelu(x[i]);
    }
}

// dx = dout * gelu'(x)
extern "C" __global__ void gelu_backward(const float* x, const float* dout, float* dx, long n) {
    long first = first_of_four();
    if (first + 4 <= n && on_16_bytes(x, dout, dx)) {
        float4 v = load4(x, first), d = load4(dout, first);
        store4(dx, first,
               make_float4(d.x * gelu_derivative(v.x), d.y * gelu_derivative(v.y), d.z * gelu_derivative(v.z), d.w * gelu_derivative(v.w)));
    } else {
        for (long i = first; i < min(first + 4, n); i++) dx[i] = dout[i] * gelu_derivative(x[i]);
    }
}

// gelu_forward that also writes x and out rounded to bf16: in bf16 training the backward keeps
// only that rounding of x (half its bytes), and the next product reads out's
extern "C" __global__ void gelu_forward_keeping_bf16(const float* x, float* out, unsigned short* x_rounded, unsigned short* out_rounded,
                                                     long n) {
    long first = first_of_four();
    if (first + 4 <= n && on_16_bytes(x, out) && (((unsigned long long)x_rounded | (unsigned long long)out_rounded) & 7) == 0) {
        float4 v = load4(x, first);
        float4 y = make_float4(gelu(v.x), gelu(v.y), gelu(v.z), gelu(v.w));
        store4(out, first, y);
        *reinterpret_cast<uint2*>(x_rounded + first) = bf16x4_bits(v);
        *reinterpret_cast<uint2*>(out_rounded + first) = bf16x4_bits(y);
    } else {
        for (long i = first; i < min(first + 4, n); i++) {
            float y = gelu(x[i]);
            out[i] = y;
            x_rounded[i] = (unsigned short)bf16_bits(x[i]);
            out_rounded[i] = (unsigned short)bf16_bits(y);
        }
    }
}

// dx = dout * gelu'(x), x given rounded to bf16 (as gelu_forward_keeping_bf16 wrote it)
extern "C" __global__ void gelu_backward_from_bf16(const unsigned short* x_rounded, const float* dout, float* dx, long n) {
    long first = first_of_four();
    if (first + 4 <= n && on_16_bytes(dout, dx) && ((unsigned long long)x_rounded & 7) == 0) {
        float4 v = bf16x4_values(*reinterpret_cast<const uint2*>(x_rounded + first));
        float4 d = load4(dout, first);
        store4(dx, first,
               make_float4(d.x * gelu_derivative(v.x), d.y * gelu_derivative(v.y), d.z * gelu_derivative(v.z), d.w * gelu_derivative(v.w)));
    } else {
        for (long i = first; i < min(first + 4, n); i++) dx[i] = dout[i] * gelu_derivative(bf16_value(x_rounded[i]));
    }
}

// out = a + b (the residual connection; out may be a or b)
extern "C" __global__ void add(const float* a, const float* b, float* out, long n) {
    long first = first_of_four();
    if (first + 4 <= n && on_16_bytes(a, b, out)) {
        float4 u = load4(a, first), v = load4(b, first);
        store4(out, first, make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w));
    } else {
        for (long i = first; i < min(first + 4, n); i++) out[i] = a[i] + b[i];
    }
}

// out = a · s (out may be a)
extern "C" __global__ void scale(const float* a, float s, float* out, long n) {
    long first = first_of_four();
    if (first + 4 <= n && on_16_bytes(a, out)) {
        float4 u = load4(a, first);
        store4(out, first, make_float4(u.x * s, u.y * s, u.z * s, u.w * s));
    } else {
        for (long i = first; i < min(first + 4, n); i++) out[i] = a[i] * s;
    }
}

// out[row, j] = bias[j] for every row: the starting value of a linear layer's output.
// One block per output row, so no division per element.
extern "C" __global__ void broadcast_rows(const float* bias, float* out, long rows, int cols) {
    long row = blockIdx.y * (long)gridDim.x + blockIdx.x;
    if (row >= rows) return;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) out[row * cols + j] = bias[j];
}

// Column sums, first pass: partials[chunk, j] = Σ x[row, j] over the chunk's COLUMN_SUM_CHUNK
// rows. Block (32, 32) over 32 columns of one chunk: threadIdx.x picks the column, threadIdx.y
// strides over the chunk's rows, and the 32 partial sums of a column are added in order. Where
// `rounded` is not null, each element read is also written there rounded to bf16 (a linear
// layer's upstream gradient in bf16: its bias's gradient and its products' input in one pass).
extern "C" __global__ void column_partial_sums(const float* x, float* partials, unsigned short* rounded, int rows, int cols) {
    __shared__ float partial[32][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int first = blockIdx.y * COLUMN_SUM_CHUNK;
    int last = min(first + COLUMN_SUM_CHUNK, rows);
    float s = 0.0f;
    if (col < cols) {
        for (int row = first + threadIdx.y; row < last; row += 32) {
            float v = x[(long)row * cols + col];
            s += v;
            if (rounded != nullptr) rounded[(long)row * cols + col] = (unsigned short)bf16_bits(v);
        }
    }
    partial[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float total = 0.0f;
        for (int k = 0; k < 32; k++) total += partial[k][threadIdx.x];
        partials[(long)blockIdx.y * cols + col] = total;
    }
}

// Column sums, second pass: sums[j] (+)= Σ_chunk partials[chunk, j], chunks in order; rows of
// the partials are `ld` floats apart (LayerNorm's backward keeps dw's and db's side by side).
extern "C" __global__ void column_sums_finish(const float* partials, float* sums, int chunks, int cols, long ld, int accumulate) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    float total = 0.0f;
    for (int k = 0; k < chunks; k++) total += partials[(long)k * ld + col];
    sums[col] = accumulate ? sums[col] + total : total;
}

// A block's sum of THREADS doubles in shared memory, by a fixed tree; thread 0 gets it.
__device__ double block_sum_f64(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    return shared[0];
}

// Σ x[i]·y[i] (or Σ x[i]² when y is null) over chunks of REDUCE_CHUNK elements of several
// tensors at once, in f64: tensor s has `lengths[s]` elements at `x[s]` (and `y[s]`), and its
// chunks are blocks first_block[s] .. first_block[s + 1]; block b writes its chunk's sum to
// partials[b]. The caller adds the partials in order.
extern "C" __global__ void chunk_dots(const unsigned long long* x, const unsigned long long* y, const long* lengths,
                                      const int* first_block, int tensors, double* partials) {
    __shared__ double shared[THREADS];
    int block = blockIdx.x, lo = segment_of(first_block, tensors, block);
    const float* a = reinterpret_cast<const float*>(x[lo]);
    const float* b = y ? reinterpret_cast<const float*>(y[lo]) : a;
    long start = (long)(block - first_block[lo]) * REDUCE_CHUNK;
    long end = min(start + (long)REDUCE_CHUNK, lengths[lo]);
    double s = 0.0;
    for (long i = start + threadIdx.x; i < end; i += THREADS) s += (double)a[i] * (double)b[i];
    double total = block_sum_f64(s, shared);
    if (threadIdx.x == 0) partials[block] = total;
}

// out = x rounded to bf16 (common.cuh, bf16_bits), as the bits of each bf16: the inputs of the
// bf16 tensor-core products (`--precision bf16`). Two elements per thread when x and out are
// aligned for it (the pair is read as a float2, written as one word).

extern "C" __global__ void round_to_bf16(const float* x, unsigned short* out, long n) {
    long pair = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long i = 2 * pair;
    bool aligned = ((unsigned long long)x % 8 == 0) && ((unsigned long long)out % 4 == 0);
    if (aligned && i + 1 < n) {
        float2 v = reinterpret_cast<const float2*>(x)[pair];
        reinterpret_cast<unsigned int*>(out)[pair] = bf16x2_bits(v.x, v.y);
    } else {
        if (i < n) out[i] = (unsigned short)bf16_bits(x[i]);
        if (i + 1 < n) out[i + 1] = (unsigned short)bf16_bits(x[i + 1]);
    }
}

// out = x for x given as bf16 bits, each the f32 it stands for (the bits' upper half): the f32
// elements of a tensor that a product wrote in bf16 alone. Four elements per thread when both
// are aligned for it.
extern "C" __global__ void widen_bf16(const unsigned short* x, float* out, long n) {
    long first = first_of_four();
    if (first + 4 <= n && ((unsigned long long)x & 7) == 0 && ((unsigned long long)out & 15) == 0) {
        store4(out, first, bf16x4_values(*reinterpret_cast<const uint2*>(x + first)));
    } else {
        for (long i = first; i < min(first + 4, n); i++) out[i] = bf16_value(x[i]);
    }
}
