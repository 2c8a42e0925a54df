#!/usr/bin/env bash
# Served vs in-process on one GPU: llava-1.5-7b (weights=random), fp16 on the graph engine.
# In-process run, then `vlm-bench serve` batching up to 16 queued requests (no batching window:
# a lone request starts at once) measured by the endpoint mode at concurrency 1, then over 1/4/16.
# Usage: bash lab/gpu_serve_reference.sh OUT_DIR
set -u
OUT=${1:?output directory}
PY=${PYTHON:-python3}
Q='What is shown in this image?'
PRESET=${PRESET:-llava-1.5-7b}; ENGINE=${ENGINE:-graph}
MODEL=(--preset "$PRESET" --variants fp16 --engine "$ENGINE")
mkdir -p "$OUT"

wait_health() {  # port pid: up to HEALTH_WAIT_S seconds (loading, compiling and capturing every batch size)
  local deadline=$((SECONDS + ${HEALTH_WAIT_S:-1200}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$2" 2>/dev/null || return 1
    $PY - "$1" <<'PYEOF' && return 0
import sys, httpx
try:
    sys.exit(0 if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2).status_code == 200 else 1)
except httpx.HTTPError:
    sys.exit(1)
PYEOF
    sleep 1
  done
  return 1
}

serve() {  # port log extra-args...
  local port=$1 log=$2; shift 2
  $PY -m bench serve "${MODEL[@]}" --port "$port" --served-model-name "$PRESET" "$@" >"$log" 2>&1 &
  SERVER=$!
  wait_health "$port" "$SERVER" || { echo "server on $port did not come up"; tail -20 "$log"; exit 1; }
}

# SIGTERM, not SIGINT: a background job of a script starts with SIGINT ignored, so a server still
# loading or warming up (before uvicorn installs its handlers) would not stop on it
stop() { kill -TERM "$SERVER"; wait "$SERVER"; echo "server exit $?"; SERVER=; }
# a server still running when the script ends (it did not come up in time, a client run was
# interrupted) is stopped, not left holding the GPU and the port
SERVER=
trap '[ -z "$SERVER" ] || { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }' EXIT

set -x
[ -n "${SKIP_INPROCESS:-}" ] || $PY vila_prefix_benchmark.py "${MODEL[@]}" --num-runs 10 --text-prompt "$Q" \
  --output-dir "$OUT/$PRESET-fp16-$ENGINE-inprocess"

serve 8100 "$OUT/serve.log" --max-batch 16 --batch-window-ms 0
$PY -m bench run --endpoint http://127.0.0.1:8100/v1 --model "$PRESET" --text-prompt "$Q" \
  --concurrency 1 --num-prompts 32 --output-dir "$OUT/$PRESET-fp16-$ENGINE-served-c1"
$PY -m bench run --endpoint http://127.0.0.1:8100/v1 --model "$PRESET" --text-prompt "$Q" \
  --concurrency 1,4,16 --num-prompts 32 --output-dir "$OUT/$PRESET-fp16-$ENGINE-served-sweep"
stop
# served against in-process at concurrency 1, the served row's engine phases from the server's timings
$PY -m bench compare "$OUT/$PRESET-fp16-$ENGINE-inprocess" "$OUT/$PRESET-fp16-$ENGINE-served-c1" \
  --across engine,variant,weights,family,device,dtype --metrics ttft_ms,tpot_ms,preprocess_ms,vision_ms,prefill_ms \
  --factor 1.10 >"$OUT/compare-c1.txt" 2>&1
cat "$OUT/compare-c1.txt"
for d in c1 sweep; do $PY lab/served_overhead.py "$OUT/$PRESET-fp16-$ENGINE-served-$d"; done | tee "$OUT/served-overhead.txt"
