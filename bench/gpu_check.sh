#!/usr/bin/env bash
# One prepared GPU call (issue #24), on both ComfyUI hosts, in this order, each part under `timeout` and
# all of it inside one budget (GPU_CHECK_BUDGET_S, default 540 s: the device tool stops a command at 600 s):
#   (a) correctness, on the newest host: bench/gpu_correctness.py on real-size SD1.5 and SDXL (random
#       weights, ComfyUI's loader and dtype, the node's own run): loss/gradient every step, underflow,
#       gradient vs fp32, m*, same seed twice, GPU memory after a run and after an injected OOM,
#       teacher-student. Mostly generating the two random checkpoints (sd15 ~2 GB, sdxl ~7 GB).
#   (b) speed, the part the 3x goal is judged on: the shared reference recipe beside ours, SDXL 768²×4
#       (ms/step, peak GiB; each builds a real-size SDXL in memory first).
#   (c) a real ComfyUI server on the GPU, per host, newest first: tests/workflows/test_launch_flags.py
#       -k "lowvram or novram or dynamic" (thin SD1.5 + SDXL through the HTTP API, 2 steps at 64 px, one
#       server per flag set): --lowvram, --novram, and on 0.33 dynamic VRAM on and off; each run's peak
#       GPU memory and how much of the weights sat on the device into $OUT/launch_flags_memory.json.
#   (d) the other speed benches (SDXL 1024²×1 beside the reference, gradient checkpointing, SD1.5
#       512²×1), as many as the budget leaves; the rest is logged as skipped.
# Untested on a GPU so far (no device was lent to the sessions that wrote it). Its dry run
# (GPU_CHECK_DRY=1, below) runs the same plumbing on the CPU against both hosts.
#
# The hosts: COMFYUI_PATH if set (that one only); else every ComfyUI-<version>.tar.gz in .hostarchives/
# (carried) or ../shared/hosts/, unpacked into /tmp/gpu_check/hosts/<version>; else .comfyui/.
# Prepare here, in the repo root (what is carried must stay under the device tool's 64 MiB):
#   mkdir -p .hostarchives && cp ../shared/hosts/ComfyUI-*.tar.gz .hostarchives/   # 12 MB, git-ignored
#   cp ../shared/bench/reference_recipe_sdxl.py bench/.reference_recipe_sdxl.py    # git-ignored
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl av torchsde trampoline spandrel diffusers comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 blake3 simpleeval
#                                                   # ~45 MB (av alone ~35 MB); .whl/ is git-ignored
#   du -shc .hostarchives .whl .                    # must stay under 64 MiB together
# The GPU image lacks these server/bench packages (KINDS.md): av (comfy_api imports it), torchsde +
# trampoline (comfy.samplers), spandrel, diffusers (the reference recipe), and 0.33's comfy-aimdo and
# comfy-kitchen. Not carried, on purpose: comfyui-frontend-package (53 MB; a stub static/ folder is made
# below: the tests use the HTTP API only), comfyui-workflow-templates / embedded-docs (both hosts start
# without them), SQLAlchemy/alembic (ComfyUI's database is optional: a start-up warning), pydantic and
# kornia (optional nodes that then log IMPORT FAILED).
# Then, with the device tool:  command: bash bench/gpu_check.sh
#                              carry: [".hostarchives", ".whl", "bench/.reference_recipe_sdxl.py"]  timeout_s: 600
# What comes back in $OUT: gpu.txt, gpu_check.log (everything printed), gpu_correctness.json,
# launch_flags_memory.json (keyed "<host version> <flag set>"), bench_speed.json (the speed benches'
# reports by name), server_logs.tgz.
#
# GPU_CHECK_DRY=1: the same plumbing on the CPU (thin SD1.5, 2 steps; one thin speed bench, no reference;
# the launch-flag part runs the CPU default flag set on each host, as the GPU flag sets skip on a CPU),
# to check this script before spending device time on it. Locally:
#   PATH=$PWD/.venv-ci/bin:$PATH GPU_CHECK_DRY=1 OUT=/tmp/dry bash bench/gpu_check.sh
# (an older host's own pins from .ci/run's overlays, $DTI_HOST_OVERLAYS/<version>, go on its PYTHONPATH)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=/tmp/gpu_check
mkdir -p "$WORK" && rm -f "$WORK"/*.json  # (the speed reports of an earlier run on this machine)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-540}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "WHEEL INSTALL FAILED"
fi
if ! python3 -c "import comfyui_frontend_package" 2>/dev/null; then
  # ComfyUI's server exits without a frontend; the tests talk to its HTTP API only.
  mkdir -p /tmp/site/comfyui_frontend_package/static
  : > /tmp/site/comfyui_frontend_package/__init__.py
  echo '<!doctype html><title>frontend stub (bench/gpu_check.sh)</title>' > /tmp/site/comfyui_frontend_package/static/index.html
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
BASE_PYTHONPATH=$PYTHONPATH
export DTI_TEST_CACHE=${DTI_TEST_CACHE:-$WORK/checkpoints}  # (tests and benches add comfyui-<version>/)
export PYTHONUNBUFFERED=1
mkdir -p "$DTI_TEST_CACHE"
DRY=${GPU_CHECK_DRY:-0}

# The hosts, newest first.
HOSTS=()
if [ -n "${COMFYUI_PATH:-}" ]; then
  HOSTS=("$COMFYUI_PATH")
else
  ARCHIVES=.hostarchives
  compgen -G "$ARCHIVES/ComfyUI-*.tar.gz" >/dev/null || ARCHIVES=../shared/hosts
  if compgen -G "$ARCHIVES/ComfyUI-*.tar.gz" >/dev/null; then
    mapfile -t versions < <(cd "$ARCHIVES" && ls ComfyUI-*.tar.gz | sed 's/^ComfyUI-//; s/\.tar\.gz$//' | sort -V -r)
    for v in "${versions[@]}"; do
      dest=$WORK/hosts/$v
      if [ ! -f "$dest/main.py" ]; then
        rm -rf "$dest" && mkdir -p "$dest" && tar -xzf "$ARCHIVES/ComfyUI-$v.tar.gz" -C "$dest" || echo "UNPACK FAILED: $v"
      fi
      HOSTS+=("$dest")
    done
  elif [ -d .comfyui/comfy ]; then
    HOSTS=("$PWD/.comfyui")
  fi
fi
(( ${#HOSTS[@]} )) || echo "NO COMFYUI: set COMFYUI_PATH, or carry .hostarchives (see the header)"
version_of() { sed -n 's/^__version__ *= *"\(.*\)".*/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -n1; }
use_host() {  # COMFYUI_PATH and PYTHONPATH (with an older host's own pins, where .ci/run made an overlay)
  export COMFYUI_PATH=$1
  local overlay=${DTI_HOST_OVERLAYS:-$PWD/.venv-ci/overlays}/$(basename "$1")
  if [ -d "$overlay" ] && [ "$1" != "${HOSTS[0]}" ]; then export PYTHONPATH=$overlay:$BASE_PYTHONPATH
  else export PYTHONPATH=$BASE_PYTHONPATH; fi
}
for h in "${HOSTS[@]}"; do echo "host: ComfyUI $(version_of "$h") at $h"; done | tee -a "$OUT/gpu.txt"

(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  || echo "no nvidia-smi") | tee -a "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("av", "torchsde", "spandrel", "diffusers", "aiohttp", "comfyui_frontend_package", "comfy_aimdo", "comfy_kitchen"):
    try:
        importlib.import_module(name)
        print("import", name, "ok")
    except Exception as e:
        print("import", name, "FAILED:", repr(e))
EOF

# run LIMIT_S CMD...: at most LIMIT_S seconds, and never past the script's budget.
run() {
  local limit=$1; shift
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 30 )); then echo "== SKIPPED (budget spent, ${left}s left): $*"; return; fi
  (( limit > left )) && limit=$left
  echo "== [$(( SECONDS - START ))s] [ComfyUI $(version_of "${COMFYUI_PATH:-.}")] $*  (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "== rc=$rc after $(( SECONDS - t0 ))s: $*"
  (( rc == 0 )) || echo "FAILED ($rc): $*"
}
if [ -f bench/.reference_recipe_sdxl.py ]; then REF=(python3 bench/.reference_recipe_sdxl.py); else
  echo "NO REFERENCE RECIPE: copy ../shared/bench/reference_recipe_sdxl.py to bench/.reference_recipe_sdxl.py"; REF=(true); fi
(( ${#HOSTS[@]} )) && use_host "${HOSTS[0]}"

# (a) correctness, real size, on the newest host
CORRECTNESS_ARGS=()
(( DRY )) && CORRECTNESS_ARGS=(--thin --cpu --models sd15 --steps 2 --bs 1 --ts-steps 1)
run 230 python3 bench/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --out "$OUT/gpu_correctness.json"

# (b) speed: SDXL 768²×4, the reference and ours in the same run
if (( DRY )); then
  run 150 python3 bench/bench_train_step.py --model sd15 --thin --cpu --res 64 --bs 1 --steps 1 --warmup 1 --out "$WORK/ours_thin.json"
else
  run 100 "${REF[@]}" --res 768 --bs 4 --out "$WORK/ref_768x4.json"
  run 100 python3 bench/bench_train_step.py --model sdxl --res 768 --bs 4 --out "$WORK/ours_768x4.json"
fi

# (c) the real server, per host, under the GPU launch flags (the CPU default flag set in the dry run)
rm -f test-artifacts/launch_flags_memory.json
FLAG_SETS="lowvram or novram or dynamic"
(( DRY )) && FLAG_SETS="cpu-default"
for h in "${HOSTS[@]}"; do
  use_host "$h"
  run 150 python3 -m pytest -q -rs -p no:cacheprovider tests/workflows/test_launch_flags.py -k "$FLAG_SETS"
done
(( ${#HOSTS[@]} )) && use_host "${HOSTS[0]}"
cp test-artifacts/launch_flags_memory.json "$OUT/" 2>/dev/null || echo "no launch_flags_memory.json (no CUDA run reached the end)"
find /tmp -path '*comfyui_*' -name '*.log' -newer "$OUT/gpu.txt" -size -8M 2>/dev/null | tar czf "$OUT/server_logs.tgz" -T - 2>/dev/null

# (d) the other speed benches, as many as the budget leaves
if (( ! DRY )); then
  run 100 "${REF[@]}" --res 1024 --bs 1 --out "$WORK/ref_1024x1.json"
  run 100 python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --out "$WORK/ours_1024x1.json"
  run 100 python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --grad-ckpt --out "$WORK/ours_1024x1_ckpt.json"
  run 100 python3 bench/bench_train_step.py --model sd15 --res 512 --bs 1 --grad-ckpt --out "$WORK/ours_sd15_512x1_ckpt.json"
fi
python3 - "$WORK" "$OUT/bench_speed.json" <<'EOF'
import json, pathlib, sys
reports = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(reports, indent=1))
print("speed reports:", ", ".join(reports) or "none")
EOF
echo "== done in $(( SECONDS - START ))s (budget ${BUDGET}s)"
