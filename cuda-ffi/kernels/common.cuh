// Prepended to every kernel file before NVRTC compiles it (cuda-ffi/src/lib.rs, `compile`).

// NVRTC has no math.h, so no INFINITY
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)
#define NEG_INF_F64 __longlong_as_double(0xfff0000000000000LL)

// Programmatic dependent launch (cuda-ffi/src/device.rs, `EarlyLaunch`). A kernel launched early
// may start while the kernel before it still runs: it waits here, before it reads anything a
// kernel before it wrote or writes anything itself, until those kernels have finished and their
// writes are visible. And a kernel lets the one after it be placed as soon as each of its blocks
// has begun. Before compute capability 9.0, and after an ordinary launch, neither does anything.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asks for the L2's line holding `address` (global memory) without waiting for it.
#define L2_LINE 128
__device__ __forceinline__ void prefetch_to_l2(const void* address) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
}

__device__ __forceinline__ void let_next_kernel_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Over groups of `lanes` neighbouring lanes of a warp (a power of two; the whole warp by
// default), by shuffles; every lane gets its group's result.
__device__ float warp_max(float v, int lanes = 32) {
    for (int offset = lanes / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

__device__ float warp_sum(float v, int lanes = 32) {
    for (int offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// The sum of v over lanes 0 … l of each lane l (an inclusive scan), by shuffles.
__device__ float warp_inclusive_sum(float v) {
    int lane = threadIdx.x % 32;
    for (int offset = 1; offset < 32; offset *= 2) {
        float below = __shfl_up_sync(0xffffffff, v, offset);
        if (lane >= offset) v += below;
    }
    return v;
}

// The maximum (or sum) over a whole block of whole warps; every thread gets it. `shared` holds
// one float per warp.
__device__ float block_reduce(float v, bool take_max, float* shared) {
    v = take_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    v = shared[0];
    for (int w = 1; w < blockDim.x / 32; w++) v = take_max ? fmaxf(v, shared[w]) : v + shared[w];
    return v;
}

// log Σ_j exp(row[j]) over a row of v by the whole block, from the row's maximum so that no
// exponential overflows; every thread gets it. `shared` holds one float per warp.
__device__ float block_log_sum_exp(const float* row, int v, float* shared) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += THREADS) m = fmaxf(m, row[j]);
    m = block_reduce(m, true, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += THREADS) s += expf(row[j] - m);
    return m + logf(block_reduce(s, false, shared));
}

// GELU, tanh approximation (docs/math.md G1), as GPT-2 has it
#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
__device__ float gelu(float v) {
    float u = GELU_SCALE * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
}

// A row's mean and 1/sqrt(variance + 1e-5) (docs/math.md LN1) by one warp, in two passes over
// the row; every lane gets both.
__device__ void warp_row_statistics(const float* xr, int c, float* mean, float* rstd) {
    int lane = threadIdx.x % 32;
    // (unrolled so that a lane's loads are in flight together; the sums keep their order)
    float s = 0.0f;
#pragma unroll 8
    for (int j = lane; j < c; j += 32) s += xr[j];
    float m = warp_sum(s) / c;
    float v = 0.0f;
#pragma unroll 8
    for (int j = lane; j < c; j += 32) { float d = xr[j] - m; v += d * d; }
    *mean = m;
    *rstd = rsqrtf(warp_sum(v) / c + 1e-5f);
}

// Which of `segments` tensors block `block` works on, when tensor s has blocks
// first_block[s] .. first_block[s + 1] (many tensors in one launch: AdamW, sums of squares).
__device__ int segment_of(const int* first_block, int segments, int block) {
    int lo = 0, hi = segments;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (first_block[mid] <= block) lo = mid; else hi = mid;
    }
    return lo;
}

// The bits of v rounded to bf16: to nearest, ties to even; a NaN stays a NaN (quiet), an
// infinity stays infinite, and a finite value past bf16's largest rounds to infinity.
__device__ unsigned int bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Two floats rounded to bf16, two to a word, the first in the lower half
__device__ __forceinline__ unsigned int bf16x2_bits(float lo, float hi) {
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
}

// Four floats rounded to bf16, as bf16x4_values reads them
__device__ __forceinline__ uint2 bf16x4_bits(float4 v) {
    return make_uint2(bf16x2_bits(v.x, v.y), bf16x2_bits(v.z, v.w));
}

// The f32 that a bf16 stands for, given its bits (exact)
__device__ __forceinline__ float bf16_value(unsigned int bits) {
    return __uint_as_float(bits << 16);
}

// Four bf16s, two to a word, the first in the lower half (as round_to_bf16 writes them), as f32s
__device__ __forceinline__ float4 bf16x4_values(uint2 quad) {
    return make_float4(bf16_value(quad.x), __uint_as_float(quad.x & 0xffff0000u), bf16_value(quad.y), __uint_as_float(quad.y & 0xffff0000u));
}
