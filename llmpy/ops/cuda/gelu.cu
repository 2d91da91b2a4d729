// gelu.cu: GELU, tanh approximation (GPT-2's "gelu_new"), elementwise.
//
//   y = 0.5 x (1 + tanh(u)),   u = s (x + a x^3),   s = sqrt(2 / pi), a = 0.044715
//   dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 a x^2)
// (product rule on x * (1 + tanh u) / 2, chain rule through tanh and u).
#include "common.cuh"

// GELU_S = sqrt(2 / pi) and GELU_A = 0.044715 come from Python as -D options
// (llmpy/ops/contract.py, through llmpy/ops/cuda_build.py): the NumPy reference
// uses the same two numbers.
#if !defined(GELU_S) || !defined(GELU_A)
#error "compile with -DGELU_S=... -DGELU_A=... (the options of llmpy/ops/cuda_build.py)"
#endif

__device__ __forceinline__ float gelu(float x) {
    float u = GELU_S * (x + GELU_A * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
    float th = tanhf(GELU_S * (x + GELU_A * x * x * x));
    float du = GELU_S * (1.0f + 3.0f * GELU_A * x * x);        // du/dx
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = from_f(gelu(to_f(inp[i])));
}

// The same with 128-bit loads and stores (common.cuh): thread i does values
// i * X128 ... i * X128 + X128 - 1; npacks = n / X128, the host having checked
// that n divides and the buffers are 16-byte aligned. Elementwise, the same
// arithmetic per value: the same bits as gelu_forward.
extern "C" __global__ void gelu_forward_x128(floatX* out, const floatX* inp, long long npacks) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= npacks) return;
    x128 x = load128(inp + i * X128), y;
    for (int k = 0; k < X128; k++) y.v[k] = from_f(gelu(to_f(x.v[k])));
    store128(out + i * X128, y);
}

// dinp may be the same buffer as dout (each thread reads its element before
// writing it), so the model can turn d(gelu output) into d(gelu input) in place.
extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dinp[i] = from_f(to_f(dout[i]) * gelu_grad(to_f(inp[i])));
}

extern "C" __global__ void gelu_backward_x128(floatX* dinp, const floatX* inp, const floatX* dout, long long npacks) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= npacks) return;
    x128 x = load128(inp + i * X128), d = load128(dout + i * X128), y;
    for (int k = 0; k < X128; k++) y.v[k] = from_f(to_f(d.v[k]) * gelu_grad(to_f(x.v[k])));
    store128(dinp + i * X128, y);
}
