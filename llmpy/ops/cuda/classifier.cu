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
__device__ float row_logsumexp(const floatX* row, int V, float* shared) {
    float m = NEG_INF, s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = to_f(row[v]);
        if (x > m) { s *= expf(m - x); m = x; }
        s += expf(x - m);
    }
    float block_m = block_max(m, shared);
    s = (m == NEG_INF) ? 0.0f : s * expf(m - block_m);   // a thread with no values has s = 0
    return block_m + logf(block_sum(s, shared));
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

// Both at once, for a training step that goes straight on to its backward
// pass: the loss of row n, then the row overwritten with its gradient. The
// second sweep re-reads the row the first one just read (from cache, mostly),
// so the logits cross memory once each way instead of twice in and once out.
extern "C" __global__ void crossentropy_forward_backward(float* losses, float* lse, floatX* logits,
                                                         const long long* targets, float dloss, int N, int V,
                                                         int stride) {
    __shared__ float shared[WARP_SIZE];
    int n = blockIdx.x;
    floatX* row = logits + (long long)n * stride;
    long long y = targets[n];
    float l = row_logsumexp(row, V, shared);
    if (threadIdx.x == 0) {
        lse[n] = l;
        losses[n] = l - to_f(row[y]);          // read before the sweep below overwrites it
    }
    __syncthreads();
    for (int v = threadIdx.x; v < stride; v += blockDim.x) {
        float p = v < V ? expf(to_f(row[v]) - l) : 0.0f;
        row[v] = from_f(v < V ? (p - (v == y ? 1.0f : 0.0f)) * dloss : 0.0f);
    }
}

// In place: logits[n, v] <- (exp(logits[n, v] - lse_n) - [v == y_n]) * dloss,
// dloss the gradient of the final loss wrt every token's loss (1/N for a mean,
// times the loss scale).
extern "C" __global__ void crossentropy_backward(floatX* logits, const float* lse, const long long* targets,
                                                 float dloss, int N, int V, int stride) {
    int n = blockIdx.x;
    floatX* row = logits + (long long)n * stride;
    float l = lse[n];
    long long y = targets[n];
    for (int v = threadIdx.x; v < stride; v += blockDim.x) {
        float p = v < V ? expf(to_f(row[v]) - l) : 0.0f;
        row[v] = from_f(v < V ? (p - (v == y ? 1.0f : 0.0f)) * dloss : 0.0f);
    }
}
