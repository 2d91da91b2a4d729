// layernorm.cu: y = (x - mean) * rstd * w + b over the C channels of each row,
// with mean = sum(x) / C, var = sum((x - mean)^2) / C, rstd = 1 / sqrt(var + eps).
//
// One warp (32 threads) per row: the lanes stride over the row's C values and
// meet with warp shuffles, so no shared memory or block barrier is needed.
#include "common.cuh"

// LN_EPS (GPT-2's layer_norm_epsilon) and LN_ROWS_PER_CHUNK (rows per partial
// sum of dweight / dbias, which the host's launch grid depends on too) come
// from Python as -D options (llmpy/ops/cuda_build.py): one definition each.
#if !defined(LN_EPS) || !defined(LN_ROWS_PER_CHUNK)
#error "compile with -DLN_EPS=... -DLN_ROWS_PER_CHUNK=... (the options of llmpy/ops/cuda_build.py)"
#endif

extern "C" __global__ void layernorm_forward(floatX* out, float* mean, float* rstd, const floatX* inp,
                                             const floatX* weight, const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;                       // whole warps leave together
    const floatX* x = inp + (long long)row * C;
    floatX* y = out + (long long)row * C;

    float s = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) s += to_f(x[c]);
    float m = warp_sum(s) / C;
    // two passes (sum of squared deviations, not E[x^2] - m^2): no cancellation
    float v = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) { float d = to_f(x[c]) - m; v += d * d; }
    float r = 1.0f / sqrtf(warp_sum(v) / C + LN_EPS);
    for (int c = lane; c < C; c += WARP_SIZE)
        y[c] = from_f((to_f(x[c]) - m) * r * to_f(weight[c]) + to_f(bias[c]));
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// The residual add before a layernorm, fused with it: res = a + b, then
// out = layernorm(res). The unfused pair writes res and reads it back in a
// second kernel; here each lane re-reads only the values it just wrote
// (cache hits), saving a pass over (N, C) in memory. The statistics are of
// res as stored (rounded to bf16 in bf16), exactly what the separate
// layernorm would see. res may be the same buffer as a (in place).
extern "C" __global__ void residual_layernorm_forward(floatX* res, floatX* out, float* mean, float* rstd,
                                                      const floatX* a, const floatX* b, const floatX* weight,
                                                      const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;
    long long o = (long long)row * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        floatX r = from_f(to_f(a[o + c]) + to_f(b[o + c]));
        res[o + c] = r;
        s += to_f(r);
    }
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) { float d = to_f(res[o + c]) - m; v += d * d; }
    float r = 1.0f / sqrtf(warp_sum(v) / C + LN_EPS);
    for (int c = lane; c < C; c += WARP_SIZE)
        out[o + c] = from_f((to_f(res[o + c]) - m) * r * to_f(weight[c]) + to_f(bias[c]));
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// Input gradient, ADDED into dinp (the residual stream's gradient). With
// xhat = (x - mean) * rstd and g = dout * w the gradient wrt xhat,
//     dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
// the two subtracted terms being the paths through mean and rstd, which
// depend on every x of the row.
extern "C" __global__ void layernorm_backward_input(floatX* dinp, const floatX* dout, const floatX* inp,
                                                    const floatX* weight, const float* mean, const float* rstd,
                                                    int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;
    long long o = (long long)row * C;
    float m = mean[row], r = rstd[row];

    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float xhat = (to_f(inp[o + c]) - m) * r;
        float g = to_f(dout[o + c]) * to_f(weight[c]);
        g_sum += g;
        gx_sum += g * xhat;
    }
    float g_mean = warp_sum(g_sum) / C, gx_mean = warp_sum(gx_sum) / C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float xhat = (to_f(inp[o + c]) - m) * r;
        float g = to_f(dout[o + c]) * to_f(weight[c]);
        dinp[o + c] = from_f(to_f(dinp[o + c]) + r * (g - g_mean - xhat * gx_mean));
    }
}

// Parameter gradients: dweight[c] = sum_n dout[n, c] * xhat[n, c] and
// dbias[c] = sum_n dout[n, c], sums down the columns. Done in two stages so
// that many blocks share the work and the order of additions is fixed
// (deterministic): stage 1 sums chunks of LN_ROWS_PER_CHUNK rows into
// partial[chunk, c] (one thread per column, threads along c read coalesced);
// stage 2 adds the chunks up in order. partial_w, partial_b: float, at least
// ceil(N / LN_ROWS_PER_CHUNK) * C each. Grid of stage 1: (ceil(C / block), chunks).
extern "C" __global__ void layernorm_backward_params_partial(float* partial_w, float* partial_b,
                                                             const floatX* dout, const floatX* inp,
                                                             const float* mean, const float* rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (c >= C) return;
    int n0 = chunk * LN_ROWS_PER_CHUNK, n1 = min(n0 + LN_ROWS_PER_CHUNK, N);
    float dw = 0.0f, db = 0.0f;
    for (int n = n0; n < n1; n++) {
        long long o = (long long)n * C + c;
        float d = to_f(dout[o]);
        dw += d * (to_f(inp[o]) - mean[n]) * rstd[n];
        db += d;
    }
    partial_w[(long long)chunk * C + c] = dw;
    partial_b[(long long)chunk * C + c] = db;
}

// Stage 2: one thread per column; acc = 0 overwrites dweight/dbias, acc = 1 adds.
extern "C" __global__ void layernorm_backward_params_final(floatX* dweight, floatX* dbias, const float* partial_w,
                                                           const float* partial_b, int nchunks, int C, int acc) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dw = 0.0f, db = 0.0f;
    for (int k = 0; k < nchunks; k++) {
        dw += partial_w[(long long)k * C + c];
        db += partial_b[(long long)k * C + c];
    }
    dweight[c] = from_f(acc ? to_f(dweight[c]) + dw : dw);
    dbias[c] = from_f(acc ? to_f(dbias[c]) + db : db);
}
