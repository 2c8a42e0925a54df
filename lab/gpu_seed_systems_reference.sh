#!/usr/bin/env bash
# One seed system's preset (weights=random) on the graph engine: fp16, prefix and awq4 on the demo
# image, then on 16- and 80-frame clips of generated frames (scripts/make_frames.py); then, with
# ENGINES=1, the other engines on the image (hf, static, graph-exact: every engine runs the family).
# Usage: bash lab/gpu_seed_systems_reference.sh PRESET OUT_DIR
set -u
PRESET=${1:?preset}; OUT=${2:?output directory}
PY=${PYTHON:-python3}
RUN=($PY vila_prefix_benchmark.py --preset "$PRESET" --variants fp16,prefix,awq4 --engine graph --num-runs 10
     --text-prompt 'Describe what happens.')
FRAMES=$(mktemp -d)
$PY scripts/make_frames.py "$FRAMES" 80
set -x
"${RUN[@]}" --output-dir "$OUT/$PRESET-image"
for n in 16 80; do
  "${RUN[@]}" --frames-dir "$FRAMES" --video-mode clip --num-frames "$n" --output-dir "$OUT/$PRESET-clip$n"
done
if [ -n "${ENGINES:-}" ]; then
  $PY vila_prefix_benchmark.py --preset "$PRESET" --variants fp16,awq4 --engine hf,static,graph-exact --num-runs 3 \
    --max-new-tokens 32 --text-prompt 'Describe what happens.' --output-dir "$OUT/$PRESET-engines"
fi
