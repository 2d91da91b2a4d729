#!/usr/bin/env bash
# The CPU suite (issue 14): every shape a CPU user runs (d12 B=4 T=64, d4 B=8 T=128,
# d6 B=8 T=256, d2 B=4 T=64), llmpy vs PyTorch eager fp32, each side in its own child
# process (its own peak RSS), the order alternating from run to run; one Markdown row per
# run and shape: ratio, floor share, peak RSS of both. Needs llmpy[test] (torch).
#   bash bench/cpu_suite.sh [RUNS] [more flags: --bf16 --steps N --shapes M:B:T,... --quick --json]
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some machines for old OpenBLAS builds) slow a
# current numpy: they are unset for this command only, and the kernel that runs is printed.
set -euo pipefail
runs=${1:-3}
shift || true
py=${PYTHON:-python}
echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(lscpu | sed -n 's/^Model name: *//p') x$(nproc); load:$(uptime | sed 's/.*load average://')"
echo "# cpu flags: $(grep -o -w -E 'avx512f|avx512_bf16|amx_bf16|amx_tile|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" -c '
import numpy, threadpoolctl, torch
blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"][0]
print("# numpy %s (%s %s kernels, %s threads), torch %s" % (numpy.__version__, blas["internal_api"],
      blas["architecture"], blas["num_threads"], torch.__version__))'
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" -m llmpy.bench --suite --runs "$runs" "$@"
echo "# load after:$(uptime | sed 's/.*load average://')"
