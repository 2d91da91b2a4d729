// residual.cu: out = a + b. Its backward passes the gradient to both inputs
// unchanged, so it needs no kernel (the model reuses the same gradient buffer).
#include "common.cuh"

extern "C" __global__ void residual_forward(floatX* out, const floatX* a, const floatX* b, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = from_f(to_f(a[i]) + to_f(b[i]));
}
