#!/usr/bin/env bash
# H200: one benchmark command (any flags) into $OUT/NAME, with the quantization wheels installed.
# usage: bash lab/gpu_h200_sweep.sh NAME [vila_prefix_benchmark.py flags...]
#   e.g. bash lab/gpu_h200_sweep.sh internvl3-8b-batch --preset internvl3-8b --engine graph \
#          --variants fp16,prefix,bnb4,awq4 --batch-size 1,4,16
#   -> $OUT/NAME/{runs,summary}.csv, env.json (the command is in env.json)
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
name=$1; shift
python3 vila_prefix_benchmark.py --int4-cache-dir /tmp/int4-cache --output-dir "$OUT/$name" "$@" 2>&1 \
  | grep -v Warning | tail -40
