// common.cuh: what every llmpy kernel file shares.
//
// Storage type. Activations and parameters are stored as `floatX`: float for
// the fp32 path (the one checked against the NumPy reference), __nv_bfloat16
// when the module is compiled with -DLLMPY_BF16. Arithmetic is always done in
// float: values are widened on load (to_f) and rounded once on store (from_f),
// so a bf16 run loses precision in storage only, never in the sums.
//
// Every file is compiled on its own (by NVRTC at run time, by nvcc in the
// compile test), once per storage type, and exports `extern "C"` entry points
// so the host can find them by name without C++ name mangling.
#pragma once

// A 32-bit hash of (seed, i) (two rounds of a multiply-xorshift mixer): the
// random bits of stochastic rounding, different for every element and step,
// and the same on every run.
__device__ __forceinline__ unsigned hash_u32(unsigned seed, unsigned long long i) {
    unsigned x = (unsigned)i ^ (unsigned)(i >> 32) * 0x9E3779B1u ^ seed * 0x85EBCA77u;
    x ^= x >> 16; x *= 0x7FEB352Du;
    x ^= x >> 15; x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

#ifdef LLMPY_BF16
#include <cuda_bf16.h>
typedef __nv_bfloat16 floatX;
__device__ __forceinline__ float to_f(floatX x) { return __bfloat162float(x); }
__device__ __forceinline__ floatX from_f(float x) { return __float2bfloat16(x); }
// Stochastic rounding to bf16: add 16 random bits below the kept 16 and cut.
// x rounds up with probability (the cut-off part) / 2^16, so the rounding
// error is zero on average: small AdamW updates to a weight add up over
// steps instead of being rounded away every time.
__device__ __forceinline__ floatX from_f_stochastic(float x, unsigned rnd) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7F800000u) == 0x7F800000u) return __float2bfloat16(x);   // inf / nan: as is
    u += rnd & 0xFFFFu;
    __nv_bfloat16 b;
    *reinterpret_cast<unsigned short*>(&b) = (unsigned short)(u >> 16);
    return b;
}
#else
typedef float floatX;
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float from_f(float x) { return x; }
__device__ __forceinline__ float from_f_stochastic(float x, unsigned) { return x; }
#endif

#define WARP_SIZE 32

// 128-bit access: X128 values of floatX (4 float, 8 bf16) moved in one
// 16-byte load or store (ld.global.v4) instead of X128 narrow ones; the
// memory-bound kernels' *_x128 variants use it. The address must be a
// multiple of 16 bytes: the host checks (runtime.packs128) and otherwise
// launches the one-value-per-thread kernel. Loaded as an int4 (what the
// hardware moves in one instruction), reinterpreted as the values.
#define X128 ((int)(16 / sizeof(floatX)))
struct alignas(16) x128 {
    floatX v[16 / sizeof(floatX)];
};
__device__ __forceinline__ x128 load128(const floatX* p) {
    int4 bits = *reinterpret_cast<const int4*>(p);
    return *reinterpret_cast<x128*>(&bits);
}
__device__ __forceinline__ void store128(floatX* p, x128 x) {
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<int4*>(&x);
}
#define FULL_MASK 0xffffffffu
// -infinity without <math.h> (NVRTC has no C library headers)
#define NEG_INF __int_as_float(0xff800000)

// Sum (or max) of one value per lane over the 32 lanes of a warp: a butterfly
// of shuffles, after which every lane holds the result. log2(32) = 5 steps.
__device__ __forceinline__ float warp_sum(float x) {
    for (int off = WARP_SIZE / 2; off > 0; off /= 2) x += __shfl_xor_sync(FULL_MASK, x, off);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int off = WARP_SIZE / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, off));
    return x;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024): each
// warp reduces its lanes, warp totals meet in shared memory, and the first
// warp reduces those. Every thread gets the result. `shared` holds 32 floats.
// The order of additions is fixed by the launch shape, so the result is the
// same bit for bit on every run (deterministic, unlike atomicAdd).
__device__ __forceinline__ float block_sum(float x, float* shared) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    x = warp_sum(x);
    __syncthreads();                     // shared may still be read by a previous call
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < nwarps ? shared[lane] : 0.0f;
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* shared) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < nwarps ? shared[lane] : NEG_INF;
    return warp_max(x);
}

// The last stage of a column sum: total[c] = sum_k partial[k, c] over the
// nrows rows of a (nrows, C) float32 matrix of partial sums (one row per
// chunk of the first stage). The block owns WARP_SIZE adjacent columns, one
// per lane, so each warp reads 128 contiguous bytes of a row; its blockDim.x /
// WARP_SIZE warps take every G-th row (G warps: warp w sums rows w, w + G,
// w + 2G, ... in that order), and warp 0 then adds the G warp totals in
// warp order. A fixed order whatever the timing (no atomics): the same bits
// on every run. Compared with one thread walking all nrows rows, the serial
// chain is nrows / G + G long and ceil(C / 32) blocks share the work.
// Every thread of the block must call it (it has barriers); `shared` holds
// blockDim.x floats; the result is meaningful in warp 0, for c < C.
__device__ __forceinline__ float column_sum_tile(const float* partial, int nrows, int C, int c, float* shared) {
    const int warp = threadIdx.x / WARP_SIZE, nwarps = blockDim.x / WARP_SIZE;
    float s = 0.0f;
    if (c < C)
        for (int k = warp; k < nrows; k += nwarps) s += partial[(long long)k * C + c];
    __syncthreads();                     // shared may still be read by a previous call
    shared[threadIdx.x] = s;
    __syncthreads();
    if (warp == 0)
        for (int w = 1; w < nwarps; w++) s += shared[w * WARP_SIZE + threadIdx.x];
    return s;
}
