// LayerNorm over rows of C (docs/math.md LN1, LN2). One warp per row; sums by warp shuffles.

// out = (x − mean)·rstd·w + b; keeps mean and rstd of each row for the backward pass, and writes
// out rounded to bf16 into `rounded` too unless it is null (bf16 training: what the next product
// reads)
extern "C" __global__ void layernorm_forward(const float* x, const float* w, const float* b, float* out, unsigned short* rounded, float* mean,
                                             float* rstd, int rows, int c) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    float m, r;
    warp_row_statistics(xr, c, &m, &r);
    for (int j = lane; j < c; j += 32) {
        float normed = (xr[j] - m) * r * w[j] + b[j];
        out[(long)row * c + j] = normed;
        if (rounded != nullptr) rounded[(long)row * c + j] = (unsigned short)bf16_bits(normed);
    }
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// The backward pass in two kernels, with no atomics, so that its sums run in an order fixed by
// the shape and the buffers' alignment, which choose between this kernel and the one-pass
// layernorm_backward_rows below (docs/math.md LN2):
// layernorm_backward: a block of 8 warps takes LAYERNORM_ROWS_PER_BLOCK rows. Each warp writes
// dx = rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm)) for its rows; then each thread takes
// columns and sums dout·norm and dout over the block's rows in order, into the block's partials
// (2·c floats: dw then db), which `column_sums_finish` (elementwise.cu) adds in block order.
extern "C" __global__ void layernorm_backward(const float* x, const float* dout, const float* w, const float* mean, const float* rstd,
                                              float* dx, float* partials, int rows, int c) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int first = blockIdx.x * LAYERNORM_ROWS_PER_BLOCK;
    int last = min(first + LAYERNORM_ROWS_PER_BLOCK, rows);
    for (int row = first + warp; row < last; row += warps) {
        const float* xr = x + (long)row * c;
        const float* gr = dout + (long)row * c;
        float m = mean[row], r = rstd[row];
        float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
        for (int j = lane; j < c; j += 32) {
            float norm = (xr[j] - m) * r;
            float dnorm = gr[j] * w[j];
            sum_dnorm += dnorm;
            sum_dnorm_norm += dnorm * norm;
        }
        float mean_dnorm = warp_sum(sum_dnorm) / c;
        float mean_dnorm_norm = warp_sum(sum_dnorm_norm) / c;
        float* dxr = dx + (long)row * c;
        for (int j = lane; j < c; j += 32) {
            float norm = (xr[j] - m) * r;
            dxr[j] = r * (gr[j] * w[j] - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
    float* dw_block = partials + (long)blockIdx.x * 2 * c;
    float* db_block = dw_block + c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (int row = first; row < last; row++) {
            float g = dout[(long)row * c + j];
            dw += g * (x[(long)row * c + j] - mean[row]) * rstd[row];
            db += g;
        }
        dw_block[j] = dw;
        db_block[j] = db;
    }
}

// The same backward, one pass over x and dout, for rows of c ≤ 128·VEC floats, c a multiple of
// 4 and every buffer on 16 bytes: lane l of a warp holds columns 4l + 128k .. + 3 (k < VEC) of
// its row in registers as float4s, reads x and dout once, and keeps its columns' sums of
// dout·norm and dout over the warp's rows (first + warp, + 8, … in order). The block's 8 warps
// then add theirs into shared memory in warp order, and the last writes the block's partials.
template <int VEC>
__device__ void layernorm_backward_rows(const float* x, const float* dout, const float* w, const float* mean, const float* rstd,
                                        float* dx, float* partials, int rows, int c) {
    __shared__ float4 block_sums[2 * 32 * VEC];  // dw's columns, then db's
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int first = blockIdx.x * LAYERNORM_ROWS_PER_BLOCK;
    int last = min(first + LAYERNORM_ROWS_PER_BLOCK, rows);
    float4 dw[VEC], db[VEC];
#pragma unroll
    for (int k = 0; k < VEC; k++) dw[k] = db[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int row = first + warp; row < last; row += warps) {
        float4 xv[VEC], gv[VEC];
        float m = mean[row], r = rstd[row], sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            int col = 4 * lane + 128 * k;
            xv[k] = gv[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (col < c) {
                xv[k] = *reinterpret_cast<const float4*>(x + (long)row * c + col);
                gv[k] = *reinterpret_cast<const float4*>(dout + (long)row * c + col);
            }
        }
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            int col = 4 * lane + 128 * k;
            float4 wv = col < c ? *reinterpret_cast<const float4*>(w + col) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            xv[k] = make_float4((xv[k].x - m) * r, (xv[k].y - m) * r, (xv[k].z - m) * r, (xv[k].w - m) * r);  // now norm
            float4 d = make_float4(gv[k].x * wv.x, gv[k].y * wv.y, gv[k].z * wv.z, gv[k].w * wv.w);  // dnorm
            sum_dnorm += d.x + d.y + d.z + d.w;
            sum_dnorm_norm += d.x * xv[k].x + d.y * xv[k].y + d.z * xv[k].z + d.w * xv[k].w;
        }
        float mean_dnorm = warp_sum(sum_dnorm) / c, mean_dnorm_norm = warp_sum(sum_dnorm_norm) / c;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            int col = 4 * lane + 128 * k;
            if (col >= c) continue;
            float4 n = xv[k], g = gv[k], wv = *reinterpret_cast<const float4*>(w + col);
            float4 d = make_float4(g.x * wv.x, g.y * wv.y, g.z * wv.z, g.w * wv.w);
            *reinterpret_cast<float4*>(dx + (long)row * c + col) =
                make_float4(r * (d.x - mean_dnorm - n.x * mean_dnorm_norm), r * (d.y - mean_dnorm - n.y * mean_dnorm_norm),
                            r * (d.z - mean_dnorm - n.z * mean_dnorm_norm), r * (d.w - mean_dnorm - n.w * mean_dnorm_norm));
            dw[k] = make_float4(dw[k].x + g.x * n.x, dw[k].y + g.y * n.y, dw[k].z + g.z * n.z, dw[k].w + g.w * n.w);
            db[k] = make_float4(db[k].x + g.x, db[k].y + g.y, db[k].z + g.z, db[k].w + g.w);
        }
    }
    float4* dw_block = reinterpret_cast<float4*>(partials + (long)blockIdx.x * 2 * c);
    float4* db_block = reinterpret_cast<float4*>(partials + (long)blockIdx.x * 2 * c + c);
    for (int turn = 0; turn < warps; turn++) {
        if (warp == turn) {
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                int i = lane + 32 * k;
                if (4 * i >= c) continue;
                float4 w_sum = dw[k], b_sum = db[k];
                if (turn > 0) {
                    float4 a = block_sums[i], b = block_sums[32 * VEC + i];
                    w_sum = make_float4(a.x + w_sum.x, a.y + w_sum.y, a.z + w_sum.z, a.w + w_sum.w);
                    b_sum = make_float4(b.x + b_sum.x, b.y + b_sum.y, b.z + b_sum.z, b.w + b_sum.w);
                }
                if (turn == warps - 1) {
                    dw_block[i] = w_sum;
                    db_block[i] = b_sum;
                } else {
                    block_sums[i] = w_sum;
                    block_sums[32 * VEC + i] = b_sum;
                }
            }
        }
        __syncthreads();
    }
}

#define LAYERNORM_BACKWARD_ROWS(VEC)                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) layernorm_backward_rows_##VEC(                                    \
        const float* x, const float* dout, const float* w, const float* mean, const float* rstd, float* dx, float* partials,  \
        int rows, int c) {                                                                                                   \
        layernorm_backward_rows<VEC>(x, dout, w, mean, rstd, dx, partials, rows, c);                                         \
    }

LAYERNORM_BACKWARD_ROWS(1)
LAYERNORM_BACKWARD_ROWS(2)
LAYERNORM_BACKWARD_ROWS(3)
LAYERNORM_BACKWARD_ROWS(4)
LAYERNORM_BACKWARD_ROWS(5)
LAYERNORM_BACKWARD_ROWS(6)
LAYERNORM_BACKWARD_ROWS(7)
LAYERNORM_BACKWARD_ROWS(8)

// The forward for a few rows (decoding): one block of 256 threads per row, so that a row's
// three passes run wide instead of one warp walking it alone.
extern "C" __global__ void layernorm_forward_wide(const float* x, const float* w, const float* b, float* out, unsigned short* rounded, float* mean,
                                                  float* rstd, int c) {
    let_next_kernel_start();
    wait_for_previous_kernel();
    __shared__ float shared[32];
    int row = blockIdx.x;
    const float* xr = x + (long)row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    float m = block_reduce(s, false, shared) / c;
    float v = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { float d = xr[j] - m; v += d * d; }
    float r = rsqrtf(block_reduce(v, false, shared) / c + 1e-5f);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float normed = (xr[j] - m) * r * w[j] + b[j];
        out[(long)row * c + j] = normed;
        if (rounded != nullptr) rounded[(long)row * c + j] = (unsigned short)bf16_bits(normed);
    }
    if (threadIdx.x == 0) { mean[row] = m; rstd[row] = r; }
}
