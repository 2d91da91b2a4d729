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

extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(inp[i]);
    float u = GELU_S * (x + GELU_A * x * x * x);
    out[i] = from_f(0.5f * x * (1.0f + tanhf(u)));
}

// dinp may be the same buffer as dout (each thread reads its element before
// writing it), so the model can turn d(gelu output) into d(gelu input) in place.
extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(inp[i]);
    float th = tanhf(GELU_S * (x + GELU_A * x * x * x));
    float du = GELU_S * (1.0f + 3.0f * GELU_A * x * x);        // du/dx
    float grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
    dinp[i] = from_f(to_f(dout[i]) * grad);
}
