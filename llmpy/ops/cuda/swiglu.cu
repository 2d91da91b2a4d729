// swiglu.cu: Llama's MLP nonlinearity on the fused gate and up projections,
// inp (N, 2I) = [gate | up] row by row, out (N, I):
//     out = silu(gate) * up,   silu(x) = x sigmoid(x)
// With s = sigmoid(gate), silu'(gate) = s + gate s (1 - s) = s (1 + gate (1 - s)), so
//     dgate = dout * up * s (1 + gate (1 - s)),   dup = dout * silu(gate)
// One thread per (n, i) of the output.
#include "common.cuh"

// 1 / (1 + e^-x) written with tanh, as the NumPy reference: no overflow for large |x|
__device__ __forceinline__ float sigmoid(float x) { return 0.5f * (1.0f + tanhf(0.5f * x)); }

extern "C" __global__ void swiglu_forward(floatX* out, const floatX* inp, int N, int I) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * I) return;
    long long n = i / I, j = i % I;
    float gate = to_f(inp[n * 2 * I + j]), up = to_f(inp[n * 2 * I + I + j]);
    out[i] = from_f(gate * sigmoid(gate) * up);
}

// dinp (N, 2I) overwritten, both halves.
extern "C" __global__ void swiglu_backward(floatX* dinp, const floatX* dout, const floatX* inp, int N, int I) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * I) return;
    long long n = i / I, j = i % I;
    float gate = to_f(inp[n * 2 * I + j]), up = to_f(inp[n * 2 * I + I + j]), d = to_f(dout[i]);
    float s = sigmoid(gate);
    dinp[n * 2 * I + j] = from_f(d * up * s * (1.0f + gate * (1.0f - s)));
    dinp[n * 2 * I + I + j] = from_f(d * gate * s);
}
