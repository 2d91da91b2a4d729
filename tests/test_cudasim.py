"""cudasim, the CPU runner for our CUDA kernels (tests/cudasim), is itself a
test tool, so it is tested: it must run correct kernels correctly and catch
the mistakes it claims to catch. Each kernel here is small CUDA C written for
the purpose."""
from __future__ import annotations

import cudasim
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(cudasim.available() is not None, reason=str(cudasim.available()))

CODE = r"""
// block sum with shuffles and shared memory: every thread adds one value
extern "C" __global__ void block_total(float* out, const float* x, int n) {
    __shared__ float warp_totals[32];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < blockDim.x / 32; w++) s += warp_totals[w];
        out[blockIdx.x] = s;
    }
}

// the same without the barrier: thread 0 may read warp totals not yet written
extern "C" __global__ void block_total_racy(float* out, const float* x, int n) {
    __shared__ float warp_totals[32];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < blockDim.x / 32; w++) s += warp_totals[w];
        out[blockIdx.x] = s;
    }
    __syncthreads();
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = 0.0f;
}

// lane 0 waits at the block barrier while its warp waits for it in a shuffle
extern "C" __global__ void divergent_barrier(float* out) {
    float v = 1.0f;
    if (threadIdx.x == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// lanes >= 16 return, the rest shuffle with the full mask
extern "C" __global__ void shuffle_after_exit(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// one element too many
extern "C" __global__ void off_by_one(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 2.0f;
}

// dynamic shared memory: reverse each block's slice through it
extern "C" __global__ void reverse_block(float* out, const float* x) {
    extern __shared__ float buf[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = x[i];
    __syncthreads();
    out[i] = buf[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void to_bf16(__nv_bfloat16* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(x[i]);
}
"""


@pytest.fixture(scope="module")
def mod():
    return cudasim.RawModule(CODE, order="forward")


def test_reductions_are_right(mod):
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    out = np.full(4, np.nan, np.float32)
    mod.get_function("block_total")((4,), (256,), (out, x, np.int32(1000)))
    want = np.pad(x, (0, 24)).reshape(4, 256).sum(axis=1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_a_missing_barrier_shows_as_a_wrong_result():
    x = np.ones(256, np.float32)
    results = []
    for order in ("forward", "reverse"):
        out = np.full(1, np.nan, np.float32)
        cudasim.RawModule(CODE, order=order).get_function("block_total_racy")((1,), (256,), (out, x, np.int32(256)))
        results.append(out[0])
    # forward order: thread 0 runs first and sees only its own warp's total
    assert results != [256.0, 256.0], results


def test_deadlock_is_reported(mod):
    with pytest.raises(cudasim.CudasimError, match="deadlock"):
        mod.get_function("divergent_barrier")((1,), (32,), (np.zeros(32, np.float32),))


def test_shuffle_after_a_lane_returned_is_reported(mod):
    with pytest.raises(cudasim.CudasimError, match="lane"):
        mod.get_function("shuffle_after_exit")((1,), (32,), (np.zeros(32, np.float32),))


def test_write_past_the_end_is_reported(mod):
    with pytest.raises(cudasim.CudasimError, match="past the end of argument 0"):
        mod.get_function("off_by_one")((1,), (64,), (np.zeros(10, np.float32), np.int32(10)))


def test_dynamic_shared_memory(mod):
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(128, np.float32)
    mod.get_function("reverse_block")((2,), (64,), (out, x), shared_mem=64 * 4)
    np.testing.assert_array_equal(out, np.concatenate([x[63::-1], x[:63:-1]]))


def test_bf16_rounds_to_nearest_even(mod):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(1).standard_normal(999).astype(np.float32)
    x[:4] = [1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, np.inf, -0.0]     # ties go to even
    out = np.zeros(999, np.uint16)
    mod.get_function("to_bf16")((4,), (256,), (out, x, np.int32(999)))
    np.testing.assert_array_equal(out, x.astype(ml_dtypes.bfloat16).view(np.uint16))
