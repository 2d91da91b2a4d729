// encoder.cu: token + position embedding (GPT-2), and the token embedding
// alone (Llama).
//
// forward:  out[b, t, c] = wte[ids[b, t], c] + wpe[t, c]
// backward: the forward gathered rows of wte, so their gradient scatters back:
//               dwte[v, c] += sum over (b, t) with ids[b, t] == v of dout[b, t, c]
//           and wpe[t] was broadcast over the batch, so its gradient sums it:
//               dwpe[t, c] (+)= sum_b dout[b, t, c]
//
// The scatter is made deterministic without atomics: the host sorts the N
// positions by token id (a stable order: key = id * N + position), so equal
// ids form runs, and each run is added up in sorted order. Floating-point
// addition is not associative, so a fixed order is what makes two runs give
// the same bits.
//
// Runs are not short on real text: GPT-2's token 220 (a space) is 15-19% of
// the Python docs, ~11,000 of 65,536 positions in one B=64 T=1024 batch. A
// run walked by one thread per channel would be a serial chain that long
// while the rest of the GPU idles. So the sorted positions are cut into
// segments of ENCODER_SEGMENT (-D, llmpy/ops/cuda_build.py) and summed in two
// passes, both in a fixed order:
//   pass 1, one block per segment: each run inside the segment is summed in
//     sorted order and added to dwte (the same additions as one serial walk);
//     a run that crosses the segment's start or end leaves its partial sum
//     (its "piece") in `pieces` instead;
//   pass 2, one thread per (crossing run, channel): the pieces of the run,
//     segment after segment, then one add into dwte.
#ifndef ENCODER_SEGMENT
#error "compile with -DENCODER_SEGMENT=... (llmpy/ops/cuda_build.py)"
#endif
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

// Llama's embedding: the token rows alone (RoPE, not a table, carries the
// positions); its backward is the dwte scatter-add below, without dwpe.
extern "C" __global__ void embedding_forward(floatX* out, const long long* ids, const floatX* wte, int N, int C) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * C) return;
    out[i] = wte[ids[i / C] * C + i % C];
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

// dwte, pass 1. `sorted_ids` (N) are the token ids in ascending order and
// `order` (N) the position each came from. Block (k, y) takes segment k,
// positions [k S, k S + n) of the sorted order, S = ENCODER_SEGMENT, and
// channel c = y * blockDim.x + threadIdx.x. The segment's ids and positions
// are read once into shared memory; then each thread walks the segment.
// pieces (nseg, 2, C) float32: slot 0 = the segment's first run, if it began
// in the previous segment or goes on into the next; slot 1 = its last run
// (when it is another run), if it goes on into the next. A run lies inside
// one segment or its pieces are in `pieces`, never both, so every row of
// dwte has one writer per channel: no race.
extern "C" __global__ void encoder_backward_wte(floatX* dwte, float* pieces, const floatX* dout,
                                               const long long* sorted_ids, const long long* order, int N, int C) {
    __shared__ long long seg_ids[ENCODER_SEGMENT], seg_pos[ENCODER_SEGMENT];
    int k = blockIdx.x;
    int s0 = k * ENCODER_SEGMENT;
    int n = min(ENCODER_SEGMENT, N - s0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        seg_ids[i] = sorted_ids[s0 + i];
        seg_pos[i] = order[s0 + i];
    }
    __syncthreads();
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    bool from_left = s0 > 0 && sorted_ids[s0 - 1] == seg_ids[0];       // first run began before s0
    bool into_right = s0 + n < N && sorted_ids[s0 + n] == seg_ids[n - 1]; // last run goes on after
    float sum = 0.0f;
    bool first = true;                                     // the run being summed is the segment's first
    for (int i = 0; i < n; i++) {
        sum += to_f(dout[seg_pos[i] * C + c]);
        if (i + 1 < n && seg_ids[i + 1] == seg_ids[i]) continue;
        // a run ends at i (within this segment)
        long long tok = seg_ids[i];
        if ((first && from_left) || (i == n - 1 && into_right)) {
            pieces[((long long)k * 2 + (first ? 0 : 1)) * C + c] = sum;
        } else {
            dwte[tok * C + c] = from_f(to_f(dwte[tok * C + c]) + sum);
        }
        sum = 0.0f;
        first = false;
    }
}

// dwte, pass 2 (after pass 1, same grid). Thread (k, c) owns the run that
// crosses out of segment k at its end if that run BEGAN in segment k; it adds
// the run's pieces in segment order (its piece in k, then the first piece of
// each following segment until the run ends) and the total into dwte.
extern "C" __global__ void encoder_backward_wte_crossing(floatX* dwte, const float* pieces,
                                                        const long long* sorted_ids, int N, int C) {
    int k = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int s0 = k * ENCODER_SEGMENT;
    int s1 = min(s0 + ENCODER_SEGMENT, N);                 // this segment: [s0, s1)
    if (s1 >= N) return;
    long long tok = sorted_ids[s1 - 1];
    if (sorted_ids[s1] != tok) return;                      // the last run ends here: nothing crosses
    bool whole = sorted_ids[s0] == tok;                     // the segment is a single run...
    if (whole && s0 > 0 && sorted_ids[s0 - 1] == tok) return;  // ... begun earlier: another thread's
    float sum = pieces[((long long)k * 2 + (whole ? 0 : 1)) * C + c];
    for (int m = k + 1;; m++) {
        sum += pieces[(long long)m * 2 * C + c];            // the run is segment m's first
        int e = min((m + 1) * ENCODER_SEGMENT, N);
        if (e >= N || sorted_ids[e] != tok) break;          // and it ends in segment m
    }
    dwte[tok * C + c] = from_f(to_f(dwte[tok * C + c]) + sum);
}
