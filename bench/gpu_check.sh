#!/usr/bin/env bash
# The training-throughput comparison of bench/throughput/run.py on a CUDA machine, in under 5 minutes:
# online vs cached teacher outputs (images/s, GPU utilization, data-wait share), bf16 autocast,
# channels_last, pinned memory; accuracy of both modes over 3 seeds on a 3,000-image test subset.
#
#   bash bench/gpu_check.sh                 # data and models from ../shared (or KT_SHARED=DIR)
#   BIG_TEACHER=timm:vit_base_patch16_224 bash bench/gpu_check.sh   # also images/s with a ViT teacher
#
# Writes bench/results/throughput_gpu.{json,md} (and throughput_gpu_vit.* with BIG_TEACHER).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SHARED=${KT_SHARED:-../shared}
RESULTS=${RESULTS:-bench/results}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
"$PY" bench/throughput/run.py --device cuda --shared "$SHARED" --seeds 0 1 2 --test-limit 3000 \
  --windows 3 --window-steps 60 --out "$RESULTS/throughput_gpu" "$@"
if [ -n "${BIG_TEACHER:-}" ]; then
  # An untrained ViT teacher at 224 px: images/s only (what a foundation-model teacher costs).
  "$PY" bench/throughput/run.py --device cuda --shared "$SHARED" --skip-accuracy --teacher "$BIG_TEACHER" \
    --teacher-size 224 --windows 3 --window-steps 60 --out "$RESULTS/throughput_gpu_vit" "$@"
fi
echo "gpu_check: $(( $(date +%s) - t0 )) s"
for f in "$RESULTS/throughput_gpu.md" "$RESULTS/throughput_gpu_vit.md"; do
  [ -f "$f" ] && cat "$f"
done
