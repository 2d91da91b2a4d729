// cudasim.h: run llmpy's CUDA C kernels on the CPU, for tests without a GPU.
//
// A kernel file is compiled as C++ with this header in front. Every CUDA
// thread of a block becomes a fiber with its own stack; all fibers
// of a block run on one OS thread, and a fiber gives up the CPU only where a
// CUDA thread would wait for others: __syncthreads() and the warp-level
// __shfl_*_sync / __syncwarp calls. Blocks run one after another.
//
// What this checks: the kernel's arithmetic, indexing and bounds, its
// reductions (shuffle butterflies, shared-memory trees) and its barriers.
// Threads waiting for each other in a cycle (a lane at __syncthreads while
// its warp waits for it in a shuffle, say) are reported as a deadlock; a
// full-mask shuffle in a warp one of whose lanes has already returned is
// reported (undefined on a GPU). A thread that has returned counts as
// arrived at __syncthreads, as on current GPUs. Between barriers threads run in a chosen order
// (forward, reverse or shuffled): a kernel whose result depends on that
// order has a race. What it cannot check: timing, the memory model beyond
// that, and anything about speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Static shared memory: one copy for the whole block. Blocks run one after
// another, so a function-local static is exactly that. (Dynamic `extern
// __shared__ T name[];` is rewritten by cudasim.py into a pointer to the
// launch's dynamic buffer.)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint3 {
    unsigned x, y, z;
};

namespace cudasim {

// Switching between fibers. On x86-64 a few instructions: push the registers
// the C ABI says a callee must preserve, swap stack pointers, pop them (no
// system call, unlike swapcontext, which also saves the signal mask: that
// made the simulator 10x slower). Elsewhere, ucontext.
#if defined(__x86_64__)
extern "C" void cudasim_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl cudasim_switch
.hidden cudasim_switch
.type cudasim_switch,@function
cudasim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");
struct Context {
    void* sp = nullptr;
};
// A new stack whose first switch "returns" into entry(): six zeroed registers,
// then entry's address for the `ret`, then a fake return address so that
// entry starts with the stack aligned as after a call (rsp + 8 a multiple of 16).
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    c.sp = sp;
}
inline void switch_context(Context& from, Context& to) { cudasim_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Barrier {
    int expected = 0;   // threads still running that must arrive
    int count = 0;      // arrived in this generation
    long gen = 0;       // bumped when everyone has arrived
};

struct Fiber {
    Context ctx;
    uint3 tid;
    int linear = 0;     // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    bool done = false;
    Barrier* waiting = nullptr;
    long wait_gen = 0;
    const char* wait_what = "";
};

struct Warp {
    Barrier bar;
    int lanes = 32;     // threads in this warp (the last warp of a block may be partial)
    int exited = 0;
    uint64_t vals[32];
};

inline Context g_sched;
inline Fiber* g_cur = nullptr;
inline std::vector<Fiber> g_fibers;
inline std::vector<Warp> g_warps;
inline Barrier g_block_bar;
inline std::vector<char*> g_stacks;
inline const size_t STACK = 256 * 1024;
inline std::string g_error;
inline std::function<void()> g_body;
inline dim3 g_grid, g_block;
inline uint3 g_block_idx;
inline char* g_dyn_shared = nullptr;

inline void fail(const std::string& msg) {
    if (g_error.empty()) g_error = msg;
    // back to the scheduler; this fiber is never resumed
    switch_context(g_cur->ctx, g_sched);
}

// Wait until every running thread of `b` has arrived. Threads that have
// returned from the kernel no longer count (as on current GPUs).
inline void arrive(Barrier& b, const char* what) {
    long g = b.gen;
    if (++b.count >= b.expected) {
        b.count = 0;
        b.gen++;
        return;
    }
    g_cur->waiting = &b;
    g_cur->wait_gen = g;
    g_cur->wait_what = what;
    switch_context(g_cur->ctx, g_sched);
}

inline Warp& my_warp() { return g_warps[g_cur->linear / 32]; }
inline int my_lane() { return g_cur->linear % 32; }

template <class T>
inline T shfl(unsigned mask, T v, int src, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 64 bits");
    Warp& w = my_warp();
    if (mask != 0xffffffffu) fail(std::string(what) + ": only the full mask is supported by cudasim");
    if (w.exited) fail(std::string(what) + " with the full mask after a lane of the warp returned");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.vals[my_lane()] = bits;
    arrive(w.bar, what);                  // every lane has written its value
    T out = v;
    if (src >= 0 && src < w.lanes) std::memcpy(&out, &w.vals[src], sizeof(T));
    arrive(w.bar, what);                  // every lane has read: the slots may be reused
    return out;
}

inline void fiber_main() {
    g_body();
    Fiber* f = g_cur;
    f->done = true;
    // A returned thread no longer holds up block barriers.
    g_block_bar.expected--;
    if (g_block_bar.count > 0 && g_block_bar.count >= g_block_bar.expected) {
        g_block_bar.count = 0;
        g_block_bar.gen++;
    }
    Warp& w = my_warp();
    w.exited++;
    w.bar.expected--;
    if (w.bar.count > 0) {
        g_error = "a lane returned while the rest of its warp waits in a warp-synchronous call";
    }
    switch_context(f->ctx, g_sched);
}

// order: 0 forward, 1 reverse, 2 shuffled (fixed seed) between barriers
inline int run_block(int nthreads, int order, unsigned seed) {
    g_fibers.assign(nthreads, Fiber{});
    int nwarps = (nthreads + 31) / 32;
    g_warps.assign(nwarps, Warp{});
    for (int w = 0; w < nwarps; w++) {
        g_warps[w].lanes = std::min(32, nthreads - 32 * w);
        g_warps[w].bar.expected = g_warps[w].lanes;
    }
    g_block_bar = Barrier{};
    g_block_bar.expected = nthreads;
    while ((int)g_stacks.size() < nthreads) g_stacks.push_back(static_cast<char*>(std::malloc(STACK)));
    for (int i = 0; i < nthreads; i++) {
        Fiber& f = g_fibers[i];
        f.linear = i;
        f.tid = uint3{i % g_block.x, (i / g_block.x) % g_block.y, i / (g_block.x * g_block.y)};
        make_context(f.ctx, g_stacks[i], STACK, fiber_main);
    }
    std::vector<int> seq(nthreads);
    for (int i = 0; i < nthreads; i++) seq[i] = order == 1 ? nthreads - 1 - i : i;
    unsigned state = seed * 2654435761u + 1;
    for (;;) {
        if (order == 2) {   // a new permutation every round
            for (int i = nthreads - 1; i > 0; i--) {
                state = state * 1664525u + 1013904223u;
                std::swap(seq[i], seq[state % (i + 1)]);
            }
        }
        bool progressed = false, all_done = true;
        for (int i : seq) {
            Fiber& f = g_fibers[i];
            if (f.done) continue;
            all_done = false;
            if (f.waiting && f.waiting->gen == f.wait_gen) continue;
            f.waiting = nullptr;
            g_cur = &f;
            switch_context(g_sched, f.ctx);
            progressed = true;
            if (!g_error.empty()) return 1;
        }
        if (all_done) return 0;
        if (!progressed) {
            for (Fiber& f : g_fibers)
                if (!f.done) {
                    g_error = std::string("deadlock: thread ") + std::to_string(f.linear) + " waits in " +
                              f.wait_what + " for threads that never arrive";
                    break;
                }
            return 1;
        }
    }
}

inline int launch(dim3 grid, dim3 block, size_t dyn_shared, int order, const std::function<void()>& body,
                  char* err, int errlen) {
    g_error.clear();
    g_body = body;
    g_grid = grid;
    g_block = block;
    int nthreads = block.x * block.y * block.z;
    if (nthreads < 1 || nthreads > 1024) {
        std::snprintf(err, errlen, "block of %d threads (1..1024 allowed)", nthreads);
        return 1;
    }
    std::vector<char> dyn(dyn_shared + 16);
    g_dyn_shared = dyn.data();
    unsigned b = 0;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++, b++) {
                g_block_idx = uint3{x, y, z};
                if (run_block(nthreads, order, b)) {
                    std::snprintf(err, errlen, "block (%u, %u, %u): %s", x, y, z, g_error.c_str());
                    return 1;
                }
            }
    return 0;
}

}  // namespace cudasim

#define threadIdx (cudasim::g_cur->tid)
#define blockIdx (cudasim::g_block_idx)
#define blockDim (cudasim::g_block)
#define gridDim (cudasim::g_grid)
#define warpSize 32

inline void __syncthreads() { cudasim::arrive(cudasim::g_block_bar, "__syncthreads"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) cudasim::fail("__syncwarp: only the full mask is supported by cudasim");
    cudasim::arrive(cudasim::my_warp().bar, "__syncwarp");
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = cudasim::my_lane();
    return cudasim::shfl(mask, v, (lane & ~(width - 1)) | ((lane % width) ^ lane_mask), "__shfl_xor_sync");
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = cudasim::my_lane(), base = lane & ~(width - 1);
    int src = lane + (int)delta;
    return cudasim::shfl(mask, v, src < base + width ? src : lane, "__shfl_down_sync");
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = cudasim::my_lane(), base = lane & ~(width - 1);
    int src = lane - (int)delta;
    return cudasim::shfl(mask, v, src >= base ? src : lane, "__shfl_up_sync");
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = cudasim::my_lane();
    return cudasim::shfl(mask, v, (lane & ~(width - 1)) + (src % width), "__shfl_sync");
}

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }

// The device math library, from the host's.
using std::isfinite;
using std::isnan;
using std::sqrt;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

// bfloat16: the top 16 bits of a float; float -> bf16 rounds to nearest even.
struct __nv_bfloat16 {
    uint16_t x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = uint32_t(b.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};   // stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{uint16_t(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

// 128-bit vector types (loads through them are plain copies here).
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
