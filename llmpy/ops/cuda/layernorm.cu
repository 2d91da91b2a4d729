// layernorm.cu: y = (x - mean) * rstd * w + b over the C channels of each row,
// with mean = sum(x) / C, var = sum((x - mean)^2) / C, rstd = 1 / sqrt(var + eps).
//
// One warp (32 threads) per row: the lanes stride over the row's C values and
// meet with warp shuffles, so no shared memory or block barrier is needed.
#include "common.cuh"

// LN_EPS (GPT-2's layer_norm_epsilon), LN_ROWS_PER_CHUNK (rows per partial
// sum of dweight / dbias, which the host's launch grid depends on too),
// COLSUM_THREADS (the block of the final stage, its shared array's size) and
// LN_BWD_COLS_PER_THREAD (the fused backward's columns per thread) come
// from Python as -D options (llmpy/ops/cuda_build.py): one definition each.
#if !defined(LN_EPS) || !defined(LN_ROWS_PER_CHUNK) || !defined(COLSUM_THREADS) || \
    !defined(LN_BWD_COLS_PER_THREAD)
#error "compile with the -D options of llmpy/ops/cuda_build.py (the four constants named above)"
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

// The two forwards above with 128-bit loads and stores (common.cuh): the
// lanes stride over the row's C / X128 packs instead of its values. The host
// launches them when C is a multiple of X128 and every buffer starts on a
// 16-byte boundary (then so does every row). Each lane sums its values in
// another order than the scalar kernel's (pack by pack), so mean and rstd
// may differ from it in the last bits.
extern "C" __global__ void layernorm_forward_x128(floatX* out, float* mean, float* rstd, const floatX* inp,
                                                  const floatX* weight, const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;
    const floatX* x = inp + (long long)row * C;
    floatX* y = out + (long long)row * C;
    float s = 0.0f;
    for (int c = lane * X128; c < C; c += WARP_SIZE * X128) {
        x128 p = load128(x + c);
        for (int k = 0; k < X128; k++) s += to_f(p.v[k]);
    }
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane * X128; c < C; c += WARP_SIZE * X128) {
        x128 p = load128(x + c);
        for (int k = 0; k < X128; k++) { float d = to_f(p.v[k]) - m; v += d * d; }
    }
    float r = 1.0f / sqrtf(warp_sum(v) / C + LN_EPS);
    for (int c = lane * X128; c < C; c += WARP_SIZE * X128) {
        x128 p = load128(x + c), w = load128(weight + c), b = load128(bias + c), o;
        for (int k = 0; k < X128; k++) o.v[k] = from_f((to_f(p.v[k]) - m) * r * to_f(w.v[k]) + to_f(b.v[k]));
        store128(y + c, o);
    }
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

extern "C" __global__ void residual_layernorm_forward_x128(floatX* res, floatX* out, float* mean, float* rstd,
                                                           const floatX* a, const floatX* b, const floatX* weight,
                                                           const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;
    long long o = (long long)row * C;
    float s = 0.0f;
    for (int c = lane * X128; c < C; c += WARP_SIZE * X128) {
        x128 pa = load128(a + o + c), pb = load128(b + o + c), pr;
        for (int k = 0; k < X128; k++) {
            pr.v[k] = from_f(to_f(pa.v[k]) + to_f(pb.v[k]));
            s += to_f(pr.v[k]);
        }
        store128(res + o + c, pr);
    }
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane * X128; c < C; c += WARP_SIZE * X128) {
        x128 p = load128(res + o + c);
        for (int k = 0; k < X128; k++) { float d = to_f(p.v[k]) - m; v += d * d; }
    }
    float r = 1.0f / sqrtf(warp_sum(v) / C + LN_EPS);
    for (int c = lane * X128; c < C; c += WARP_SIZE * X128) {
        x128 p = load128(res + o + c), w = load128(weight + c), bb = load128(bias + c), y;
        for (int k = 0; k < X128; k++) y.v[k] = from_f((to_f(p.v[k]) - m) * r * to_f(w.v[k]) + to_f(bb.v[k]));
        store128(out + o + c, y);
    }
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

// The input gradient and stage 1 of the parameter gradients in ONE pass over
// dout and inp (the two kernels above read each of them three times: twice
// for the input gradient's two sweeps, once for the column sums). A block
// owns one chunk of LN_ROWS_PER_CHUNK rows and keeps the whole row width in
// registers: thread t holds columns t, t + blockDim.x, ... (at most
// LN_BWD_COLS_PER_THREAD of them: C <= that * blockDim.x, the host checks),
// so loads along a row are coalesced. Per row it loads dout and inp once,
// reduces sum(g) and sum(g * xhat) over the block (block_sum), adds the
// input gradient into dinp, and adds dout * xhat and dout into its columns'
// running sums, which end the chunk as partial_w / partial_b[chunk, c]
// (rows in order: the same fixed order as layernorm_backward_params_partial).
// Grid: one block per chunk. Stage 2 is layernorm_backward_params_final.
extern "C" __global__ void layernorm_backward_fused(floatX* dinp, float* partial_w, float* partial_b,
                                                    const floatX* dout, const floatX* inp, const floatX* weight,
                                                    const float* mean, const float* rstd, int N, int C) {
    __shared__ float shared[WARP_SIZE];
    const int chunk = blockIdx.x;
    const int n0 = chunk * LN_ROWS_PER_CHUNK, n1 = min(n0 + LN_ROWS_PER_CHUNK, N);
    float w[LN_BWD_COLS_PER_THREAD], dw[LN_BWD_COLS_PER_THREAD], db[LN_BWD_COLS_PER_THREAD];
    float d[LN_BWD_COLS_PER_THREAD], xhat[LN_BWD_COLS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
        int c = threadIdx.x + j * blockDim.x;
        w[j] = c < C ? to_f(weight[c]) : 0.0f;
        dw[j] = db[j] = 0.0f;
    }
    for (int n = n0; n < n1; n++) {
        long long o = (long long)n * C;
        float m = mean[n], r = rstd[n];
        float g_sum = 0.0f, gx_sum = 0.0f;
#pragma unroll
        for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
            int c = threadIdx.x + j * blockDim.x;
            d[j] = c < C ? to_f(dout[o + c]) : 0.0f;
            xhat[j] = c < C ? (to_f(inp[o + c]) - m) * r : 0.0f;
            float g = d[j] * w[j];
            g_sum += g;
            gx_sum += g * xhat[j];
        }
        float g_mean = block_sum(g_sum, shared) / C;
        float gx_mean = block_sum(gx_sum, shared) / C;
#pragma unroll
        for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
            int c = threadIdx.x + j * blockDim.x;
            if (c < C) {
                float g = d[j] * w[j];
                dinp[o + c] = from_f(to_f(dinp[o + c]) + r * (g - g_mean - xhat[j] * gx_mean));
                dw[j] += d[j] * xhat[j];
                db[j] += d[j];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < LN_BWD_COLS_PER_THREAD; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < C) {
            partial_w[(long long)chunk * C + c] = dw[j];
            partial_b[(long long)chunk * C + c] = db[j];
        }
    }
}

// Stage 2: the chunks' sums added up column by column (column_sum_tile,
// common.cuh: a block per WARP_SIZE columns, a fixed order); acc = 0
// overwrites dweight/dbias, acc = 1 adds. Grid: ceil(C / WARP_SIZE) blocks of
// COLSUM_THREADS threads.
extern "C" __global__ void layernorm_backward_params_final(floatX* dweight, floatX* dbias, const float* partial_w,
                                                           const float* partial_b, int nchunks, int C, int acc) {
    __shared__ float shared[COLSUM_THREADS];
    int c = blockIdx.x * WARP_SIZE + threadIdx.x % WARP_SIZE;
    float dw = column_sum_tile(partial_w, nchunks, C, c, shared);
    float db = column_sum_tile(partial_b, nchunks, C, c, shared);
    if (threadIdx.x >= WARP_SIZE || c >= C) return;
    dweight[c] = from_f(acc ? to_f(dweight[c]) + dw : dw);
    dbias[c] = from_f(acc ? to_f(dbias[c]) + db : db);
}
