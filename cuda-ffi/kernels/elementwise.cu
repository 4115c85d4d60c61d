// Elementwise and row/column kernels. Compiled at run time by NVRTC (see src/lib.rs); the math
// is the CPU version's (src/kernels/gelu.rs of the main crate, docs/math.md eq. G1 and G2).

extern "C" __global__ void gelu_forward(const float* x, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = gelu(x[i]);
}

// dx = dout * gelu'(x)
extern "C" __global__ void gelu_backward(const float* x, const float* dout, float* dx, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        float u = GELU_SCALE * (v + 0.044715f * v * v * v);
        float t = tanhf(u);
        float local = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * v * v);
        dx[i] = dout[i] * local;
    }
}

// out = a + b (the residual connection)
extern "C" __global__ void add(const float* a, const float* b, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// out[row, j] = bias[j] for every row: the starting value of a linear layer's output
// one block row per output row, so no division per element
extern "C" __global__ void broadcast_rows(const float* bias, float* out, long rows, int cols) {
    long row = blockIdx.y * (long)gridDim.x + blockIdx.x;
    if (row >= rows) return;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) out[row * cols + j] = bias[j];
}

// sums[j] += Σ_rows x[row, j]. Block (32, 32) over 32 columns and a chunk of 256 rows:
// threadIdx.x picks the column, threadIdx.y strides over the chunk's rows; the block's 32
// partial sums are added in shared memory, then once into sums (atomically: chunks race).
#define COLUMN_SUM_CHUNK 256
extern "C" __global__ void column_sums_add(const float* x, float* sums, int rows, int cols) {
    __shared__ float partial[32][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int first = blockIdx.y * COLUMN_SUM_CHUNK;
    int last = min(first + COLUMN_SUM_CHUNK, rows);
    float s = 0.0f;
    if (col < cols) {
        for (int row = first + threadIdx.y; row < last; row += 32) s += x[(long)row * cols + col];
    }
    partial[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float total = 0.0f;
        for (int k = 0; k < 32; k++) total += partial[k][threadIdx.x];
        atomicAdd(&sums[col], total);
    }
}

// *total += Σ x[i]² in f64 (gradient clipping); blocks reduce in shared memory, then one atomic each
extern "C" __global__ void sum_of_squares(const float* x, long n, double* total) {
    __shared__ double partial[256];
    double s = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = x[i];
        s += v * v;
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(total, partial[0]);
}
