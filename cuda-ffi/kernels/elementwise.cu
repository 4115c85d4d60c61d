// Elementwise kernels. Compiled at run time by NVRTC (see src/lib.rs); the math is the CPU
// version's (src/kernels/gelu.rs of the main crate, docs/math.md eq. G1 and G2).

extern "C" __global__ void gelu_forward(const float* x, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        out[i] = 0.5f * v * (1.0f + tanhf(u));
    }
}

// dx += dout * gelu'(x)
extern "C" __global__ void gelu_backward(const float* x, const float* dout, float* dx, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        float t = tanhf(u);
        float local = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * v * v);
        dx[i] += dout[i] * local;
    }
}
