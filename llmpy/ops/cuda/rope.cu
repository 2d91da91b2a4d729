// rope.cu: rotary position embedding (Llama), Hugging Face's rotate-half
// layout. Position t turns the pair (x1_i, x2_i) = (x[i], x[i + hs/2]) of
// every head by the angle t * inv_freq_i:
//     out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin
// A rotation is linear and its Jacobian is the rotation itself, so the
// backward is the transpose, the rotation by -angle:
//     dx1 = dy1 cos + dy2 sin,  dx2 = dy2 cos - dy1 sin
// i.e. the same kernel with sin negated (inverse = 1).
//
// The heads are read where they lie: H heads of hs values at the start of
// each of the N = B * T rows of a buffer whose rows are row_stride values
// apart (the q and k heads of the fused qkv activation, v left alone).
// cos, sin (T, hs / 2) float32 hold the angles of the T positions; row n is
// position n % T. One thread per pair; it reads both values before writing
// either, so out may be inp (in place).
#include "common.cuh"

extern "C" __global__ void rope_rotate(floatX* out, const floatX* inp, const float* cos, const float* sin,
                                       int N, int T, int H, int half, long long row_stride, int inverse) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * H * half) return;
    int p = (int)(i % half);                            // the pair within the head
    long long nh = i / half;
    int h = (int)(nh % H);
    int n = (int)(nh / H);
    int t = n % T;
    long long o = (long long)n * row_stride + (long long)h * 2 * half + p;
    float c = cos[t * half + p], s = sin[t * half + p];
    if (inverse) s = -s;
    float x1 = to_f(inp[o]), x2 = to_f(inp[o + half]);
    out[o] = from_f(x1 * c - x2 * s);
    out[o + half] = from_f(x2 * c + x1 * s);
}
