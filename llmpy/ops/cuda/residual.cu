// residual.cu: out = a + b. Its backward passes the gradient to both inputs
// unchanged, so it needs no kernel (the model reuses the same gradient buffer).
#include "common.cuh"

extern "C" __global__ void residual_forward(floatX* out, const floatX* a, const floatX* b, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = from_f(to_f(a[i]) + to_f(b[i]));
}

// The same with 128-bit loads and stores (see common.cuh): npacks = n / X128.
extern "C" __global__ void residual_forward_x128(floatX* out, const floatX* a, const floatX* b, long long npacks) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= npacks) return;
    x128 x = load128(a + i * X128), y = load128(b + i * X128), z;
    for (int k = 0; k < X128; k++) z.v[k] = from_f(to_f(x.v[k]) + to_f(y.v[k]));
    store128(out + i * X128, z);
}
