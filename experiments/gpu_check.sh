#!/usr/bin/env bash
# One prepared GPU check, sized for a single call of under 10 minutes on one H100/H200:
#   1. the throughput benchmark (experiments/benchmark_pretrain.py), compiled (decisive): every
#      path in one run, published-style path with its default 4 loader workers; prints the four goals as met / NOT met;
#   2. the CUDA tests (tests/test_cuda.py and the CUDA cases of the perturbation tests);
#   3. bf16 vs fp32 loss curves (true fp32, plus an fp32 run with other batches for scale);
#   4. the benchmark eager: perturbations alone, model-only and ours without --compile.
# Results land in $OUT (or outputs/gpu_check): bench_compile.json, precision.json, bench.json,
# log.txt. Needs torch with CUDA, numpy, scipy, pytest, tqdm, tensorboard; no SimpleITK.
#   bash experiments/gpu_check.sh
# Give it 10 minutes on a machine with one H100/H200 GPU; the published code's reference
# numbers (benchmark_pretrain.PUBLISHED_H200) were measured on an H200.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BENCH=(experiments/benchmark_pretrain.py --device cuda --batch_size 64 --steps 30 --warmup 10
       --width 32 --cls_classes 44 --input 64x64x32)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  echo "== 1. benchmark, --compile, all paths, 4 workers"
  timeout 220 "$PY" "${BENCH[@]}" --compile --workers 4 --json "$OUT/bench_compile.json" \
      || echo "compiled benchmark FAILED"
  echo "== 2. CUDA tests"
  # -v streams each result, so a timeout (the compiled CLI test is last) still shows the rest
  timeout 140 "$PY" -m pytest -v -rs -p no:cacheprovider tests/test_perturbations.py \
      tests/test_cuda.py || echo "CUDA tests FAILED"
  echo "== 3. bf16 vs fp32"
  timeout 110 "$PY" experiments/compare_precision.py --device cuda --steps 120 --batch_size 32 \
      --reseed_baseline --json "$OUT/precision.json" || echo "precision check FAILED"
  echo "== 4. benchmark, eager (what --compile adds)"
  timeout 70 "$PY" "${BENCH[@]}" --paths ours_perturb,model_only,ours --json "$OUT/bench.json" \
      || echo "eager benchmark FAILED"
  date -u
} 2>&1 | tee "$OUT/log.txt"
