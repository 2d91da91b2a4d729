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

extern "C" __global__ void adamw_update(float* param, floatX* param_copy, const floatX* grad, float* m, float* v,
                                        long long n, const long long* seg_stop, const int* seg_decay, int nseg,
                                        float one_minus_b1, float one_minus_b2, float step_size, float eps_hat,
                                        float decay_factor, float grad_scale, unsigned seed) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = 0;
    while (s < nseg - 1 && i >= seg_stop[s]) s++;
    float g = to_f(grad[i]) * grad_scale;
    float mi = m[i] + one_minus_b1 * (g - m[i]);
    float vi = v[i] + one_minus_b2 * (g * g - v[i]);
    m[i] = mi;
    v[i] = vi;
    float p = param[i];
    if (seg_decay[s]) p *= decay_factor;              // decay_factor = 1 - lr * wd
    p -= step_size * (mi / (sqrtf(vi) + eps_hat));
    param[i] = p;
    param_copy[i] = from_f_stochastic(p, hash_u32(seed, i));
}
