#!/usr/bin/env bash
# One prepared GPU call (issues #24, #31), on both ComfyUI hosts, every part under `timeout` and all of it
# inside one budget (GPU_CHECK_BUDGET_S, default 480 s, counted from the script's first line: the device
# tool stops a command at 600 s). A part that would start with under 30 s left is logged as SKIPPED.
# In this order:
#   (0) start, per host: `main.py --cpu --quick-test-for-ci` under an import blocker (a sitecustomize.py:
#       recipe A of ../shared/docs/gpu-paths.md) that hides the GPU image's missing packages unless a
#       carried wheel provides them -- the proof that the carried wheels are enough (in the dry run too).
#   (1) the real-size SD1.5 and SDXL checkpoints (random weights), generated once into $DTI_TEST_CACHE;
#       (a), (b) and (d) load them from there instead of rebuilding them (~45 s of CPU random numbers each).
#   (a) correctness, on the newest host: bench/gpu_correctness.py on real-size SD1.5 and SDXL (ComfyUI's
#       loader and dtype, the node's own run): loss/gradient every step, underflow, gradient vs fp32, m*,
#       same seed twice, GPU memory after a run and after an injected OOM, teacher-student.
#   (b) speed, the part the 3x goal is judged on: the shared reference recipe beside ours, SDXL 768²×4
#       (ms/step, peak GiB; the reference builds its own SDXL in memory).
#   (c) a real ComfyUI server on the GPU, per host, newest first, ONE pytest CALL PER FLAG SET (each under
#       its own limit): tests/workflows/test_launch_flags.py with --lowvram, --novram, and on 0.33 dynamic
#       VRAM on and off (thin SD1.5 + SDXL through the HTTP API, 2 steps at 64 px); each run's peak GPU
#       memory and how much of the weights sat on the device into $OUT/launch_flags_memory.json.
#   (d) the other speed benches (SDXL 1024²×1 beside the reference, gradient checkpointing, SD1.5
#       512²×1), as many as the budget leaves.
# Sizing (GPU, estimated: no GPU has run it yet): (0) ~10 s per host, (1) ~60-90 s, (a) ~60-120 s, (b) ~40 s
# each, (c) ~30-40 s per flag set (+ the host's thin checkpoints in its first call) -- about 480 s in
# all; (d) and whatever else the budget does not reach is logged as SKIPPED.
# After every part, ComfyUI servers left running under this script's folders ($WORK) are killed (a test
# run killed by `timeout` does not take down a server in its own session; tests/workflows/harness.py
# also has its servers die with their pytest on Linux).
# Untested on a GPU so far (no device was lent to the sessions that wrote it). Its dry run
# (GPU_CHECK_DRY=1, below) runs the same plumbing on the CPU against both hosts.
#
# The hosts: COMFYUI_PATH if set (that one only); else every ComfyUI-<version>.tar.gz in .hostarchives/
# (carried) or ../shared/hosts/, unpacked into /tmp/gpu_check/hosts/<version>; else .comfyui/.
# Prepare here, in the repo root:
#   bash bench/gpu_prepare.sh     # .hostarchives/, .whl/, bench/.reference_recipe_sdxl.py (git-ignored);
#                                 # prints the carry size (~51 MiB) and exits 1 above 60 MiB
# Then, with the device tool:  command: bash bench/gpu_check.sh
#                              carry: [".hostarchives", ".whl", "bench/.reference_recipe_sdxl.py"]  timeout_s: 600
# The wheels (see gpu_prepare.sh) go into /tmp/site (fresh each run; a .whl/<wheel file name>.tar.xz is an
# unpacked wheel: av, 35 MB as a wheel, 24 MB so). Not carried: comfyui-frontend-package (a stub static/ folder is
# made below: the tests use the HTTP API only), templates/docs, kornia, PyOpenGL, comfy-angle (optional).
# What comes back in $OUT: gpu.txt, gpu_check.log (everything printed), gpu_correctness.json,
# launch_flags_memory.json (keyed "<host version> <flag set>"), bench_speed.json (the speed benches'
# reports by name), server_logs.tgz.
#
# GPU_CHECK_DRY=1: the same plumbing on the CPU (thin SD1.5 and SDXL, 2 steps; one thin speed bench, no
# reference; the launch-flag part runs the CPU default flag set on each host, as the GPU flag sets skip
# on a CPU; the import blocker stays on for every part), to check this script before spending device
# time on it; its budget defaults to 1800 s and each part's limit is 4 times the GPU one
# (GPU_CHECK_LIMIT_SCALE). Locally, after bench/gpu_prepare.sh:
#   PATH=$PWD/.venv-ci/bin:$PATH GPU_CHECK_DRY=1 OUT=/tmp/dry bash bench/gpu_check.sh
# (where a carried wheel does not fit the local Python, its local variant from $GPU_CHECK_LOCAL_WHL,
# which gpu_prepare.sh fills, is installed instead; an older host's own pins from .ci/run's overlays,
# $DTI_HOST_OVERLAYS/<version>, go on its PYTHONPATH). Exit status: 1 if any part failed.
set -uo pipefail
START=$SECONDS
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=/tmp/gpu_check
mkdir -p "$WORK" && rm -f "$WORK"/*.json  # (the speed reports of an earlier run on this machine)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
if (( DRY )); then BUDGET=${GPU_CHECK_BUDGET_S:-1800}; else BUDGET=${GPU_CHECK_BUDGET_S:-480}; fi
# each part's limit is sized for the GPU machine; the dry run's CPU parts (2 shared cores) get 4 times as long
if (( DRY )); then LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-4}; else LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-1}; fi
SITE=/tmp/site
LOCAL_WHL=${GPU_CHECK_LOCAL_WHL:-$WORK/whl-local}
FAILED=()

# The carried wheels, into a fresh $SITE.
rm -rf "$SITE" && mkdir -p "$SITE"
python3 - "$SITE" "$DRY" "$LOCAL_WHL" <<'EOF' || FAILED+=("wheel install")
import glob, os, subprocess, sys, tarfile
site, dry, local = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
tags = set(sys_tags())
locals_ = {parse_wheel_filename(os.path.basename(w))[0]: w for w in glob.glob(os.path.join(local, "*.whl"))} if dry else {}
wheels, packed, missing = [], [], []
for path in sorted(glob.glob(".whl/*.whl") + glob.glob(".whl/*.whl.tar.xz")):
    wname = os.path.basename(path).removesuffix(".tar.xz")
    dist, _, _, wtags = parse_wheel_filename(wname)
    if tags & set(wtags):
        (packed if path.endswith(".tar.xz") else wheels).append(path)
    elif dist in locals_:
        print(f"dry run: {wname} does not fit this Python; {os.path.basename(locals_[dist])} instead")
        wheels.append(locals_[dist])
    else:
        missing.append(wname)
for p in packed:  # an unpacked wheel: its files go straight into site-packages
    with tarfile.open(p) as t:
        t.extractall(site, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
rc = 0
if wheels:
    rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--no-cache-dir", "--disable-pip-version-check", "--target", site, *wheels]).returncode
print(f"wheels: {len(wheels)} installed, {len(packed)} unpacked into {site}" + (" -- WHEEL INSTALL FAILED" if rc else ""))
for m in missing:
    print(f"WHEEL DOES NOT FIT this Python, not installed: {m}")
sys.exit(1 if rc or missing else 0)
EOF
# ComfyUI's server exits without a frontend; the tests talk to its HTTP API only.
STUB=$WORK/frontend_stub
mkdir -p "$STUB/comfyui_frontend_package/static"
: > "$STUB/comfyui_frontend_package/__init__.py"
echo '<!doctype html><title>frontend stub (bench/gpu_check.sh)</title>' > "$STUB/comfyui_frontend_package/static/index.html"
FRONT=
python3 -c "import comfyui_frontend_package" 2>/dev/null || FRONT=$STUB
export PYTHONPATH=$SITE${FRONT:+:$FRONT}${PYTHONPATH:+:$PYTHONPATH}

# The import blocker (recipe A): top-level modules the GPU image lacks are found only in the carried
# wheels ($SITE) and the frontend stub; everything else imports as usual.
BLOCKER=$WORK/import_blocker
mkdir -p "$BLOCKER"
cat > "$BLOCKER/sitecustomize.py" <<'EOF'
"""bench/gpu_check.sh's import blocker: the GPU image's missing packages import only from DTI_IMPORT_BLOCKER_ALLOW."""
import importlib.machinery as _machinery
import os as _os

BLOCKED = frozenset("""alembic sqlalchemy pydantic pydantic_core pydantic_settings kornia kornia_rs jsonschema
    jsonschema_specifications mako OpenGL comfy_angle tomlkit dotenv comfyui_frontend_package comfyui_workflow_templates
    comfyui_embedded_docs ray playwright kernels typing_inspection annotated_types referencing rpds greenlet
    av torchsde trampoline spandrel diffusers comfy_aimdo comfy_kitchen blake3 simpleeval""".split())
_ALLOW = [p for p in _os.environ.get("DTI_IMPORT_BLOCKER_ALLOW", "").split(_os.pathsep) if p]
_find_spec = _machinery.PathFinder.find_spec.__func__


def _blocking_find_spec(cls, fullname, path=None, target=None):
    if path is None and fullname in BLOCKED:  # a top-level import of a missing package
        return _find_spec(cls, fullname, _ALLOW, target) if _ALLOW else None
    return _find_spec(cls, fullname, path, target)


_machinery.PathFinder.find_spec = classmethod(_blocking_find_spec)
EOF
export DTI_IMPORT_BLOCKER_ALLOW=$SITE:$STUB
BASE_PYTHONPATH=$PYTHONPATH
# the dry run keeps the blocker on for every part (the GPU image lacks those packages anyway)
(( DRY )) && BASE_PYTHONPATH=$BLOCKER:$PYTHONPATH
export PYTHONPATH=$BASE_PYTHONPATH
export DTI_TEST_CACHE=${DTI_TEST_CACHE:-$WORK/checkpoints}  # (tests add comfyui-<version>/)
export PYTHONUNBUFFERED=1
mkdir -p "$DTI_TEST_CACHE"

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
(( ${#HOSTS[@]} )) || { echo "NO COMFYUI: set COMFYUI_PATH, or carry .hostarchives (see the header)"; FAILED+=("no host"); }
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
PYTHONPATH=$BLOCKER:$PYTHONPATH python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("av", "torchsde", "spandrel", "diffusers", "aiohttp", "comfyui_frontend_package", "comfy_aimdo",
             "comfy_kitchen", "sqlalchemy", "alembic", "pydantic", "pydantic_settings", "kornia"):
    try:
        m = importlib.import_module(name)
        print("import", name, "ok:", getattr(m, "__version__", ""), (getattr(m, "__file__", None) or "").rsplit("/", 2)[0])
    except Exception as e:
        print("import", name, "FAILED (under the import blocker):", repr(e))
EOF

# kill_servers DIR: ComfyUI servers (main.py) left running with a --base-directory under DIR, and their groups.
kill_servers() {
  local f pid cmd n=0
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}; pid=${pid%/cmdline}
    [ "$pid" = "$$" ] && continue
    cmd=$(tr '\0' ' ' < "$f" 2>/dev/null) || continue
    case "$cmd" in *main.py*"--base-directory $1"*) ;; *) continue ;; esac
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    n=$((n + 1))
  done
  (( n == 0 )) || echo "== killed $n leftover ComfyUI server(s) under $1"
}
# run LIMIT_S CMD...: at most LIMIT_S seconds, and never past the script's budget; then no server left behind.
run() {
  local limit=$(( $1 * LIMIT_SCALE )); shift
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 30 )); then echo "== SKIPPED (budget spent, ${left}s left): $*"; SKIPPED+=("$*"); return; fi
  (( limit > left )) && limit=$left
  echo "== [$(( SECONDS - START ))s] [ComfyUI $(version_of "${COMFYUI_PATH:-.}")] $*  (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  kill_servers "$WORK/"
  echo "== rc=$rc after $(( SECONDS - t0 ))s: $*"
  (( rc == 0 )) || { echo "FAILED ($rc): $*"; FAILED+=("$*"); }
}
SKIPPED=()
if [ -f bench/.reference_recipe_sdxl.py ]; then REF=(python3 bench/.reference_recipe_sdxl.py); else
  echo "NO REFERENCE RECIPE: run bench/gpu_prepare.sh (it copies ../shared/bench/reference_recipe_sdxl.py)"; REF=(true); fi

# (0) each host starts with only the carried wheels (the import blocker on)
start_check() {  # HOST: main.py --quick-test-for-ci, its log beside its base folder, the log's tail if it failed
  local h=$1 base=$WORK/start/$(basename "$1")
  rm -rf "$base" && mkdir -p "$base/custom_nodes"
  (cd "$h" && PYTHONPATH=$BLOCKER:$PYTHONPATH python3 main.py --cpu --quick-test-for-ci --base-directory "$base" \
     --database-url sqlite:///:memory: > "$base.log" 2>&1)
  local rc=$?
  grep -h "IMPORT FAILED\|No module named" "$base.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | head -n 20
  (( rc == 0 )) || tail -n 25 "$base.log"
  return $rc
}
export -f start_check
export WORK BLOCKER
for h in "${HOSTS[@]}"; do
  use_host "$h"
  run 60 bash -c 'start_check "$1"' _ "$h"
done
(( ${#HOSTS[@]} )) && use_host "${HOSTS[0]}"

# (1) the real-size checkpoints, once (the thin ones in the dry run)
if (( DRY )); then KINDS=(sd15 sdxl); else KINDS=(sd15-full sdxl-full); fi
run 120 python3 - "${KINDS[@]}" <<'EOF'
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("dti_bench_checkpoints", "tests/host/checkpoints.py")
ck = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ck
spec.loader.exec_module(ck)
ck.setup_comfy(os.environ["COMFYUI_PATH"], cpu=True)
for kind in sys.argv[1:]:
    t0 = time.perf_counter()
    path = ck.ensure_checkpoint(kind, os.environ["DTI_TEST_CACHE"])
    print(f"checkpoint {kind}: {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)", flush=True)
EOF

# (a) correctness, real size, on the newest host
CORRECTNESS_ARGS=()
(( DRY )) && CORRECTNESS_ARGS=(--thin --cpu --models sd15,sdxl --steps 2 --bs 1 --ts-steps 1)
run 150 python3 bench/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --out "$OUT/gpu_correctness.json"

# (b) speed: SDXL 768²×4, the reference and ours in the same run
if (( DRY )); then
  run 150 python3 bench/bench_train_step.py --model sd15 --thin --cpu --res 64 --bs 1 --steps 1 --warmup 1 --out "$WORK/ours_thin.json"
else
  run 75 "${REF[@]}" --res 768 --bs 4 --out "$WORK/ref_768x4.json"
  run 60 python3 bench/bench_train_step.py --model sdxl --res 768 --bs 4 --out "$WORK/ours_768x4.json"
fi

# (c) the real server, per host, one call per flag set (the CPU default flag set in the dry run)
rm -f test-artifacts/launch_flags_memory.json
rm -rf "$WORK/pytest" && mkdir -p "$WORK/pytest"  # (pytest makes each call's --basetemp, not its parent)
for h in "${HOSTS[@]}"; do
  use_host "$h"
  v=$(basename "$h")
  if (( DRY )); then SETS=(cpu-default); else SETS=(lowvram novram dynamic-vram disable-dynamic-vram); fi
  first=1
  for s in "${SETS[@]}"; do
    case $s in *dynamic-vram) grep -q -- "--enable-dynamic-vram" "$h/comfy/cli_args.py" 2>/dev/null \
      || { echo "== not run on ComfyUI $(version_of "$h"): $s (no dynamic VRAM flags)"; continue; } ;; esac
    # (the host's first call also generates its thin test checkpoints)
    run $(( first ? 90 : 60 )) python3 -m pytest -q -rs -p no:cacheprovider --basetemp="$WORK/pytest/$v-$s" \
      "tests/workflows/test_launch_flags.py::test_dti_train_under_launch_flag[$s]"
    first=0
  done
done
(( ${#HOSTS[@]} )) && use_host "${HOSTS[0]}"
cp test-artifacts/launch_flags_memory.json "$OUT/" 2>/dev/null || echo "no launch_flags_memory.json (no CUDA run reached the end)"

# (d) the other speed benches, as many as the budget leaves
if (( ! DRY )); then
  run 75 "${REF[@]}" --res 1024 --bs 1 --out "$WORK/ref_1024x1.json"
  run 60 python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --out "$WORK/ours_1024x1.json"
  run 60 python3 bench/bench_train_step.py --model sdxl --res 1024 --bs 1 --grad-ckpt --out "$WORK/ours_1024x1_ckpt.json"
  run 45 python3 bench/bench_train_step.py --model sd15 --res 512 --bs 1 --grad-ckpt --out "$WORK/ours_sd15_512x1_ckpt.json"
fi
python3 - "$WORK" "$OUT/bench_speed.json" <<'EOF'
import json, pathlib, sys
reports = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(reports, indent=1))
print("speed reports:", ", ".join(reports) or "none")
EOF
{ find "$WORK/pytest" "$WORK/start" -name '*.log' -size -8M 2>/dev/null; } | tar czf "$OUT/server_logs.tgz" -T - 2>/dev/null
kill_servers "$WORK/"
echo "== done in $(( SECONDS - START ))s (budget ${BUDGET}s); ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped"
for f in "${FAILED[@]}"; do echo "   FAILED: $f"; done
for s in "${SKIPPED[@]}"; do echo "   SKIPPED: $s"; done
(( ${#FAILED[@]} == 0 ))
