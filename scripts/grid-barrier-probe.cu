// How long a grid-wide barrier takes on this GPU (a persistent kernel's alternative to a launch),
// against an empty kernel's launch in a CUDA graph, 2000 of each (docs/results.md, "Decoding on
// the GPU"). Build and run where nvcc is:
//   nvcc -O3 -arch=sm_90 scripts/grid-barrier-probe.cu -o grid-barrier-probe && ./grid-barrier-probe
// The barrier is an arrival counter and a generation flag; every block must be resident at once,
// so the grids stay within what the SMs hold.
#include <cstdio>
#include <cuda_runtime.h>

__device__ unsigned int arrived;
__device__ volatile unsigned int generation;

__device__ void grid_barrier(unsigned int blocks) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int gen = generation;
        __threadfence();
        if (atomicAdd(&arrived, 1) == blocks - 1) {
            arrived = 0;
            __threadfence();
            generation = gen + 1;
        } else {
            while (generation == gen) { }
        }
        __threadfence();
    }
    __syncthreads();
}

__global__ void barriers(int count, float* sink) {
    float acc = 0;
    for (int i = 0; i < count; i++) {
        acc += sink[(blockIdx.x + i) % 64];
        grid_barrier(gridDim.x);
    }
    if (acc == 12345.f) sink[0] = acc;
}

__global__ void empty(float* sink) { if (sink[0] == 12345.f) sink[1] = 1; }

int main() {
    int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    float* sink; cudaMalloc(&sink, 4096); cudaMemset(sink, 0, 4096);
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int per_sm : {1, 2, 3}) {
        for (int threads : {256, 1024}) {
            if (threads == 1024 && per_sm > 2) continue;
            int blocks = sms * per_sm, count = 2000;
            barriers<<<blocks, threads>>>(10, sink); cudaDeviceSynchronize();
            cudaEventRecord(a); barriers<<<blocks, threads>>>(count, sink); cudaEventRecord(b); cudaEventSynchronize(b);
            float ms; cudaEventElapsedTime(&ms, a, b);
            printf("grid barrier: %d blocks of %d threads: %.2f us each (%s)\n", blocks, threads, ms * 1000 / count, cudaGetErrorString(cudaGetLastError()));
        }
    }
    cudaStream_t s; cudaStreamCreate(&s);
    for (int blocks : {12, 288, 1024}) {
        cudaGraph_t g; cudaGraphExec_t ge;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        for (int i = 0; i < 100; i++) empty<<<blocks, 256, 0, s>>>(sink);
        cudaStreamEndCapture(s, &g); cudaGraphInstantiate(&ge, g, 0);
        cudaGraphLaunch(ge, s); cudaStreamSynchronize(s);
        cudaEventRecord(a, s); for (int r = 0; r < 20; r++) cudaGraphLaunch(ge, s); cudaEventRecord(b, s); cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b);
        printf("empty kernel of %d blocks in a graph: %.2f us each\n", blocks, ms * 1000 / 2000);
    }
    return 0;
}
