#!/usr/bin/env bash
# H200: the hf and graph engines side by side on one preset, every weight/cache variant.
# usage: bash lab/gpu_h200_engines.sh PRESET [ENGINES] [VARIANTS] [TAG]
#   ENGINES default hf,graph; VARIANTS default fp16,prefix,bnb4,awq4,awq4+prefix
#   -> $OUT/PRESET-engines-ENGINE[-TAG]/{runs,summary}.csv, env.json (one directory per engine;
#      TAG splits one engine's variants over several device calls)
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
p=$1; engines=${2:-hf,graph}; variants=${3:-fp16,prefix,bnb4,awq4,awq4+prefix}; tag=${4:+-$4}
for e in ${engines//,/ }; do
  python3 vila_prefix_benchmark.py --preset "$p" --variants "$variants" --engine "$e" --num-runs 20 \
    --text-prompt "What is shown in this image?" --conv-mode vicuna_v1 --int4-cache-dir /tmp/int4-cache \
    --output-dir "$OUT/$p-engines-$e$tag" 2>&1 | grep -v Warning | tail -25
done
