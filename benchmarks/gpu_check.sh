#!/usr/bin/env bash
# The GPU check of benchmarks/README.md, as one script (about 6 minutes on one H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Step benchmark on the GPU preset (Qwen2-0.5B-sized random model, bf16; step time, tokens/s, peak memory), then
# `_compute_loss` + backward at equal batch with 1,024-token teacher rows (time, peak memory), then one repetition
# with transformers' continuous batching, then padding-free micro-batches (`bench_batching.py`: tokens/s, peak memory,
# time against TRL's layout). Each part has its own time limit, so one failure does not hide the rest.
# Needs torch with CUDA, transformers, trl (1.16) and this repository's src/ (put on PYTHONPATH below).
# PRESET=cpu-batch-bound bash benchmarks/gpu_check.sh runs the same script on a CPU machine (a dry run).
set -u
OUT=${1:-${OUT:-/tmp/luffy-gpu-check}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
PRESET=${PRESET:-gpu}
REPS=${REPS:-5}
cd "$(dirname "$0")"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, trl; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
} 2>&1 | tee "$OUT/device.txt"
filter() { grep -v -E "Warning|warnings.warn|USDT|^Map" ; }
timeout "${STEP_TIMEOUT:-300}" $PY bench_step.py --preset "$PRESET" --reps "$REPS" --steps "${STEPS:-2}" \
    --out "$OUT/bench_step.jsonl" 2>&1 | filter | tee "$OUT/bench_step.txt"
timeout "${LOSS_TIMEOUT:-120}" $PY bench_loss.py --preset "$PRESET" --batch "${LOSS_BATCH:-16}" \
    --completion "${LOSS_COMPLETION:-1024}" --reps "$REPS" --calls 5 2>&1 | filter | tee "$OUT/bench_loss.txt"
timeout "${CB_TIMEOUT:-100}" $PY bench_step.py --preset "$PRESET" --reps 1 --steps 2 --continuous_batching \
    --max_completion_length 128 --trace_tokens 128 --no-cpu_memory --out "$OUT/bench_step_cb.jsonl" 2>&1 \
    | filter | tee "$OUT/bench_step_cb.txt"
timeout "${BATCHING_TIMEOUT:-150}" $PY bench_batching.py --preset "$PRESET" --length_scale "${LENGTH_SCALE:-4}" \
    --reps "${BATCHING_REPS:-3}" --out "$OUT/bench_batching.json" 2>&1 | filter | tail -40 | tee "$OUT/bench_batching.txt"
echo "gpu_check done"
