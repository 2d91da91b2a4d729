// classifier.cu: fused softmax + cross-entropy over the vocabulary.
//
//   lse_n  = log sum_v exp(logits[n, v])          (logsumexp)
//   loss_n = lse_n - logits[n, y_n]               (= -log softmax(logits_n)[y_n])
//   dloss_n / dlogits[n, v] = softmax_v - [v == y_n] = exp(logits[n, v] - lse_n) - [v == y_n]
//
// One block per row. The forward keeps lse so the backward need not redo the
// max/sum pass, and the backward overwrites the logits with their gradient
// (the (N, V) logits are the largest activation: no second buffer). Rows are
// `stride` >= V values apart: the model pads the vocabulary to Vp (a
// multiple of 128, for the matmuls); columns V..stride-1 are not logits, the
// forward skips them and the backward writes 0 there.
#include "common.cuh"

// logsumexp of a row of V logits, by the whole block; every thread gets it.
// "Online" softmax: each thread keeps a running max m and sum s of exp(x - m)
// over its strided values; when a larger value arrives the sum is rescaled by
// exp(m_old - m_new). Threads then agree on the block max and rescale their
// sums to it before the block sum. One read of the row instead of two.
__device__ __forceinline__ void online_add(float x, float& m, float& s) {
    if (x > m) { s *= expf(m - x); m = x; }
    s += expf(x - m);
}

__device__ __forceinline__ float block_logsumexp(float m, float s, float* shared) {
    float block_m = block_max(m, shared);
    s = (m == NEG_INF) ? 0.0f : s * expf(m - block_m);   // a thread with no values has s = 0
    return block_m + logf(block_sum(s, shared));
}

__device__ float row_logsumexp(const floatX* row, int V, float* shared) {
    float m = NEG_INF, s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) online_add(to_f(row[v]), m, s);
    return block_logsumexp(m, s, shared);
}

// The same reading 16-byte packs (common.cuh): the whole packs below V, then
// the last V % X128 values one by one. Each thread meets its values in
// another order than row_logsumexp's, so the result may differ from it in
// the last bits. The row must start on a 16-byte boundary (the host checks).
__device__ float row_logsumexp_x128(const floatX* row, int V, float* shared) {
    float m = NEG_INF, s = 0.0f;
    const int whole = V / X128 * X128;
    for (int v0 = threadIdx.x * X128; v0 < whole; v0 += blockDim.x * X128) {
        x128 x = load128(row + v0);
        for (int k = 0; k < X128; k++) online_add(to_f(x.v[k]), m, s);
    }
    for (int v = whole + threadIdx.x; v < V; v += blockDim.x) online_add(to_f(row[v]), m, s);
    return block_logsumexp(m, s, shared);
}

extern "C" __global__ void crossentropy_forward(float* losses, float* lse, const floatX* logits,
                                                const long long* targets, int N, int V, int stride) {
    __shared__ float shared[WARP_SIZE];
    int n = blockIdx.x;
    const floatX* row = logits + (long long)n * stride;
    float l = row_logsumexp(row, V, shared);
    if (threadIdx.x == 0) {
        lse[n] = l;
        losses[n] = l - to_f(row[targets[n]]);
    }
}

extern "C" __global__ void crossentropy_forward_x128(float* losses, float* lse, const floatX* logits,
                                                     const long long* targets, int N, int V, int stride) {
    __shared__ float shared[WARP_SIZE];
    int n = blockIdx.x;
    const floatX* row = logits + (long long)n * stride;
    float l = row_logsumexp_x128(row, V, shared);
    if (threadIdx.x == 0) {
        lse[n] = l;
        losses[n] = l - to_f(row[targets[n]]);
    }
}

// The gradient sweep over one row: logits[v] <- (exp(logits[v] - lse) -
// [v == y]) * dloss for v < V, 0 in the padding up to stride. By the whole
// block, one value per thread at a time; or, in the _x128 kernels, one
// 16-byte pack (common.cuh) per thread at a time, the host having checked
// that stride is whole packs and the logits 16-byte aligned (the model's Vp
// is a multiple of 128). The same arithmetic per value: given the same lse,
// the same bits (the _x128 logsumexp itself may differ in its last bits).
__device__ __forceinline__ float ce_grad(float x, int v, int V, long long y, float l, float dloss) {
    float p = v < V ? expf(x - l) : 0.0f;
    return v < V ? (p - (v == y ? 1.0f : 0.0f)) * dloss : 0.0f;
}

__device__ __forceinline__ void ce_grad_sweep(floatX* row, int V, int stride, long long y, float l, float dloss) {
    for (int v = threadIdx.x; v < stride; v += blockDim.x) row[v] = from_f(ce_grad(to_f(row[v]), v, V, y, l, dloss));
}

__device__ __forceinline__ void ce_grad_sweep_x128(floatX* row, int V, int stride, long long y, float l,
                                                   float dloss) {
    for (int v0 = threadIdx.x * X128; v0 < stride; v0 += blockDim.x * X128) {
        x128 x = load128(row + v0);
        for (int k = 0; k < X128; k++) x.v[k] = from_f(ce_grad(to_f(x.v[k]), v0 + k, V, y, l, dloss));
        store128(row + v0, x);
    }
}

// Both at once, for a training step that goes straight on to its backward
// pass: the loss of row n, then the row overwritten with its gradient. The
// second sweep re-reads the row the first one just read (from cache, mostly),
// so the logits cross memory once each way instead of twice in and once out.
__device__ __forceinline__ float ce_loss_of_row(float* losses, float* lse, const floatX* row, long long y, int V,
                                                float* shared, bool x128) {
    int n = blockIdx.x;
    float l = x128 ? row_logsumexp_x128(row, V, shared) : row_logsumexp(row, V, shared);
    if (threadIdx.x == 0) {
        lse[n] = l;
        losses[n] = l - to_f(row[y]);          // read before the sweep that follows overwrites it
    }
    __syncthreads();
    return l;
}

extern "C" __global__ void crossentropy_forward_backward(float* losses, float* lse, floatX* logits,
                                                         const long long* targets, float dloss, int N, int V,
                                                         int stride) {
    __shared__ float shared[WARP_SIZE];
    floatX* row = logits + (long long)blockIdx.x * stride;
    long long y = targets[blockIdx.x];
    float l = ce_loss_of_row(losses, lse, row, y, V, shared, false);
    ce_grad_sweep(row, V, stride, y, l, dloss);
}

extern "C" __global__ void crossentropy_forward_backward_x128(float* losses, float* lse, floatX* logits,
                                                              const long long* targets, float dloss, int N, int V,
                                                              int stride) {
    __shared__ float shared[WARP_SIZE];
    floatX* row = logits + (long long)blockIdx.x * stride;
    long long y = targets[blockIdx.x];
    float l = ce_loss_of_row(losses, lse, row, y, V, shared, true);
    ce_grad_sweep_x128(row, V, stride, y, l, dloss);
}

// In place: logits[n, v] <- (exp(logits[n, v] - lse_n) - [v == y_n]) * dloss,
// dloss the gradient of the final loss wrt every token's loss (1/N for a mean,
// times the loss scale).
extern "C" __global__ void crossentropy_backward(floatX* logits, const float* lse, const long long* targets,
                                                 float dloss, int N, int V, int stride) {
    int n = blockIdx.x;
    ce_grad_sweep(logits + (long long)n * stride, V, stride, targets[n], lse[n], dloss);
}

extern "C" __global__ void crossentropy_backward_x128(floatX* logits, const float* lse, const long long* targets,
                                                      float dloss, int N, int V, int stride) {
    int n = blockIdx.x;
    ce_grad_sweep_x128(logits + (long long)n * stride, V, stride, targets[n], lse[n], dloss);
}
