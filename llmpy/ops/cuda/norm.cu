// norm.cu: sum of squares of a buffer (the global gradient norm is its sqrt).
//
// Two stages with a fixed launch shape, so the order of additions (and the
// result, bit for bit) is the same on every run: stage 1 has every block sum
// x^2 over a grid-strided share of the buffer into partial[block]; stage 2
// adds the partials up in one thread, in double (a few hundred values).
#include "common.cuh"

extern "C" __global__ void sum_of_squares_partial(float* partial, const floatX* x, long long n) {
    __shared__ float shared[WARP_SIZE];
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float xi = to_f(x[i]);
        s += xi * xi;
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void sum_of_squares_final(double* out, const float* partial, int nblocks) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int b = 0; b < nblocks; b++) s += partial[b];
    *out = s;
}

// The training loss of a step without waiting for it on the host: acc[0] =
// (first ? 0 : acc[0]) + scale * sum(x), one block, a fixed order of
// additions (the graph step adds each micro-step's mean loss this way, scale
// = 1 / (N * accumulation steps), and reads acc once per step).
extern "C" __global__ void accumulate_sum(double* acc, const float* x, long long n, double scale, int first) {
    __shared__ float shared[WARP_SIZE];
    float s = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) acc[0] = (first ? 0.0 : acc[0]) + scale * (double)s;
}
