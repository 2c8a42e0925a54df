#!/usr/bin/env bash
# H200: the graph-exact engine (transformers' arithmetic in CUDA graphs) against hf and graph.
# usage: bash lab/gpu_h200_exact.sh STAGE [PRESET] [ENGINES]
#   tests      the CUDA tests of the static, graph and graph-exact engines and of the int4 kernels
#              (tiny checkpoints)
#   agreement  greedy agreement with hf over 128 tokens and decode step times: hf again, graph,
#              graph-exact (twice), with its projections in turn, uncompiled
#              -> $OUT/agreement_floor_PRESET-exact.csv
#   bench      fp16 and prefix on ENGINES (default hf,graph,graph-exact; one 10-minute device
#              call may not hold all three for a 7B), 20 runs after 5 warm-ups
#              -> $OUT/PRESET-exact-ENGINES/{runs,summary}.csv, env.json
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
stage=$1; p=${2:-llava-1.5-7b}; engines=${3:-hf,graph,graph-exact}
case "$stage" in
  tests)
    python3 -m pytest -q -p no:warnings tests/test_exact_engine.py tests/test_static_engine.py tests/test_int4.py \
      -k cuda -rfE 2>&1 | tail -25 ;;
  agreement)
    python3 lab/gpu_agreement_floor.py --preset "$p" --out "$OUT/agreement_floor_$p-exact.csv" \
      --ways "hf again;graph;graph-exact;graph-exact again;graph-exact, projections in turn;graph-exact, uncompiled" 2>&1 | grep -v Warning | tail -12 ;;
  bench)
    python3 vila_prefix_benchmark.py --preset "$p" --variants fp16,prefix --engine "$engines" \
      --num-runs 20 --warmup 5 --text-prompt "What is shown in this image?" --conv-mode vicuna_v1 \
      --output-dir "$OUT/$p-exact-${engines//,/-}" 2>&1 | grep -v Warning | tail -30 ;;
  *) echo "unknown stage $stage (tests, agreement, bench)"; exit 2 ;;
esac
