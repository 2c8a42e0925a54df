#!/usr/bin/env bash
# H200: hf vs graph engine side by side (fp16, prefix reuse, bnb4) on one preset.
# usage: bash scripts/gpu_h200_engines.sh PRESET  -> $OUT/PRESET-engines/{runs,summary}.csv, env.json
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
p=$1
python3 vila_prefix_benchmark.py --preset "$p" --variants fp16,prefix,bnb4 --engine hf,graph --num-runs 20 \
  --text-prompt "What is shown in this image?" --conv-mode vicuna_v1 --output-dir "$OUT/$p-engines" 2>&1 | tee "$OUT/$p-engines.log"
