// encoder.cu: token + position embedding.
//
// forward:  out[b, t, c] = wte[ids[b, t], c] + wpe[t, c]
// backward: the forward gathered rows of wte, so their gradient scatters back:
//               dwte[v, c] += sum over (b, t) with ids[b, t] == v of dout[b, t, c]
//           and wpe[t] was broadcast over the batch, so its gradient sums it:
//               dwpe[t, c] (+)= sum_b dout[b, t, c]
//
// The scatter is made deterministic without atomics: the host sorts the N
// positions by token id (a stable order: key = id * N + position), and one
// thread per (run of equal ids, channel) adds that run up in sorted order.
// Floating-point addition is not associative, so a fixed order is what makes
// two runs give the same bits. Runs are short for real text (a token repeats a
// few times per batch), so the serial loop is cheap.
#include "common.cuh"

extern "C" __global__ void encoder_forward(floatX* out, const long long* ids, const floatX* wte,
                                           const floatX* wpe, int N, int T, int C) {
    // one thread per output element (n, c), n = b * T + t
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * C) return;
    int n = (int)(i / C), c = (int)(i % C);
    int t = n % T;
    long long tok = ids[n];
    out[i] = from_f(to_f(wte[tok * C + c]) + to_f(wpe[(long long)t * C + c]));
}

// dwpe: one thread per (t, c), summing the B rows of the batch in order.
// acc = 0 overwrites, acc = 1 adds (gradient accumulation).
extern "C" __global__ void encoder_backward_wpe(floatX* dwpe, const floatX* dout, int B, int T, int C, int acc) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * C) return;
    float sum = 0.0f;
    for (int b = 0; b < B; b++) sum += to_f(dout[(long long)b * T * C + i]);
    dwpe[i] = from_f(acc ? to_f(dwpe[i]) + sum : sum);
}

// dwte: `sorted_ids` (N) are the token ids in ascending order and `order` (N)
// the position each came from. Thread (r, c) with r the first index of a run
// of equal ids adds dout[order[r .. end of run], c] into dwte[id, c]. Threads
// that are not at a run's start do nothing. Every row of dwte is written by
// at most one thread per channel, so there is no race.
extern "C" __global__ void encoder_backward_wte(floatX* dwte, const floatX* dout, const long long* sorted_ids,
                                               const long long* order, int N, int C) {
    int r = blockIdx.x;                                     // one block per sorted position
    if (r > 0 && sorted_ids[r - 1] == sorted_ids[r]) return; // not the start of a run
    long long tok = sorted_ids[r];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sum = 0.0f;
        for (int j = r; j < N && sorted_ids[j] == tok; j++) sum += to_f(dout[order[j] * C + c]);
        dwte[tok * C + c] = from_f(to_f(dwte[tok * C + c]) + sum);
    }
}
