#!/usr/bin/env bash
# One prepared GPU check, sized for a single ~10-minute call on one H100/H200:
# the CUDA-only tests, the pretraining benchmark (ours vs model-only vs published-style, eager
# and compiled) and the bf16-vs-fp32 loss-curve check. Results land in $OUT (or
# outputs/gpu_check): bench.json, bench_compile.json, precision.json, log.txt.
# Needs torch with CUDA, numpy, scipy, tqdm, tensorboard (no SimpleITK: nothing here reads CT).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_perturbations.py tests/test_models.py \
      tests/test_checkpoint.py || echo "CUDA-side tests FAILED"
  timeout 200 "$PY" scripts/benchmark_pretrain.py --device cuda --batch_size 64 --steps 30 --warmup 10 \
      --workers 16 --json "$OUT/bench.json" || echo "benchmark FAILED"
  timeout 180 "$PY" scripts/benchmark_pretrain.py --device cuda --batch_size 64 --steps 30 --warmup 10 \
      --paths model_only,ours --compile --json "$OUT/bench_compile.json" || echo "compiled benchmark FAILED"
  timeout 120 "$PY" scripts/compare_precision.py --device cuda --steps 200 --json "$OUT/precision.json" \
      || echo "precision check FAILED"
} 2>&1 | tee "$OUT/log.txt"
