// matmul.cu: the bias gradient of a matmul, dbias[o] (+)= sum_n dout[n, o].
// (The products themselves are cuBLASLt's; see cublaslt.py beside this file.)
//
// A sum down the columns of dout (N, OC), in float32 whatever the storage (N
// is B * T, tens of thousands: a bf16 running sum would stop growing long
// before the end), in a fixed order so that runs repeat bit for bit: stage 1
// sums chunks of BIAS_ROWS_PER_CHUNK rows into partial[chunk, o], one thread
// per column (threads along o read coalesced); stage 2 adds the chunks up in
// a fixed order, a block per 32 columns. Grid of stage 1: (ceil(OC / block), chunks).
#include "common.cuh"

// BIAS_ROWS_PER_CHUNK and COLSUM_THREADS come from Python as -D options
// (llmpy/ops/cuda_build.py), so the kernel's chunk and block and the host's
// launch grid cannot disagree.
#if !defined(BIAS_ROWS_PER_CHUNK) || !defined(COLSUM_THREADS)
#error "compile with -DBIAS_ROWS_PER_CHUNK=... -DCOLSUM_THREADS=... (the options of llmpy/ops/cuda_build.py)"
#endif

extern "C" __global__ void bias_backward_partial(float* partial, const floatX* dout, int N, int OC) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (o >= OC) return;
    int n0 = chunk * BIAS_ROWS_PER_CHUNK, n1 = min(n0 + BIAS_ROWS_PER_CHUNK, N);
    float s = 0.0f;
    for (int n = n0; n < n1; n++) s += to_f(dout[(long long)n * OC + o]);
    partial[(long long)chunk * OC + o] = s;
}

// Stage 2: the chunks' sums added up column by column (column_sum_tile,
// common.cuh: a block per WARP_SIZE columns, a fixed order); acc = 0
// overwrites dbias, acc = 1 adds. Grid: ceil(OC / WARP_SIZE) blocks of
// COLSUM_THREADS threads. With nchunks = 1 it is the accumulation rule alone:
// how the float32 bias gradient of cuBLASLt's BGRADB epilogue (matmul.py)
// reaches dbias, added or written, rounded once.
extern "C" __global__ void bias_backward_final(floatX* dbias, const float* partial, int nchunks, int OC, int acc) {
    __shared__ float shared[COLSUM_THREADS];
    int o = blockIdx.x * WARP_SIZE + threadIdx.x % WARP_SIZE;
    float s = column_sum_tile(partial, nchunks, OC, o, shared);
    if (threadIdx.x >= WARP_SIZE || o >= OC) return;
    dbias[o] = from_f(acc ? to_f(dbias[o]) + s : s);
}

// out[n, o] += bias[o] (N, OC): the bias of a product whose GEMM could not
// add it in its epilogue (matmul.py's fallback when cuBLASLt has no
// algorithm for the fused one). One thread per element, in float, one rounding.
extern "C" __global__ void bias_forward(floatX* out, const floatX* bias, int N, int OC) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * OC) return;
    out[i] = from_f(to_f(out[i]) + to_f(bias[i % OC]));
}
