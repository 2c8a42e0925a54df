#!/usr/bin/env bash
# int4 reference runs for one preset (weights=random) on the graph engine: fp16, awq4 and
# awq4+prefix at batch 1, 4, 8 and 16 with the decode kernel per row count measured on this GPU,
# then the kernel table, then awq4 with the opt-in dense prefill copy, with Marlin's GEMM and with
# FBGEMM's mixed-input GEMM for prefill. Usage: bash lab/gpu_int4_reference.sh PRESET OUT_DIR [CANDIDATES]
# STAGES=batch or STAGES=prefill runs one half; BATCH_SIZES (default 1,4,8,16) the batch stage's sizes. A stage stopped part-way (a time limit) is finished by
# running the same command again: a directory that already holds runs.csv is continued with --resume
# (its finished groups are kept). The first measurement of a 7B's int4 kernels on a GPU is most of the
# batch stage: about nine minutes of the H200's (results/reference/h200/llava-1.5-7b-int4-graph-batch).
# KERNELS_JSON=FILE (a reference directory's kernels.json, measured on this kind of GPU) starts an empty
# cache directory with it: the kernels it timed are not timed again, only candidates and row counts
# it lacks (the kernel table marks the times it took as reused).
# Before each stage's runs, one awq4 request (into the cache directory, not OUT) measures the int4
# kernels the runs will choose from and keeps them in the cache's kernels.json, so that the
# measuring (minutes on a 7B) falls in no run: a run stopped by a time limit and resumed would hold
# fp16 rows of one process and awq4 rows of the next, whose ratio crosses processes.
# EXTRA='--decode-attention split-kv' (say) adds flags to every run and TAG=-splitkv to every
# directory name. Every step runs even after one fails; the script then exits 1.
set -uE
failed=0
trap 'failed=1' ERR
STAGES=${STAGES:-batch prefill}
PRESET=${1:?preset}; OUT=${2:?output directory}
# gemlite's GEMMs for 8 to 64 rows (batched decode steps), Marlin's GEMM (compiled on first use, about a
# minute); triton-tiles-splitk is left out: it won no
# shape at any row count in the H100 table (results/reference/h100/llava-1.5-7b-int4-graph-batch at 0d5576d)
CANDIDATES=${3:-tinygemm,dense,gemlite-gemv-revsplitk,fbgemm-shuffled,triton-tiles,triton-f16x2,triton-f16x2-splitk,gemlite-gemm-splitk,gemlite-gemm,marlin}
PY=${PYTHON:-python3}
# the quantized models (GBs) stay out of OUT, which holds results only; kernels.json is copied there
CACHE=${INT4_CACHE_DIR:-${TMPDIR:-/tmp}/vlm-bench-int4-cache-$PRESET}
TAG=${TAG:-}
RUN=($PY vila_prefix_benchmark.py --preset "$PRESET" --engine graph --num-runs 10 --int4-cache-dir "$CACHE"
     --int4-kernels measured --int4-kernel-candidates "$CANDIDATES" --text-prompt 'What is shown in this image?'
     ${EXTRA:-})
kernels_first() {  # ARGS...: one awq4 request with ARGS, so the kernels are measured and kept before the runs
  rm -rf "$CACHE/kernels-first"
  "${RUN[@]}" --variants awq4 --num-runs 1 --warmup 0 --min-seconds 0 --no-fidelity "$@" --output-dir "$CACHE/kernels-first" >/dev/null
}
into() {  # DIR ARGS...: the run into DIR, continued with --resume if an earlier one left rows there
  local dir=$1; shift
  if [[ -f "$dir/runs.csv" ]]; then "${RUN[@]}" "$@" --output-dir "$dir" --resume; else "${RUN[@]}" "$@" --output-dir "$dir"; fi
}
if [[ -n "${KERNELS_JSON:-}" ]]; then
  if [[ -f "$CACHE/kernels.json" ]]; then echo "KERNELS_JSON: $CACHE/kernels.json exists and is used as it is" >&2
  elif [[ ! -f "$KERNELS_JSON" ]]; then echo "KERNELS_JSON: $KERNELS_JSON is not a file" >&2; exit 2
  else mkdir -p "$CACHE" && cp "$KERNELS_JSON" "$CACHE/kernels.json" || exit 2; fi
fi
set -x
if [[ " $STAGES " == *" batch "* ]]; then
  kernels_first
  into "$OUT/$PRESET-int4-graph-batch$TAG" --variants fp16,awq4,awq4+prefix --batch-size "${BATCH_SIZES:-1,4,8,16}"
  $PY -m bench int4-kernels "$CACHE/kernels.json" --out "$OUT/$PRESET-int4-graph-batch$TAG/int4_kernels_$PRESET.csv"
  cp "$CACHE/kernels.json" "$OUT/$PRESET-int4-graph-batch$TAG/"
fi
if [[ " $STAGES " == *" prefill "* ]]; then
  kernels_first
  into "$OUT/$PRESET-awq4-prefill-default$TAG" --variants fp16,awq4
  # fp16 again beside each option: prefill ratios only within one process (a process's fp16 prefill
  # varies by several percent from the next one's on the same GPU)
  kernels_first --int4-prefill-copy  # `dense` reads the copy: measured apart
  into "$OUT/$PRESET-awq4-prefill-copy$TAG" --variants fp16,awq4 --int4-prefill-copy
  into "$OUT/$PRESET-awq4-prefill-marlin$TAG" --variants fp16,awq4 --int4-prefill-kernel marlin
  # FBGEMM's mixed-input GEMM only where fbgemm-gpu-genai imports (else the run would be one skipped row)
  if $PY -c 'import fbgemm_gpu.experimental.gen_ai' 2>/dev/null; then
    into "$OUT/$PRESET-awq4-prefill-fbgemm$TAG" --variants fp16,awq4 --int4-prefill-kernel fbgemm-shuffled
  fi
fi
exit $failed
