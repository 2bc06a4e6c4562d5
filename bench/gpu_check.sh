#!/usr/bin/env bash
# One prepared GPU call for issue #15, in this order, each part under `timeout` and all of it inside
# one budget (GPU_CHECK_BUDGET_S, default 540 s: the device tool stops a command at 600 s):
#   (a) correctness: bench/gpu_correctness.py on real-size SD1.5 and SDXL (random weights, ComfyUI's
#       loader and dtype, the node's own run): loss/gradient every step, underflow, gradient vs fp32,
#       m*, same seed twice, GPU memory after a run and after an injected OOM, teacher-student.
#       Expected ~2.5-3.5 min on an H100, mostly generating the two random checkpoints on the CPU
#       (sd15-full ~2 GB, sdxl-full ~7 GB) and loading them; the node runs themselves take seconds.
#   (b) a real ComfyUI server on the GPU: tests/workflows/test_launch_flags.py -k "lowvram or novram or
#       dynamic" (thin SD1.5 + SDXL through the HTTP API, 2 steps at 64 px, one server per flag set):
#       --lowvram, --novram, and on 0.33 dynamic VRAM on and off (--enable/--disable-dynamic-vram), each
#       run's peak GPU memory from DTI Train's log line into $OUT/launch_flags_memory.json.
#       Expected ~2.5-4 min (the thin checkpoints are generated first, ~40 s; four server starts).
#   (c) the speed benches, the shared reference recipe beside ours, as many as the budget leaves
#       (~30-60 s each: each builds a real-size SDXL in memory first); the rest is logged as skipped.
# Untested on a GPU so far (no device was lent to the sessions that wrote it); the CPU test
# tests/host/test_bench.py runs (a) on the thin SD1.5 and the speed benches on the CPU.
#
# Prepare here, in the repo root (the working tree must stay under the device tool's 64 MiB):
#   mkdir .comfyui && tar -xzf ../shared/hosts/ComfyUI-0.33.0.tar.gz -C .comfyui \
#     && echo /.comfyui/ >> "$(git rev-parse --git-common-dir)/info/exclude"   # the host users run (~20 MB)
#   cp ../shared/bench/reference_recipe_sdxl.py bench/.reference_recipe_sdxl.py
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl av torchsde trampoline spandrel diffusers comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 blake3 simpleeval
#                                                   # ~45 MB (av alone ~35 MB); .whl/ is git-ignored
#   (0.33 imports comfy_aimdo and comfy_kitchen at start-up; if the two together pass 64 MiB, carry the
#    0.3.64 tree instead, which needs neither, and part (b)'s dynamic-VRAM runs skip by name)
#   du -shc .comfyui .whl .                                    # must stay under 64 MiB together
# The GPU image lacks these server/bench packages (KINDS.md): av (comfy_api imports it), torchsde +
# trampoline (comfy.samplers), spandrel, diffusers (the reference recipe). Not carried, on purpose:
# comfyui-frontend-package (53 MB; a stub static/ folder is made below: the tests use the HTTP API
# only), SQLAlchemy/alembic (ComfyUI's database is optional: a start-up warning), pydantic and kornia
# (optional nodes that then log IMPORT FAILED).
# Then, with the device tool:  command: bash bench/gpu_check.sh   carry: [".comfyui", ".whl"]   timeout_s: 600
# What comes back in $OUT (at most 8 files): gpu.txt, gpu_check.log (everything printed),
# gpu_correctness.json, launch_flags_memory.json, bench_speed.json (the speed benches' reports by name),
# server_logs.tgz.
#
# GPU_CHECK_DRY=1: the same plumbing on the CPU in ~3 min (thin SD1.5, 2 steps; one thin speed bench, no
# reference), to check this script before spending device time on it.
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
export COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.comfyui}
export DTI_TEST_CACHE=${DTI_TEST_CACHE:-$WORK/checkpoints}
export PYTHONUNBUFFERED=1
mkdir -p "$DTI_TEST_CACHE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("av", "torchsde", "spandrel", "diffusers", "aiohttp", "comfyui_frontend_package"):
    try:
        importlib.import_module(name)
        print("import", name, "ok")
    except Exception as e:
        print("import", name, "FAILED:", repr(e))
EOF
[ -d "$COMFYUI_PATH/comfy" ] || echo "NO COMFYUI at $COMFYUI_PATH: carry .comfyui (see the header)"

# run LIMIT_S CMD...: at most LIMIT_S seconds, and never past the script's budget.
run() {
  local limit=$1; shift
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 30 )); then echo "== SKIPPED (budget spent, ${left}s left): $*"; return; fi
  (( limit > left )) && limit=$left
  echo "== [$(( SECONDS - START ))s] $*  (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "== rc=$rc after $(( SECONDS - t0 ))s: $*"
  (( rc == 0 )) || echo "FAILED ($rc): $*"
}

DRY=${GPU_CHECK_DRY:-0}
CORRECTNESS_ARGS=()
(( DRY )) && CORRECTNESS_ARGS=(--thin --cpu --models sd15 --steps 2 --bs 1 --ts-steps 1)

# (a) correctness, real size (~2.5-3.5 min)
run 270 python3 bench/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --out "$OUT/gpu_correctness.json"

# (b) a real ComfyUI server on the GPU under --lowvram and --novram (~1.5-2.5 min)
run 260 python3 -m pytest -q -rs tests/workflows/test_launch_flags.py -k "lowvram or novram or dynamic"
cp test-artifacts/launch_flags_memory.json "$OUT/" 2>/dev/null || echo "no launch_flags_memory.json (no CUDA run reached the end)"
find /tmp -path '*comfyui_*' -name '*.log' -newer "$OUT/gpu.txt" -size -8M 2>/dev/null | tar czf "$OUT/server_logs.tgz" -T - 2>/dev/null

# (c) speed: the reference recipe and ours on the same card (whatever the budget leaves, ~30-60 s each)
if [ -f bench/.reference_recipe_sdxl.py ]; then REF=(python3 bench/.reference_recipe_sdxl.py); else
  echo "NO REFERENCE RECIPE: copy ../shared/bench/reference_recipe_sdxl.py to bench/.reference_recipe_sdxl.py"; REF=(true); fi
if (( DRY )); then
  run 150 python3 bench/bench_train_step.py --model sd15 --thin --cpu --res 64 --bs 1 --steps 1 --warmup 1 --out "$WORK/ours_thin.json"
else
  run 150 "${REF[@]}" --res 768 --bs 4 --out "$WORK/ref_768x4.json"
  run 150 python3 bench/bench_train_step.py --model sdxl --res 768 --bs 4 --out "$WORK/ours_768x4.json"
  run 150 "${REF[@]}" --res 1024 --bs 1 --out "$WORK/ref_1024x1.json"
  run 150 python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --out "$WORK/ours_1024x1.json"
  run 150 python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --grad-ckpt --out "$WORK/ours_1024x1_ckpt.json"
  run 150 python3 bench/bench_train_step.py --model sd15 --res 512 --bs 1 --grad-ckpt --out "$WORK/ours_sd15_512x1_ckpt.json"
fi
python3 - "$WORK" "$OUT/bench_speed.json" <<'EOF'
import json, pathlib, sys
reports = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(reports, indent=1))
print("speed reports:", ", ".join(reports) or "none")
EOF
echo "== done in $(( SECONDS - START ))s (budget ${BUDGET}s)"
