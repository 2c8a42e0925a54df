#!/usr/bin/env bash
# First GPU contact: versions, then both 7B-class presets with the fp16 baseline.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
for p in llava-1.5-7b vila1.5-3b; do
  python3 vila_prefix_benchmark.py --preset $p --variants fp16 --num-runs 10 --text-prompt "What is shown in this image?" \
    --conv-mode vicuna_v1 --output-dir "$OUT/$p" 2>&1 | tail -20
done
