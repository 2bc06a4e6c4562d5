#!/usr/bin/env bash
# One prepared GPU run: the pack's training step and the shared reference recipe, side by side,
# in the same call on the same card. Untested on a GPU so far (no device was lent to the session
# that wrote it); run it with the device tool from the repo root:
#
#   here:  cp -r /opt/ComfyUI .comfyui && echo /.comfyui/ >> .git/info/exclude
#          cp ../shared/bench/reference_recipe_sdxl.py bench/.reference_recipe_sdxl.py
#          pip download for python 3.12 manylinux into .whl/: diffusers, torchsde, trampoline (see the device README)
#   there: bash bench/gpu_check.sh   (carry: .comfyui, .whl)
set -uo pipefail
mkdir -p "${OUT:-/tmp/out}"
OUT=${OUT:-/tmp/out}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.comfyui}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
run() { echo "== $*"; timeout 240 "$@" || echo "FAILED ($?): $*"; }
run python3 bench/.reference_recipe_sdxl.py --res 768 --bs 4 --out "$OUT/ref_768x4.json"
run python3 bench/bench_train_step.py --model sdxl --res 768 --bs 4 --out "$OUT/ours_768x4.json"
run python3 bench/.reference_recipe_sdxl.py --res 1024 --bs 1 --out "$OUT/ref_1024x1.json"
run python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --out "$OUT/ours_1024x1.json"
run python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --grad-ckpt --out "$OUT/ours_1024x1_ckpt.json"
run python3 bench/bench_train_step.py --model sd15 --res 512 --bs 1 --grad-ckpt --out "$OUT/ours_sd15_512x1_ckpt.json"
