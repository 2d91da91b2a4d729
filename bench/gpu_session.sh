#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one go, logs under $OUT.
#
#   run (device tool), carry [".whl"]; one command may run 600 s at most, so
#   in two calls:
#     bash bench/gpu_session.sh tests train      (timeout_s 480)
#     bash bench/gpu_session.sh bench scale      (timeout_s 560)
#   (no arguments: all four parts)
#
# .whl holds the cp312 wheels the device image lacks: nvmath-python (cuBLASLt)
# and nvidia-cudnn-frontend (flash attention; cuDNN itself is on the image).
# Fetch them once here (--no-deps: the image has cuda-bindings/core/pathfinder):
#   for w in nvmath-python==1.0.0 nvidia-cudnn-frontend==1.32.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl $w; done
# Without them the CUDA backend falls back to CuPy's cuBLAS and our batched-GEMM
# attention (env.log says which ran).
#
# Each step has its own time limit and the script goes on after a failure, so
# one broken step still leaves the others' results. Read $OUT/summary.txt first.
set -u
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary="$OUT/summary.txt"
: > "$summary"
parts=" ${*:-tests train bench scale} "
want() { [[ "$parts" == *" $1 "* ]]; }

step() {   # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$summary"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >> "$summary"
}

step env 60 bash -c 'nvidia-smi; python3 -c "
import cupy, numpy, llmpy.ops.cuda as c
print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"device\", cupy.cuda.runtime.getDeviceProperties(0)[\"name\"])
print(\"matmuls:\", c.matmul_library); print(\"attention:\", c.attention_library)"'

# 1. correctness: every op vs NumPy (fp32 and bf16), a full step, 100 bf16 steps vs fp32
want tests && step pytest_gpu 300 python3 -m pytest -m gpu -q -rs tests/test_cuda_ops.py tests/test_dist.py \
    --junitxml="$OUT/pytest_gpu.xml"

# 2. end to end: embedded corpus, validation, sampling, checkpoints, resume
want train && step train 150 bash -c "python3 -m llmpy train --device cuda --dtype bf16 --model d4 -B 16 -T 256 \
    --steps 60 --val-every 20 --sample-every 0 --checkpoint-every 30 --stop-at 30 --no-progress --out $OUT/run \
 && python3 -m llmpy train --device cuda --dtype bf16 --model d4 -B 16 -T 256 \
    --steps 60 --val-every 20 --sample-every 0 --checkpoint-every 30 --resume --no-progress --out $OUT/run"

# 3. speed: d12 at the shape, llmpy and torch.compile in one run, then
#    llmpy's time per op (steps run op by op) and without the CUDA graph
want bench && step bench_d12 270 python3 -m llmpy bench --device cuda --model d12 -B 64 -T 1024 --dtype bf16 \
    --compare torch --profile --json
want bench && step bench_d12_table 80 python3 -m llmpy bench --device cuda --model d12 -B 64 -T 1024 --dtype bf16 \
    --no-graphs --profile

# 4. scale: one step of each big model, peak memory
# (d48 first: the one that matters most for fitting in memory)
for m in d48 d36 d24; do
    want scale && step "mem_$m" 60 python3 -m llmpy bench --device cuda --model "$m" -B 4 -T 1024 --dtype bf16 \
        --steps 5 --json
done
echo "done; see $summary"
