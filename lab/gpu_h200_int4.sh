#!/usr/bin/env bash
# H200: int4 (rtn4 / awq4) against fp16 under the hf and graph engines on one preset, plus the
# per-linear kernel costs that set --int4-dense-rows.
# usage: bash lab/gpu_h200_int4.sh PRESET [STAGES]   STAGES: any of kernels,graph,hf (default all)
#   -> $OUT/int4_kernels_PRESET.csv, $OUT/PRESET-int4-ENGINE/{runs,summary}.csv, env.json, logs
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
p=$1; stages=${2:-kernels,graph,hf}
if [[ $stages == *kernels* ]]; then
  python3 lab/gpu_int4_kernels.py --preset "$p" --out "$OUT/int4_kernels_$p.csv" 2>&1 | tee "$OUT/int4_kernels_$p.log"
fi
for engine in graph hf; do
  [[ $stages == *$engine* ]] || continue
  python3 vila_prefix_benchmark.py --preset "$p" --variants fp16,rtn4,awq4,awq4+prefix --engine $engine --num-runs 10 \
    --text-prompt "What is shown in this image?" --conv-mode vicuna_v1 --int4-cache-dir /tmp/int4-cache \
    --output-dir "$OUT/$p-int4-$engine" 2>&1 | tee "$OUT/$p-int4-$engine.log"
done
# saved int4 models stay in /tmp on the device (GBs): a later stage on the same machine reuses them
