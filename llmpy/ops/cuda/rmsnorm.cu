// rmsnorm.cu: Llama's RMSNorm, y = x * rstd * w over the C channels of each
// row, rstd = 1 / sqrt(mean_c(x^2) + eps): layernorm without the mean and
// without the bias. eps is the model's rms_norm_eps, a kernel argument (it
// comes from the config, not from a shared constant).
//
// The kernels follow layernorm.cu's layout (read it first): one warp per row
// for the forward; for the backward one block per chunk of LN_ROWS_PER_CHUNK
// rows that adds the input gradient and leaves the chunk's column sums of
// dweight (rows wider than its registers hold: a warp per row, then a
// column-sum kernel), then the chunk sums added in a fixed order.
#include "common.cuh"

#if !defined(LN_ROWS_PER_CHUNK) || !defined(COLSUM_THREADS) || !defined(LN_BWD_COLS_PER_THREAD)
#error "compile with the -D options of llmpy/ops/cuda_build.py (the three constants named above)"
#endif

extern "C" __global__ void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp, const floatX* weight,
                                           float eps, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;                       // whole warps leave together
    const floatX* x = inp + (long long)row * C;
    floatX* y = out + (long long)row * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) { float v = to_f(x[c]); ss += v * v; }
    float r = 1.0f / sqrtf(warp_sum(ss) / C + eps);
    for (int c = lane; c < C; c += WARP_SIZE) y[c] = from_f(to_f(x[c]) * r * to_f(weight[c]));
    if (lane == 0) rstd[row] = r;
}

// The residual add before an RMSNorm, fused with it: res = a + b, then
// out = rmsnorm(res), the statistics taken of res as stored (rounded in
// bf16), as the separate rmsnorm would see it. res may be the same buffer as a.
extern "C" __global__ void residual_rmsnorm_forward(floatX* res, floatX* out, float* rstd, const floatX* a,
                                                    const floatX* b, const floatX* weight, float eps, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;
    long long o = (long long)row * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        floatX s = from_f(to_f(a[o + c]) + to_f(b[o + c]));
        res[o + c] = s;
        ss += to_f(s) * to_f(s);
    }
    float r = 1.0f / sqrtf(warp_sum(ss) / C + eps);
    for (int c = lane; c < C; c += WARP_SIZE) out[o + c] = from_f(to_f(res[o + c]) * r * to_f(weight[c]));
    if (lane == 0) rstd[row] = r;
}

// Input gradient, ADDED into dinp (the residual stream's gradient). y_j =
// w_j x_j r with r = (mean_i(x_i^2) + eps)^(-1/2), so dr/dx_j = -r^3 x_j / C;
// with xhat = x r and g = dout * w,
//     dx = r (g - xhat mean_c(g xhat))
// (layernorm's formula without its mean(g) term: no mean was removed).
extern "C" __global__ void rmsnorm_backward_input(floatX* dinp, const floatX* dout, const floatX* inp,
                                                  const floatX* weight, const float* rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;
    long long o = (long long)row * C;
    float r = rstd[row];
    float gx_sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE)
        gx_sum += to_f(dout[o + c]) * to_f(weight[c]) * to_f(inp[o + c]) * r;
    float gx_mean = warp_sum(gx_sum) / C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float xhat = to_f(inp[o + c]) * r, g = to_f(dout[o + c]) * to_f(weight[c]);
        dinp[o + c] = from_f(to_f(dinp[o + c]) + r * (g - xhat * gx_mean));
    }
}

// dweight[c] = sum_n dout[n, c] xhat[n, c], stage 1: the sums over chunks of
// LN_ROWS_PER_CHUNK rows into partial[chunk, c], one thread per column.
// Grid: (ceil(C / block), chunks).
extern "C" __global__ void rmsnorm_backward_params_partial(float* partial_w, const floatX* dout, const floatX* inp,
                                                           const float* rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (c >= C) return;
    int n0 = chunk * LN_ROWS_PER_CHUNK, n1 = min(n0 + LN_ROWS_PER_CHUNK, N);
    float dw = 0.0f;
    for (int n = n0; n < n1; n++) {
        long long o = (long long)n * C + c;
        dw += to_f(dout[o]) * to_f(inp[o]) * rstd[n];
    }
    partial_w[(long long)chunk * C + c] = dw;
}

// The input gradient and stage 1 of dweight in ONE pass over dout and inp,
// as layernorm_backward_fused: a block owns a chunk of rows and keeps the
// row's C values in registers, LN_BWD_COLS_PER_THREAD per thread (the host
// checks C <= that * blockDim.x). Rows in order: the same sums, in the same
// order, as rmsnorm_backward_params_partial. Grid: one block per chunk.
extern "C" __global__ void rmsnorm_backward_fused(floatX* dinp, float* partial_w, const floatX* dout,
                                                  const floatX* inp, const floatX* weight, const float* rstd,
                                                  int N, int C) {
    __shared__ float shared[WARP_SIZE];
    const int chunk = blockIdx.x;
    const int n0 = chunk * LN_ROWS_PER_CHUNK, n1 = min(n0 + LN_ROWS_PER_CHUNK, N);
    float w[LN_BWD_COLS_PER_THREAD], dw[LN_BWD_COLS_PER_THREAD];
    float d[LN_BWD_COLS_PER_THREAD], xhat[LN_BWD_COLS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
        int c = threadIdx.x + j * blockDim.x;
        w[j] = c < C ? to_f(weight[c]) : 0.0f;
        dw[j] = 0.0f;
    }
    for (int n = n0; n < n1; n++) {
        long long o = (long long)n * C;
        float r = rstd[n];
        float gx_sum = 0.0f;
#pragma unroll
        for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
            int c = threadIdx.x + j * blockDim.x;
            d[j] = c < C ? to_f(dout[o + c]) : 0.0f;
            xhat[j] = c < C ? to_f(inp[o + c]) * r : 0.0f;
            gx_sum += d[j] * w[j] * xhat[j];
        }
        float gx_mean = block_sum(gx_sum, shared) / C;
#pragma unroll
        for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
            int c = threadIdx.x + j * blockDim.x;
            if (c < C) {
                dinp[o + c] = from_f(to_f(dinp[o + c]) + r * (d[j] * w[j] - xhat[j] * gx_mean));
                dw[j] += d[j] * xhat[j];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < C) partial_w[(long long)chunk * C + c] = dw[j];
    }
}

// Stage 2: the chunks' sums added up column by column (common.cuh's
// column_sum_tile, a fixed order); acc = 0 overwrites dweight, acc = 1 adds.
// Grid: ceil(C / WARP_SIZE) blocks of COLSUM_THREADS threads.
extern "C" __global__ void rmsnorm_backward_params_final(floatX* dweight, const float* partial_w, int nchunks, int C,
                                                         int acc) {
    __shared__ float shared[COLSUM_THREADS];
    int c = blockIdx.x * WARP_SIZE + threadIdx.x % WARP_SIZE;
    float dw = column_sum_tile(partial_w, nchunks, C, c, shared);
    if (threadIdx.x >= WARP_SIZE || c >= C) return;
    dweight[c] = from_f(acc ? to_f(dweight[c]) + dw : dw);
}
