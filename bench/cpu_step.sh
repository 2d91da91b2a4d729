#!/usr/bin/env bash
# The CPU reference benchmark (DESIGN.md section 7): GPT-2 124M (d12), B=4, T=64, fp32,
# llmpy vs eager PyTorch in the same process, repeated RUNS times (the machine is shared
# and noisy: report every run, not the best). Needs llmpy[test] (torch) installed.
#   bash bench/cpu_step.sh [RUNS]
set -euo pipefail
runs=${1:-3}
echo "# $(date -u +%Y-%m-%d) $(lscpu | sed -n 's/^Model name: *//p') x$(nproc), $(python -c 'import numpy; print("numpy", numpy.__version__)')"
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some machines for old OpenBLAS builds) slow a
# current numpy: unset for the benchmark only (bench/cpu_suite.sh prints the kernel that runs)
for i in $(seq "$runs"); do
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m llmpy bench --device cpu --model d12 -B 4 -T 64 --steps 7 --compare torch --json
done
