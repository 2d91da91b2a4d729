// adamw.cu: one AdamW step over the whole flat parameter buffer in one kernel.
//
// With g = grad_scale * grad (gradient clipping folded in) and step k:
//     m <- m + (1 - b1) (g - m)              first moment (running mean of g)
//     v <- v + (1 - b2) (g^2 - v)            second moment (running mean of g^2)
//     p <- p (1 - lr wd) - lr * mhat / (sqrt(vhat) + eps)      decoupled decay
// with mhat = m / bc1, vhat = v / bc2, bc_i = 1 - b_i^k (bias corrections:
// m and v start at 0). As in the NumPy reference the last line is computed as
//     p <- p (1 - lr wd) - step_size * m / (sqrt(v) + eps_hat),
//     step_size = lr sqrt(bc2) / bc1,  eps_hat = eps sqrt(bc2)
// (the same number; the host computes the scalars once per step, in double,
// 1 - b1 and 1 - b2 included, so they round to float as the reference's do).
//
// Weight decay applies to some tensors only (the 2-D weights). The buffer is
// a sequence of contiguous segments; seg_stop[i] is the end of segment i and
// seg_decay[i] says whether it decays. A thread finds its segment by a short
// linear scan (a dozen entries, the same for every thread of a warp: cached).
//
// param is the float32 master copy. param_copy is what the forward pass
// reads: in bf16 training the bf16 weights, rewritten here from the new
// master value with stochastic rounding (random bits from hash(seed, i));
// in fp32 the host passes param itself and the second store is the same value.
#include "common.cuh"

// The values that change from step to step are read from device memory,
// `hyper`, not passed as arguments, so that a CUDA graph captured once can
// replay every step (a graph freezes kernel arguments; the host rewrites
// hyper before each replay):
//     hyper = [step_size, eps_hat, decay_factor, grad_scale, max_norm, seed (the float's bits)]
// With max_norm >= 0 the gradient clipping is done here too, from the sum of
// squares of the gradients computed on the device (*sumsq): scale by
// max_norm / (norm + 1e-6) when the norm exceeds max_norm (> 0), and if the
// norm is not finite, change nothing at all (the step is skipped: a NaN
// must not reach the weights, m or v). max_norm < 0: the host did the
// clipping (grad_scale) and sumsq is not read.
// This step's gradient scale (clipping folded in), or a negative number
// when the norm is not finite and nothing may change.
__device__ __forceinline__ float adamw_grad_scale(const float* hyper, const double* sumsq) {
    float grad_scale = hyper[3], max_norm = hyper[4];
    if (max_norm >= 0.0f) {
        double ss = *sumsq;
        if (!isfinite(ss)) return -1.0f;
        float norm = (float)sqrt(ss);
        if (max_norm > 0.0f && norm > max_norm) grad_scale *= max_norm / (norm + 1e-6f);
    }
    return grad_scale;
}

// The update of one element (both kernels below: the same arithmetic, so
// the same bits); returns the new master weight.
__device__ __forceinline__ float adamw_one(float p, float& m, float& v, float g, int decay, float one_minus_b1,
                                           float one_minus_b2, const float* hyper) {
    float step_size = hyper[0], eps_hat = hyper[1], decay_factor = hyper[2];
    float mi = m + one_minus_b1 * (g - m);
    float vi = v + one_minus_b2 * (g * g - v);
    m = mi;
    v = vi;
    if (decay) p *= decay_factor;              // decay_factor = 1 - lr * wd
    return p - step_size * (mi / (sqrtf(vi) + eps_hat));
}

extern "C" __global__ void adamw_update(float* param, floatX* param_copy, const floatX* grad, float* m, float* v,
                                        long long n, const long long* seg_stop, const int* seg_decay, int nseg,
                                        float one_minus_b1, float one_minus_b2, const float* hyper,
                                        const double* sumsq) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float grad_scale = adamw_grad_scale(hyper, sumsq);
    if (grad_scale < 0.0f) return;
    unsigned seed = __float_as_uint(hyper[5]);
    int s = 0;
    while (s < nseg - 1 && i >= seg_stop[s]) s++;
    float mi = m[i], vi = v[i];
    float p = adamw_one(param[i], mi, vi, to_f(grad[i]) * grad_scale, seg_decay[s], one_minus_b1, one_minus_b2,
                        hyper);
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
    param_copy[i] = from_f_stochastic(p, hash_u32(seed, i));
}

// The same with 128-bit loads and stores (common.cuh): thread t updates
// elements t * X128 ... t * X128 + X128 - 1, the gradient and the weights'
// copy as one pack each, param, m and v (float32) as X128 / 4 float4 each.
// npacks = n / X128; the host checks that n divides and every buffer is
// 16-byte aligned. A segment may end inside a pack: each element looks its
// segment up, continuing from the previous one.
extern "C" __global__ void adamw_update_x128(float* param, floatX* param_copy, const floatX* grad, float* m,
                                             float* v, long long npacks, const long long* seg_stop,
                                             const int* seg_decay, int nseg, float one_minus_b1,
                                             float one_minus_b2, const float* hyper, const double* sumsq) {
    long long pk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pk >= npacks) return;
    float grad_scale = adamw_grad_scale(hyper, sumsq);
    if (grad_scale < 0.0f) return;
    unsigned seed = __float_as_uint(hyper[5]);
    long long i0 = pk * X128;
    x128 g = load128(grad + i0), copy;
    alignas(16) float pv[X128], mv[X128], vv[X128];      // float4-addressable
    for (int q = 0; q < X128; q += 4) {
        *reinterpret_cast<float4*>(pv + q) = *reinterpret_cast<const float4*>(param + i0 + q);
        *reinterpret_cast<float4*>(mv + q) = *reinterpret_cast<const float4*>(m + i0 + q);
        *reinterpret_cast<float4*>(vv + q) = *reinterpret_cast<const float4*>(v + i0 + q);
    }
    int s = 0;
    for (int k = 0; k < X128; k++) {
        long long i = i0 + k;
        while (s < nseg - 1 && i >= seg_stop[s]) s++;
        pv[k] = adamw_one(pv[k], mv[k], vv[k], to_f(g.v[k]) * grad_scale, seg_decay[s], one_minus_b1,
                          one_minus_b2, hyper);
        copy.v[k] = from_f_stochastic(pv[k], hash_u32(seed, i));
    }
    for (int q = 0; q < X128; q += 4) {
        *reinterpret_cast<float4*>(param + i0 + q) = *reinterpret_cast<float4*>(pv + q);
        *reinterpret_cast<float4*>(m + i0 + q) = *reinterpret_cast<float4*>(mv + q);
        *reinterpret_cast<float4*>(v + i0 + q) = *reinterpret_cast<float4*>(vv + q);
    }
    store128(param_copy + i0, copy);
}

// The bf16 weights from the float32 master weights, rounded to nearest (after
// loading a checkpoint or receiving weights from another rank; during
// training the update above keeps them in step). In the fp32 build a copy.
extern "C" __global__ void cast_to_storage(floatX* out, const float* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_f(in[i]);
}
