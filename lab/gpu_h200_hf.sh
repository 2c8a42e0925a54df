#!/usr/bin/env bash
# H200 runs for the hf engine: fp16 baseline, cache variants and bitsandbytes, one preset per call.
# usage: bash lab/gpu_h200_hf.sh PRESET   (writes $OUT/PRESET/{runs,summary}.csv, env.json)
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
p=$1
python3 vila_prefix_benchmark.py --preset "$p" --variants fp16,embedcache,prefix,bnb8,bnb4 --num-runs 10 \
  --text-prompt "What is shown in this image?" --conv-mode vicuna_v1 --output-dir "$OUT/$p" 2>&1 | tee "$OUT/$p.log"
