// attention.cu: the softmax of causal self-attention, for the batched-GEMM
// attention path (the host does pre = q k^T and y = att v with cuBLAS), and
// the copies that move the heads into the GEMMs' batch and back.
//
// Each row (b, h, t) of the (B, NH, T, T) score matrix becomes
//     att[t, s] = exp(pre[t, s] * scale - m) / sum_{s' <= t} exp(pre[t, s'] * scale - m),  s <= t
//     att[t, s] = 0,                                                                       s > t
// with scale = 1 / sqrt(hs) and m the row's max (subtracted so exp cannot
// overflow; it cancels in the ratio). Token t sees only tokens s <= t.
//
// One warp per row: lanes stride over s and meet with warp shuffles.
#include "common.cuh"

// In place: att holds pre = q k^T on entry and the probabilities on exit.
// Every element of the row is written (the masked ones with 0), so the
// backward pass and att v never read stale values.
extern "C" __global__ void attention_softmax_forward(floatX* att, float scale, int rows, int T) {
    int r = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (r >= rows) return;
    int t = r % T;                                   // query position of this row
    floatX* row = att + (long long)r * T;

    // online max / sum over the visible keys s <= t (see classifier.cu)
    float m = NEG_INF, s = 0.0f;
    for (int j = lane; j <= t; j += WARP_SIZE) {
        float x = to_f(row[j]) * scale;
        if (x > m) { s *= expf(m - x); m = x; }
        s += expf(x - m);
    }
    float row_m = warp_max(m);
    s = (m == NEG_INF) ? 0.0f : s * expf(m - row_m);
    float total = warp_sum(s);                        // >= 1: the max term is exp(0)
    for (int j = lane; j < T; j += WARP_SIZE)
        row[j] = from_f(j <= t ? expf(to_f(row[j]) * scale - row_m) / total : 0.0f);
}

// In place: datt holds d(att) = dy v^T on entry and d(pre) on exit. The
// softmax Jacobian is d att_s / d x_s' = att_s ([s == s'] - att_s'), so
//     dx_s = att_s (datt_s - sum_s' datt_s' att_s'),   and pre -> x = pre * scale
// gives dpre_s = scale * dx_s. Masked entries have att = 0 and get 0.
extern "C" __global__ void attention_softmax_backward(floatX* datt, const floatX* att, float scale, int rows, int T) {
    int r = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (r >= rows) return;
    floatX* drow = datt + (long long)r * T;
    const floatX* arow = att + (long long)r * T;

    float dot = 0.0f;
    for (int j = lane; j < T; j += WARP_SIZE) dot += to_f(drow[j]) * to_f(arow[j]);
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += WARP_SIZE) {
        float a = to_f(arow[j]);
        drow[j] = from_f(scale * a * (to_f(drow[j]) - dot));
    }
}

// ---------------------------------------------------------------------------
// Moving heads in and out of the batch dimension, for the batched GEMMs:
// qkv (B, T, NH + 2 NKV, hs) <-> q (B, NH, T, hs), k, v each (B, NKV, T, hs),
// and the attention output y (B, NH, T, hs) <-> out (B, T, NH, hs). NKV = NH
// is GPT-2's multi-head attention; NKV < NH grouped-query attention (Llama),
// where query head h = j G + g reads k/v head j (G = NH / NKV): q's (B, NH,
// T, hs) is then also (B, NKV, G T, hs), each k/v head's G query heads
// stacked as the rows of one matrix, which is what lets one GEMM per k/v
// head serve the whole group. One thread per element of q (or y); i is its
// index there.

__device__ __forceinline__ long long bthd_index(long long i, int T, int NH, int hs, int heads_per_row) {
    // (b, h, t, d) of i in (B, NH, T, hs) -> index of (b, t, h, d) in rows of heads_per_row * hs values
    int d = (int)(i % hs);
    long long r = i / hs;
    int t = (int)(r % T);
    r /= T;
    int h = (int)(r % NH);
    long long b = r / NH;
    return ((b * T + t) * heads_per_row + h) * hs + d;
}

__device__ __forceinline__ long long kv_index(long long i, int T, int NH, int NKV, int hs, int* h) {
    // (b, h, t, d) of i in (B, NH, T, hs) -> index of (b, h, t, d) in (B, NKV, T, hs); *h = the head
    long long inner = i % ((long long)T * hs);          // (t, d)
    long long bh = i / ((long long)T * hs);
    *h = (int)(bh % NH);
    return (bh / NH * NKV + *h) * T * hs + inner;
}

// q, k, v <- qkv (forward). n = B * NH * T * hs; the threads of the first
// NKV heads copy k and v too.
extern "C" __global__ void attention_split_heads(floatX* q, floatX* k, floatX* v, const floatX* qkv,
                                                 long long n, int T, int NH, int NKV, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long j = bthd_index(i, T, NH, hs, NH + 2 * NKV);   // q of (b, t, h, d); k and v follow NH * hs later
    q[i] = qkv[j];
    int h;
    long long jkv = kv_index(i, T, NH, NKV, hs, &h);
    if (h < NKV) {
        k[jkv] = qkv[j + (long long)NH * hs];
        v[jkv] = qkv[j + (long long)(NH + NKV) * hs];
    }
}

// dqkv <- dq, dk, dv (backward of the split: the same copy the other way;
// every element of dqkv is written once).
extern "C" __global__ void attention_merge_heads_qkv(floatX* dqkv, const floatX* dq, const floatX* dk,
                                                     const floatX* dv, long long n, int T, int NH, int NKV, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long j = bthd_index(i, T, NH, hs, NH + 2 * NKV);
    dqkv[j] = dq[i];
    int h;
    long long jkv = kv_index(i, T, NH, NKV, hs, &h);
    if (h < NKV) {
        dqkv[j + (long long)NH * hs] = dk[jkv];
        dqkv[j + (long long)(NH + NKV) * hs] = dv[jkv];
    }
}

// out (B, T, NH, hs) <- y (B, NH, T, hs) when to_bthd = 1 (forward);
// y <- out when to_bthd = 0 (the backward takes dy from dout this way).
extern "C" __global__ void attention_heads_bthd(floatX* out, floatX* y, long long n, int T, int NH, int hs,
                                                int to_bthd) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long j = bthd_index(i, T, NH, hs, NH);
    if (to_bthd) out[j] = y[i];
    else y[i] = out[j];
}
