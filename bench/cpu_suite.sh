#!/usr/bin/env bash
# The CPU suite (issue 14): every shape a CPU user runs (d12 B=4 T=64, d4 B=8 T=128,
# d6 B=8 T=256, d2 B=4 T=64), llmpy vs PyTorch eager fp32, each side in its own child
# process (its own peak RSS), the order alternating from run to run; the machine's lines,
# then one Markdown row per run and shape: ratio, floor share, peak RSS of both.
# Needs llmpy[test] (torch). The same as `llmpy bench --suite --runs RUNS ...`, plus:
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some machines for old OpenBLAS builds) slow a
# current numpy, so they are unset for this command only (the kernel that runs is printed).
#   bash bench/cpu_suite.sh [RUNS] [more flags: --bf16 --steps N --shapes M:B:T,... --quick --json]
set -euo pipefail
runs=${1:-3}
shift || true
py=${PYTHON:-python}
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" -m llmpy bench --suite --runs "$runs" "$@"
