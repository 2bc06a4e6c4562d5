#!/usr/bin/env bash
# Build what the device call of bench/gpu_check.sh carries (issue #31), here, in the repo root:
#   .hostarchives/                    copies of ../shared/hosts/ComfyUI-*.tar.gz (both hosts)
#   .whl/                             the wheels the GPU image lacks (cp312, manylinux x86_64)
#   bench/.reference_recipe_sdxl.py   the shared reference recipe (../shared/bench/)
# (all three git-ignored), then measure the whole call -- those paths plus the working tree the device
# tool sends (tracked and untracked-not-ignored files) -- print it, and exit 1 above GPU_PREPARE_LIMIT_MIB
# (default 60; the device tool refuses more than 64 MiB).
#
#   bash bench/gpu_prepare.sh          (PYTHON: the interpreter whose pip downloads; default python3)
#
# The wheels (what the GPU image, /work/.library/device/KINDS.md, lacks), pinned:
#   server:   torchsde + trampoline (comfy.samplers), spandrel, blake3, simpleeval, and 0.33's comfy-aimdo
#             and comfy-kitchen -- comfy-kitchen's pure-Python wheel (py3-none-any, ~181 KB), not the
#             58 MB manylinux one with its CUDA library (ComfyUI falls back to its own kernels);
#             0.33 does not start without SQLAlchemy (main.py:25 -> app/assets) + alembic + Mako, and
#             pydantic (server.py:48) + pydantic-core + typing-inspection + annotated-types, which the
#             image also lacks; pydantic-settings + python-dotenv (app/ imports them where present);
#             typing-extensions (pydantic needs a recent one).
#   bench:    diffusers (the reference recipe).
#   av:       0.33 does not start without it (nodes.py:31 -> comfy_api.latest._input.video_types:6
#             imports av), but its wheel is 35 MB (ffmpeg's libraries): carried as the unpacked wheel in
#             one .tar.xz (.whl/<wheel name>.tar.xz, ~24 MB; gpu_check.sh unpacks it into /tmp/site).
# Not carried: the frontend (gpu_check.sh makes a stub), templates/docs, kornia, PyOpenGL, comfy-angle
# (optional nodes: IMPORT FAILED lines), greenlet (SQLAlchemy's asyncio extra only).
# gpu_check.sh's first step proves 0.33 and 0.3.64 start with only these (sitecustomize import blocker,
# recipe A of ../shared/docs/gpu-paths.md).
#
# For the dry run on this machine (GPU_CHECK_DRY=1), whose Python may not be 3.12: the same versions
# of the platform wheels for the local interpreter (the newest that fits where that version has none)
# go to $GPU_CHECK_LOCAL_WHL (default
# /tmp/gpu_check/whl-local, outside the repo: not carried); gpu_check.sh installs those where a carried
# wheel does not fit the interpreter.
#
# Env: GPU_PREPARE_LIMIT_MIB (60), GPU_PREPARE_SKIP_DOWNLOAD=1 (only
# copy and measure: the size guard on what is there), GPU_PREPARE_LOCAL=0 (no local-interpreter wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHARED=${DTI_SHARED:-../shared}
LIMIT_MIB=${GPU_PREPARE_LIMIT_MIB:-60}
LOCAL_WHL=${GPU_CHECK_LOCAL_WHL:-/tmp/gpu_check/whl-local}
rc=0

# the wheels, name==version; PLATFORM_WHEELS: the ones with compiled code (a local variant for the dry run)
PURE_WHEELS=(torchsde==0.2.6 trampoline==0.1.2 spandrel==0.4.2 simpleeval==1.0.8 comfy-kitchen==0.2.31
             alembic==1.20.1 mako==1.4.3 pydantic==2.14.4 typing-inspection==0.4.5 annotated-types==0.8.0
             pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-extensions==4.16.0 diffusers==0.42.1)
PLATFORM_WHEELS=(comfy-aimdo==0.4.13 blake3==1.0.11 sqlalchemy==2.1.9 pydantic-core==2.50.5 av==19.0.2)
XZ_WHEELS=(av)  # carried unpacked, as one .tar.xz each (the name as in the wheel's file name)
XZ_CACHE=${GPU_PREPARE_XZ_CACHE:-/tmp/gpu_check/xz-cache}  # (xz -9 of av takes about a minute)

mkdir -p .hostarchives
for a in "$SHARED"/hosts/ComfyUI-*.tar.gz; do
  [ -f "$a" ] || { echo "NO HOST ARCHIVES in $SHARED/hosts"; rc=1; break; }
  cmp -s "$a" ".hostarchives/$(basename "$a")" || cp "$a" .hostarchives/
done
if [ -f "$SHARED/bench/reference_recipe_sdxl.py" ]; then
  cp "$SHARED/bench/reference_recipe_sdxl.py" bench/.reference_recipe_sdxl.py
else
  echo "NO REFERENCE RECIPE at $SHARED/bench/reference_recipe_sdxl.py"; rc=1
fi

if [ "${GPU_PREPARE_SKIP_DOWNLOAD:-0}" != 1 ]; then
  rm -rf .whl && mkdir -p .whl
  dl() { "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: "$@" 2>&1 \
           | grep -v "^WARNING: Location" ; return "${PIPESTATUS[0]}"; }
  # pure wheels: --platform any only, so no manylinux wheel (comfy-kitchen's 58 MB one) can be picked
  dl --python-version 3.12 --implementation py --abi none --platform any -d .whl "${PURE_WHEELS[@]}" \
    || { echo "WHEEL DOWNLOAD FAILED (pure)"; rc=1; }
  dl --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
     --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
     -d .whl "${PLATFORM_WHEELS[@]}" || { echo "WHEEL DOWNLOAD FAILED (cp312)"; rc=1; }
  ls .whl/comfy_kitchen-*-py3-none-any.whl >/dev/null 2>&1 || { echo "comfy-kitchen: no py3-none-any wheel"; rc=1; }
  mkdir -p "$XZ_CACHE"
  for n in "${XZ_WHEELS[@]}"; do
    for w in .whl/"$n"-*.whl; do
      [ -f "$w" ] || continue
      packed=$XZ_CACHE/$(basename "$w").tar.xz
      if [ ! -s "$packed" ]; then
        "$PYTHON" - "$w" "$packed" <<'PY' || { echo "PACKING FAILED: $w"; rc=1; continue; }
import io, lzma, os, sys, tarfile, zipfile
src, dst = sys.argv[1:3]
tmp = dst + ".tmp"
with zipfile.ZipFile(src) as z, lzma.open(tmp, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
    for info in z.infolist():
        if info.is_dir():
            continue
        data = z.read(info)
        ti = tarfile.TarInfo(info.filename)
        ti.size = len(data)
        ti.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
        tar.addfile(ti, io.BytesIO(data))
os.replace(tmp, dst)
PY
      fi
      cp "$packed" .whl/ && rm -f "$w"
    done
  done
  if [ "${GPU_PREPARE_LOCAL:-1}" = 1 ]; then  # the local interpreter's variants, for the dry run
    rm -rf "$LOCAL_WHL" && mkdir -p "$LOCAL_WHL"
    for req in "${PLATFORM_WHEELS[@]}"; do  # (av 19 has no wheel before Python 3.12: then the newest that fits)
      dl -d "$LOCAL_WHL" "$req" >/dev/null || dl -d "$LOCAL_WHL" "${req%%==*}" \
        || echo "local-interpreter wheel of $req: download failed (the dry run then lacks it)"
    done
  fi
fi

# the size guard: what the device tool sends -- the carried paths and the working tree
CARRY=(.hostarchives .whl bench/.reference_recipe_sdxl.py)
carried=$(du -scb "${CARRY[@]}" 2>/dev/null | tail -n1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -n1 | cut -f1)
total=$(( ${carried:-0} + ${tree:-0} ))
du -sb "${CARRY[@]}" 2>/dev/null
ls -l .whl 2>/dev/null | awk 'NR>1 {printf "  %9d  %s\n", $5, $9}'
mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }
echo "carry: $(mib "${carried:-0}") MiB carried + $(mib "${tree:-0}") MiB working tree = $(mib "$total") MiB (limit ${LIMIT_MIB} MiB)"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "TOO BIG: $(mib "$total") MiB > ${LIMIT_MIB} MiB: the device call would be refused"; rc=1
fi
echo 'carry: [".hostarchives", ".whl", "bench/.reference_recipe_sdxl.py"]   command: bash bench/gpu_check.sh'
exit $rc
