#!/usr/bin/env bash
# The engine's host path on one GPU, in one call: the GPU tests of prefill
# CUDA graphs (with GPU_TESTS=all: the kernel, runner and correctness tests), the roofline of the
# Llama-3.2-1B and Llama-3.1-8B shapes (decode at batch 1/128/256, prefills of
# one prompt with and without prefill CUDA graphs, four prompts, a chunk over a
# cached prefix), then the TTFT of 512-token prompts one at a time through
# `pdserve serve` (8B shape, prefill graphs on) as a ratio to the prefill
# floor. Results go to $OUT (default ./out). GPU_TESTS=none skips the tests
# (to run them in a call of their own: each command has ten minutes).
#
#   bash benchmarks/host_path_gpu.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PORT=${PORT:-30600}
RESULT="$OUT/roofline-host-path.json"
if [ "${GPU_TESTS:-graphs}" = all ]; then
  tests=(tests/test_gpu_kernels.py tests/test_gpu_runner.py tests/test_gpu_correctness.py)
  tests_timeout=420  # about 4 minutes on an H100, HF's model loads included
else
  tests=(tests/test_gpu_kernels.py tests/test_gpu_runner.py -k "tiled or prefill_graph")
  tests_timeout=300
fi
[ "${GPU_TESTS:-graphs}" = none ] || timeout "$tests_timeout" python3 -m pytest "${tests[@]}" -m gpu -q -p no:cacheprovider -x 2>&1 | tail -30 | tee "$OUT/gpu-tests.log"
timeout 420 python3 -m pdserve.benchmarks.roofline --models llama-3.2-1b llama-3.1-8b --decode-batches 1 128 256 \
  --decode-context 768 --prefill-lengths 512 2048 8192 --skip-transfer --attention-backend triton --kernel-profile \
  --output-json "$RESULT" 2>&1 | grep -v '^\[' | tee "$OUT/roofline.log"

python3 -m pdserve.cli serve --model-path benchmarks/configs/llama-3.1-8b.json --load-format dummy \
  --dtype bfloat16 --port "$PORT" --mem-fraction-static 0.5 \
  --attention-backend triton > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health', trust_env=False).status_code != 200)" \
    2>/dev/null && break
  sleep 1
done
timeout 120 python3 -m pdserve.benchmarks.roofline --models llama-3.1-8b --http-ttft "http://127.0.0.1:$PORT" --into "$RESULT" \
  | tee -a "$OUT/roofline.log"
grep -i "prefill cuda graph\|captured" "$OUT/serve.log" | tail -3
