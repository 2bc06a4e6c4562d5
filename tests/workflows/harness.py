"""Helpers for the workflow tests: a real ComfyUI server on loopback, UI -> API workflow
conversion, validation against ``/object_info``, and the test inputs (images, embeddings).

Pure helper: no pytest, never imports ComfyUI (the server is a separate process).  Loaded by
file path from ``conftest.py`` under the unique name ``dti_workflow_harness`` (this repo's
``tests`` package is shadowed by ComfyUI's own ``tests`` package once ComfyUI is on sys.path).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
WORKFLOWS = ("dti_train_sd15.json", "dti_train_sdxl.json", "dti_slerp_concepts.json", "dti_interpolation_strip.json",
             "dti_train_flux_dev.json", "dti_train_lumina2.json", "dti_train_sd35.json", "dti_train_chroma.json",
             "dti_train_z_image.json", "dti_train_flux2_klein.json", "dti_train_wan.json", "dti_train_qwen_image.json",
             "dti_vs_ti.json")
# Workflows that need a newer ComfyUI than the oldest tested: the node type whose absence from the
# server's /object_info says so (a capability, not a version), and why.
NEEDS_NEWER_HOST = {"dti_train_flux2_klein.json": ("EmptyFlux2LatentImage", "FLUX.2 came after ComfyUI 0.3.64")}
PACK_DIR_NAME = "ComfyUI-DTI"

# File names the shipped workflows use (the common public names of the base checkpoints).
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
# Flux.1 dev as users load it: UNETLoader + DualCLIPLoader(type flux) + VAELoader, public names.
FLUX_DIT = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp8_e4m3fn.safetensors"
FLUX_VAE = "ae.safetensors"
# SD3.5 as ComfyUI's SD3.5 examples load it: CheckpointLoaderSimple (MMDiT + VAE) + TripleCLIPLoader
# (FLUX_CLIP_L, SD35_CLIP_G, FLUX_T5: the same public text-encoder files as Flux).
SD35_MEDIUM_CKPT = "sd3.5_medium.safetensors"
SD35_CLIP_G = "clip_g.safetensors"
# A single file with CLIP-L/G and no T5 (CheckpointLoaderSimple alone).
SD35_CKPT = "sd3.5_medium_incl_clips.safetensors"
# Chroma as ComfyUI's Chroma template loads it: UNETLoader + CLIPLoader(type chroma, FLUX_T5) + VAELoader (FLUX_VAE).
CHROMA_DIT = "Chroma1-HD.safetensors"
LUMINA2_DIT = "lumina_2_model_bf16.safetensors"
LUMINA2_GEMMA = "gemma_2_2b_fp16.safetensors"
# Z-Image as ComfyUI's Z-Image template loads it: UNETLoader + CLIPLoader(type lumina2) + VAELoader (FLUX_VAE).
ZIMAGE_DIT = "z_image_turbo_bf16.safetensors"
ZIMAGE_QWEN3 = "qwen_3_4b.safetensors"
# FLUX.2 klein as ComfyUI's klein templates load it: UNETLoader + CLIPLoader(type flux2, the same
# Qwen3-4B file as Z-Image) + VAELoader; the klein base model, as the authors train it.
FLUX2_KLEIN_DIT = "flux-2-klein-base-4b.safetensors"
FLUX2_QWEN3 = ZIMAGE_QWEN3
FLUX2_VAE = "flux2-vae.safetensors"
# Wan 2.1 text-to-video as ComfyUI's Wan template loads it: UNETLoader + CLIPLoader(type wan) + VAELoader.
WAN_DIT = "wan2.1_t2v_1.3B_fp16.safetensors"
WAN_UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
# DTI Evaluate's models in the DTI-vs-TI workflow (models/clip_vision): facebook/dinov2-large and
# openai/clip-vit-large-patch14 (vision tower) under these names; clip_l is FLUX_CLIP_L.
DINOV2_LARGE = "dinov2-large.safetensors"
CLIP_VISION_VITL = "clip-vit-large-patch14.safetensors"
# Qwen-Image as ComfyUI's Qwen-Image template loads it: UNETLoader + CLIPLoader(type qwen_image) + VAELoader.
QWEN_IMAGE_DIT = "qwen_image_fp8_e4m3fn.safetensors"
QWEN_IMAGE_TE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_IMAGE_VAE = "qwen_image_vae.safetensors"


def skip_if_host_lacks(name, object_info):
    """Skip (with the reason) a workflow this ComfyUI cannot load: see NEEDS_NEWER_HOST."""
    import pytest
    if name in NEEDS_NEWER_HOST:
        node, why = NEEDS_NEWER_HOST[name]
        if node not in object_info:
            pytest.skip(f"{name}: this ComfyUI has no {node} node ({why})")
EXAMPLE_IMAGES = ("dti_example_1.png", "dti_example_2.png", "dti_example_3.png")
EXAMPLE_FOLDER = "dti_example"  # under input/: the train workflows' image_folder
CONCEPT_A = "concept_a.safetensors"
CONCEPT_B = "concept_b.safetensors"

# Node types the frontend never sends to the server (graphToPrompt skips them).
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Input options that make the frontend add an extra (non-serialized) widget right after the input's widget.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "image_folder")

# ComfyUI's mutually exclusive VRAM modes (--cpu is one of them).
VRAM_FLAGS = {"--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu"}
# Flags that only mean something on a GPU, with no VRAM mode of their own: 0.33's dynamic VRAM on and
# off. --cpu beside them would crash the start (--enable-dynamic-vram: comfy-aimdo) or train on the CPU
# (--disable-dynamic-vram); a test with them skips on a machine without CUDA instead.
GPU_ONLY_FLAGS = {"--enable-dynamic-vram", "--disable-dynamic-vram"}


def device_args(extra_args) -> list:
    """What ``ComfyServer.start`` puts before ``extra_args``: ``["--cpu"]`` unless the flags pick a VRAM
    mode themselves (ComfyUI takes only one of them) or are GPU-only (``GPU_ONLY_FLAGS``)."""
    return [] if set(extra_args) & (VRAM_FLAGS | GPU_ONLY_FLAGS) else ["--cpu"]


def _die_with_parent(parent_pid):
    """``preexec_fn`` of the server: on Linux, SIGKILL it when the process that started it dies
    (``prctl(PR_SET_PDEATHSIG)``), so a test run killed by ``timeout`` leaves no server behind even though
    the server has a session of its own. Elsewhere (or without libc's prctl), None: nothing.
    (Strictly, when the thread that started it ends: the tests start servers from pytest's main thread.)"""
    if not sys.platform.startswith("linux"):
        return None
    try:  # resolved here, in the parent: the child only calls it (no imports between fork and exec)
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal():
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return set_death_signal


# Test-only custom node: ComfyUI's attention module sees 1 KiB of free memory, so sub-quadratic
# attention takes its chunked, in-place path (the one that broke training on busy machines) on any
# machine. Only attention's view of memory changes; model loading is untouched.
LOW_MEMORY_NODE = '''"""Test-only: ComfyUI's attention module sees 1 KiB of free memory."""
import types
import comfy.ldm.modules.attention as attention
import comfy.model_management as mm

_proxy = types.ModuleType("low_memory_model_management")
_proxy.__getattr__ = lambda name: getattr(mm, name)
_proxy.get_free_memory = lambda dev=None, torch_free_too=False: (1024, 1024) if torch_free_too else 1024
attention.model_management = _proxy
NODE_CLASS_MAPPINGS = {}
'''
LOW_MEMORY_NODE_DIR = "dti_test_low_memory"

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


# ----------------------------------------------------------------------------
# frontends
# ----------------------------------------------------------------------------

# The newest comfyui-frontend-package the browser tests also run on (ComfyUI 0.3.64 pins 1.27.10,
# 0.33.0 pins 1.49.6).
NEWEST_FRONTEND = "1.58.1"


def frontend_cache_dir(version=NEWEST_FRONTEND) -> Path:
    """Where an unpacked wheel of that frontend is looked for: ``$DTI_FRONTEND_CACHE/<version>``, else
    ``~/.cache/dti-frontend/<version>`` (``<dir>/comfyui_frontend_package/static``)."""
    base = os.environ.get("DTI_FRONTEND_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dti-frontend")
    return Path(base) / version


def _static_in(folder):
    for c in (Path(folder), Path(folder) / "comfyui_frontend_package" / "static"):
        if (c / "index.html").is_file():
            return c.resolve()
    return None


def newest_frontend_root():
    """The ``static/`` folder of the newest frontend to pass as ``--front-end-root``: ``DTI_FRONTEND_ROOT``
    (that folder, or the folder the wheel was unpacked into), else the cache folder; None if neither has one."""
    env = os.environ.get("DTI_FRONTEND_ROOT", "").strip()
    return (_static_in(env) if env else None) or _static_in(frontend_cache_dir())


def pinned_frontend_version(comfy_path):
    """The comfyui-frontend-package version the host's requirements.txt pins (None if it pins none)."""
    try:
        text = (Path(comfy_path) / "requirements.txt").read_text()
    except OSError:
        return None
    m = re.search(r"^\s*comfyui-frontend-package\s*==\s*([0-9][^\s#;]*)", text, re.M)
    return m.group(1) if m else None


def pinned_frontend(comfy_path):
    """``(version, root)`` of the frontend the host pins. ``root`` is None when the installed package is
    that version (ComfyUI serves it itself); else the unpacked wheel under ``frontend_cache_dir(version)``
    to pass as ``--front-end-root`` (one venv serves hosts that pin different frontends), or
    ``"missing"`` when there is none."""
    pin = pinned_frontend_version(comfy_path)
    if pin is None or pin == installed_frontend_version():
        return pin or installed_frontend_version(), None
    return pin, _static_in(frontend_cache_dir(pin)) or "missing"


def frontend_version_at(static_root):
    """The version of an unpacked comfyui-frontend-package, from the ``*.dist-info`` beside it; None if unknown."""
    unpacked = Path(static_root).resolve().parent.parent
    for info in sorted(unpacked.glob("comfyui_frontend_package-*.dist-info")):
        return info.name[len("comfyui_frontend_package-"):-len(".dist-info")]
    return None


def installed_frontend_version():
    """The version of the comfyui-frontend-package installed in this Python."""
    from importlib import metadata

    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        return None


# every node the pack registers (its help pages, aliases and translations are checked per node)
DTI_NODES = ("DTITrain", "DTILoadEmbedding", "DTISlerpConcepts", "DTIInterpolationStrip", "DTIInspect",
             "DTIEnableEmbeddings", "DTIEvaluate")


# ----------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------

def _record_timing(kind, name, seconds):
    """Into tests/timings.py's log where the suite loaded it (tests/conftest.py); a no-op for a harness
    used on its own."""
    timings = sys.modules.get("dti_test_timings")
    if timings is not None:
        timings.record(kind, name, seconds)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1 --port N --base-directory BASE`` from a ComfyUI
    checkout, with this repository visible as ``BASE/custom_nodes/ComfyUI-DTI`` (a symlink). The server
    runs in a session of its own and, on Linux, dies with the process that started it."""

    def __init__(self, comfy_path, base_dir, port=None, python=None, extra_args=()):
        self.comfy_path = Path(comfy_path).resolve()
        self.base = Path(base_dir).resolve()
        self.port = port or free_port()
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.proc = None
        self.log_path = self.base / "server.log"
        self._log = None

    # folders --------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def folder(self, *parts) -> Path:
        p = self.base.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def checkpoints(self) -> Path:
        return self.folder("models", "checkpoints")

    @property
    def embeddings(self) -> Path:
        return self.folder("models", "embeddings")

    @property
    def input(self) -> Path:
        return self.folder("input")

    @property
    def output(self) -> Path:
        return self.folder("output")

    def prepare(self) -> None:
        for parts in (("models", "checkpoints"), ("models", "embeddings"), ("input",), ("output",),
                      ("custom_nodes",), ("user",)):
            self.folder(*parts)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)

    def force_low_attention_memory(self) -> None:
        """Install the test-only node that forces chunked sub-quadratic attention (before start)."""
        (self.folder("custom_nodes", LOW_MEMORY_NODE_DIR) / "__init__.py").write_text(LOW_MEMORY_NODE)

    def link_model(self, source, folder, name) -> Path:
        """Symlink ``source`` as ``models/<folder>/<name>`` (diffusion_models, text_encoders, vae, ...)."""
        dst = self.folder("models", folder) / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(Path(source).resolve())
        return dst

    def link_checkpoint(self, source, name) -> Path:
        dst = self.checkpoints / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(Path(source).resolve())
        return dst

    # process --------------------------------------------------------------
    def start(self, timeout=180.0) -> "ComfyServer":
        self.prepare()
        # --cpu unless the flags pick a VRAM mode themselves or need a GPU (device_args)
        device = device_args(self.extra_args)
        cmd = [self.python, "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base),
               # the default database lives inside the ComfyUI checkout; keep the checkout untouched
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as r:
                    if r.status == 200:
                        _record_timing("server start", " ".join(self.extra_args) or "(default flags)",
                                       time.monotonic() - t0)
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout=20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars=6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    # HTTP -----------------------------------------------------------------
    def get_json(self, path, timeout=60.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path, data, timeout=60.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=120)

    def queue(self, prompt: dict, client_id=None) -> str:
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        status, body = self.post_json("/prompt", payload)
        if status != 200:
            raise AssertionError(f"POST /prompt refused the workflow ({status}): {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id, timeout=600.0) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        self.post_json("/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout=600.0, client_id=None) -> dict:
        entry = self.wait(self.queue(prompt, client_id=client_id), timeout=timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            raise AssertionError(f"workflow failed: {json.dumps(errors, indent=1)[:6000]}\n--- server log ---\n"
                                 f"{self.log_tail()}")
        return entry


# ----------------------------------------------------------------------------
# UI workflow -> API prompt (what the frontend's app.graphToPrompt() sends)
# ----------------------------------------------------------------------------

def load_workflow(name_or_path) -> dict:
    p = Path(name_or_path)
    if not p.is_absolute() and not p.exists():
        p = WORKFLOWS_DIR / p
    return json.loads(p.read_text())


def _ordered_inputs(info: dict):
    """(name, spec, required) in the order the frontend creates the node's inputs."""
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        names = order.get(section) or list(specs)
        for n in names:
            if n in specs:
                out.append((n, specs[n], section == "required"))
    return out


def input_type(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else str(t)


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec):
    if isinstance(spec[0], list):
        return spec[0]
    return input_options(spec).get("options")


def widget_slots(info: dict) -> list:
    """The node's ``widgets_values`` layout as the frontend (1.27) builds it: one entry per widget
    input, plus one for the control widget after a seed-like INT ('control_after_generate') and one
    for the upload button after an upload combo.  Entries are input names, or None for the extras."""
    slots = []
    for name, spec, _ in _ordered_inputs(info):
        t = input_type(spec)
        if t not in WIDGET_TYPES:
            continue
        opts = input_options(spec)
        slots.append(name)
        control = opts.get("control_after_generate")
        if t == "INT" and control is None:
            control = name in ("seed", "noise_seed")  # the frontend's legacy convention
        if control and t in ("INT", "FLOAT", "COMBO"):
            slots.append(None)
        if any(opts.get(k) for k in UPLOAD_OPTIONS):
            slots.append(None)
    return slots


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API prompt the Run button would queue.

    Handles what the shipped workflows use: widget values, links into sockets and into widget
    inputs, control/upload widgets, virtual nodes (notes).  Raises on anything it cannot map."""
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node {node['id']}: type {node['type']!r} is not known to this ComfyUI")
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            raise ValueError(f"node {node['id']} ({node['type']}): dict widgets_values are not supported here")
        slots = widget_slots(info)
        if len(values) != len(slots):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, "
                             f"the node has {len(slots)} widgets {slots}")
        inputs = {name: value for name, value in zip(slots, values) if name is not None}
        for inp in node.get("inputs") or []:
            link_id = inp.get("link")
            if link_id is None:
                continue
            origin_id, origin_slot = links[link_id]
            origin = nodes[origin_id]
            if origin["type"] in VIRTUAL_NODES:
                raise ValueError(f"node {node['id']}: input {inp['name']} comes from a {origin['type']} node")
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            inputs[name] = [str(origin_id), origin_slot]
        entry = {"inputs": inputs, "class_type": node["type"]}
        title = node.get("title") or info.get("display_name") or node["type"]
        entry["_meta"] = {"title": title}
        prompt[str(node["id"])] = entry
    return prompt


# ----------------------------------------------------------------------------
# validation against /object_info
# ----------------------------------------------------------------------------

def _types_match(out_type: str, in_type: str) -> bool:
    if out_type == "*" or in_type == "*":
        return True
    a = set(str(out_type).split(","))
    b = set(str(in_type).split(","))
    return bool(a & b)


def validate_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Every problem ComfyUI's validation would find in ``prompt`` (and a few it would not);
    an empty list means valid."""
    problems = []
    for nid, node in prompt.items():
        ctype = node.get("class_type")
        info = object_info.get(ctype)
        where = f"node {nid} ({ctype})"
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        specs = {name: (spec, req) for name, spec, req in _ordered_inputs(info)}
        hidden = set(((info.get("input") or {}).get("hidden") or {}))
        inputs = node.get("inputs", {})
        for name, (spec, req) in specs.items():
            if req and name not in inputs:
                problems.append(f"{where}: required input {name!r} missing")
        for name, value in inputs.items():
            if name not in specs:
                if name not in hidden:
                    problems.append(f"{where}: input {name!r} is not an input of {ctype}")
                continue
            spec, _ = specs[name]
            t, opts = input_type(spec), input_options(spec)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"{where}: {name} links to missing node {value[0]}")
                    continue
                src_info = object_info.get(src["class_type"], {})
                outs = src_info.get("output", [])
                if not isinstance(value[1], int) or not 0 <= value[1] < len(outs):
                    problems.append(f"{where}: {name} links to output {value[1]} of {src['class_type']}, which has {len(outs)}")
                    continue
                out_t = outs[value[1]]
                out_t = "COMBO" if isinstance(out_t, list) else out_t
                if not _types_match(out_t, t):
                    problems.append(f"{where}: {name} wants {t}, gets {out_t} from {src['class_type']}")
                continue
            if t == "COMBO":
                choices = combo_values(spec) or []
                if value not in choices:
                    problems.append(f"{where}: {name}={value!r} is not one of {choices[:20]}")
            elif t == "INT":
                if isinstance(value, bool) or not isinstance(value, int):
                    problems.append(f"{where}: {name}={value!r} is not an integer")
                elif not opts.get("min", -math.inf) <= value <= opts.get("max", math.inf):
                    problems.append(f"{where}: {name}={value} outside [{opts.get('min')}, {opts.get('max')}]")
            elif t == "FLOAT":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problems.append(f"{where}: {name}={value!r} is not a number")
                elif not opts.get("min", -math.inf) <= value <= opts.get("max", math.inf):
                    problems.append(f"{where}: {name}={value} outside [{opts.get('min')}, {opts.get('max')}]")
            elif t == "BOOLEAN":
                if not isinstance(value, bool):
                    problems.append(f"{where}: {name}={value!r} is not a boolean")
            elif t == "STRING":
                if not isinstance(value, str):
                    problems.append(f"{where}: {name}={value!r} is not a string")
            else:
                problems.append(f"{where}: {name} ({t}) must be linked, got the value {value!r}")
    return problems


def validate_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Structural checks on the UI JSON itself: node types known, widget counts, links consistent."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for n in workflow.get("nodes", []):
        if n["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(n["type"])
        if info is None:
            problems.append(f"node {n['id']}: unknown type {n['type']!r}")
            continue
        slots = widget_slots(info)
        if len(n.get("widgets_values") or []) != len(slots):
            problems.append(f"node {n['id']} ({n['type']}): widgets_values {n.get('widgets_values')} "
                            f"do not fit the widgets {slots}")
    for link in workflow.get("links", []):
        lid, o_id, o_slot, t_id, t_slot, ltype = link
        o, t = nodes.get(o_id), nodes.get(t_id)
        if o is None or t is None:
            problems.append(f"link {lid}: missing node")
            continue
        if lid not in (o["outputs"][o_slot].get("links") or []):
            problems.append(f"link {lid}: not listed on output {o_slot} of node {o_id}")
        if t["inputs"][t_slot].get("link") != lid:
            problems.append(f"link {lid}: not set on input {t_slot} of node {t_id}")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        problems.append("last_node_id is smaller than a node id")
    if workflow.get("last_link_id", 0) < max((l[0] for l in workflow.get("links", [])), default=0):
        problems.append("last_link_id is smaller than a link id")
    return problems


def find_nodes(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def set_inputs(prompt: dict, class_type: str, **values) -> None:
    found = find_nodes(prompt, class_type)
    if not found:
        raise KeyError(f"no {class_type} node in the prompt")
    for n in found:
        for k, v in values.items():
            if k not in n["inputs"]:
                raise KeyError(f"{class_type} has no input {k!r} in the prompt")
            n["inputs"][k] = v


# ----------------------------------------------------------------------------
# test inputs
# ----------------------------------------------------------------------------

def write_example_images(folder, names=EXAMPLE_IMAGES, size=96):
    """A simple 'subject' (an orange disc with a dark stripe) on different backgrounds and
    positions, in different sizes, saved as PNG in ``folder`` (for LoadImage) and again in
    ``folder/EXAMPLE_FOLDER`` (the train workflows' image_folder)."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / EXAMPLE_FOLDER).mkdir(parents=True, exist_ok=True)
    backgrounds = [(40, 110, 200), (60, 160, 70), (210, 200, 180), (90, 60, 120)]
    out = []
    for i, name in enumerate(names):
        w = size + 16 * i
        img = Image.new("RGB", (w, size), backgrounds[i % len(backgrounds)])
        d = ImageDraw.Draw(img)
        cx, cy, r = w // 2 + (i - 1) * 8, size // 2, size // 3
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 130, 30))
        d.rectangle([cx - r // 2, cy - 3, cx + r // 2, cy + 3], fill=(30, 30, 30))
        path = folder / name
        img.save(path)
        img.save(folder / EXAMPLE_FOLDER / name)
        out.append(path)
    return out


def write_concept_embeddings(folder, names=(CONCEPT_A, CONCEPT_B), seed=0, m_star=None, num_vectors=1):
    """Two DTI-style embeddings (random unit directions times m*) for SD1.x and SDXL: ``clip_l``
    (768) and ``clip_g`` (1280), with DTI metadata, written with the pack's own writer."""
    import torch

    from dti_core.embedding_file import dti_metadata, save_embedding

    m_star = m_star or {"clip_l": 0.39, "clip_g": 0.5}
    widths = {"clip_l": 768, "clip_g": 1280}
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, filename in enumerate(names):
        stem = filename.rsplit(".", 1)[0]
        vectors = {}
        for key, width in widths.items():
            v = torch.randn(num_vectors, width, generator=g)
            vectors[key] = v / v.norm(dim=-1, keepdim=True) * m_star[key]
        meta = dti_metadata(m_star=m_star, initializer=["dog", "cat"][i % 2], name=stem, steps=0, kappa=0.0)
        paths.append(save_embedding(str(folder), stem, vectors, meta, overwrite=True))
    return paths


def tile_images(paths, out_path, gap=4, background=(24, 24, 28)):
    """Tile images side by side (same height) into one PNG."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    h = max(im.height for im in images)
    w = sum(im.width for im in images) + gap * (len(images) + 1)
    canvas = Image.new("RGB", (w, h + 2 * gap), background)
    x = gap
    for im in images:
        canvas.paste(im, (x, gap))
        x += im.width + gap
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path


def saved_images(entry: dict) -> list[dict]:
    """The images a history entry says were saved (type 'output')."""
    out = []
    for node_out in (entry.get("outputs") or {}).values():
        for im in node_out.get("images", []) or []:
            if im.get("type") == "output":
                out.append(im)
    return out


def image_path(server: ComfyServer, im: dict) -> Path:
    return server.output / im.get("subfolder", "") / im["filename"]


def check_saved_images(server: ComfyServer, entry: dict, count: int, prefix: str) -> list[Path]:
    """The history entry saved ``count`` images, each a non-empty file under ``prefix`` ("DTI/name")."""
    images = saved_images(entry)
    assert len(images) == count, entry["outputs"]
    folder, start = prefix.split("/")
    paths = []
    for im in images:
        path = image_path(server, im)
        assert path.is_file() and path.stat().st_size > 0, im
        assert im["subfolder"] == folder and im["filename"].startswith(start), im
        paths.append(path)
    return paths


def update_docs_images() -> bool:
    """``DTI_UPDATE_DOCS_IMAGES=1``: also refresh docs/images/ (tests always write test-artifacts/)."""
    return os.environ.get("DTI_UPDATE_DOCS_IMAGES", "").strip().lower() in ("1", "true", "yes")


def copy_artifact(src, name) -> Path:
    dst = REPO_ROOT / "test-artifacts" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
