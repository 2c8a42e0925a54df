#!/usr/bin/env bash
# One seed system's preset (weights=random) on the graph engine: fp16, prefix and awq4 on the demo
# image, then on 16- and 80-frame clips of generated frames (scripts/make_frames.py).
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
