#!/usr/bin/env bash
# TTFT through the router, one request at a time: colocated against PD with P
# and D on the same GPU, for 2048-token prompts (Llama-3.2-1B shape, dummy
# weights). Each mode's `pdserve bench` JSON goes to $OUT (default ./out).
#
#   bash benchmarks/pd_ttft_one_gpu.sh [extra pdserve up flags applied to the PD runs]
#
# The PD runs use the cuda_ipc backend and compare the engine's poll interval
# for rooms in flight (--disaggregation-poll-interval-ms: 0.1 is the GPU
# default, 2 the CPU one).
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
MODEL=${MODEL:-benchmarks/configs/llama-3.2-1b.json}
PORT=${PORT:-30500}
SERVE="--load-format dummy --dtype bfloat16 --mem-fraction-static 0.3 --cuda-graph-max-bs 8"

healthy() {
  python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health', trust_env=False).status_code != 200)" 2>/dev/null
}

one() {  # $1: label; the rest: pdserve up flags (serve flags after --)
  local label=$1; shift
  python3 -m pdserve.cli up --model-path "$MODEL" --gpu-ids 0 --port "$PORT" --log-dir "$OUT/logs-$label" "$@" \
    > "$OUT/up-$label.log" 2>&1 &
  local up=$!
  for _ in $(seq 1 300); do healthy && break; sleep 1; done
  python3 -m pdserve.cli bench --base-url "http://127.0.0.1:$PORT" --backend pdserve --dataset random-ids \
    --random-input-len 2048 --random-output-len 4 --num-prompts 32 --max-concurrency 1 --warmup-requests 0 \
    --output-json "$OUT/ttft-$label.json" | grep -E "^(TTFT|ITL)" | sed "s/^/$label /"
  kill -INT "$up"; wait "$up" 2>/dev/null || true
}

one colocated --num-colocated 1 -- $SERVE
one pd-poll0.1 --num-prefill 1 --num-decode 1 --transfer-backend cuda_ipc "$@" -- $SERVE
one pd-poll2 --num-prefill 1 --num-decode 1 --transfer-backend cuda_ipc "$@" -- $SERVE --disaggregation-poll-interval-ms 2
