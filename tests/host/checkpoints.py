"""Small, randomly initialised SD1.5 / SDXL checkpoints for host (ComfyUI) tests.

Pure helper: no pytest, no ComfyUI import at module level.  Every function that
needs ComfyUI imports ``comfy`` lazily, so the caller (``tests/host/conftest.py``)
must have put a ComfyUI checkout on ``sys.path`` first (see ``setup_comfy``).

The files are written at test time (never committed).  They are built through
ComfyUI's own classes, so the key layout is exactly what ComfyUI writes and reads:

* UNet: ``supported_models.SD15`` / ``SDXL`` instantiated with a *thin* unet_config
  (all channel multipliers 1, few res blocks / transformer blocks), ``get_model()``,
  saved with ``model_config.process_unet_state_dict_for_saving``.
  ``model_detection.detect_unet_config`` only matches ``model_channels`` (320),
  ``context_dim``, ``adm_in_channels``, ``use_linear_in_transformer``,
  ``use_temporal_attention`` and, for SDXL, the per-res-block ``transformer_depth``
  list ``[0, 0, 2, 2, 10, 10]`` (so SDXL needs 3 levels x 2 res blocks and 20 input
  transformer blocks; the middle and output depths are free and kept at 1).
* Text encoders: ``model_config.clip_target().clip`` (full-size CLIP-L, and CLIP-G
  for SDXL: ComfyUI fixes their configs), saved with
  ``model_config.process_clip_state_dict_for_saving``.
* VAE: ``comfy.ldm.models.autoencoder.AutoencoderKL`` with the ddconfig that
  ``comfy.sd.VAE`` hard-codes for the standard SD VAE (ch 128, ch_mult 1,2,4,4; it
  cannot be made smaller and still be detected as the 8x-downsampling SD VAE).

Every parameter is initialised explicitly from a seeded ``torch.Generator``:
ComfyUI's ops (``comfy.ops.disable_weight_init`` / ``manual_cast``) skip
``reset_parameters`` and leave ``torch.empty`` memory, which turns into NaN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

# Bump whenever the generated weights or layout change, so DTI_TEST_CACHE files
# written by an older generator are never reused (the tag is in the file name).
GENERATOR_VERSION = "g1"
DEFAULT_SEED = 1234

KINDS = ("sd15", "sdxl", "sd2")
FULL_KINDS = ("sd15-full", "sdxl-full")

# Base of what model_detection.detect_unet_config returns for an SD-style UNet.
_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# Thin SD1.5: two levels (one downsample), one res block per level, one
# transformer block everywhere.  Detected as supported_models.SD15.
SD15_UNET_CONFIG = {
    **_UNET_COMMON,
    "adm_in_channels": None,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
}

# Thin SDXL: the level / res-block structure and input transformer depths are
# pinned by detection; channels are all 320 and middle/output depths are 1.
SDXL_UNET_CONFIG = {
    **_UNET_COMMON,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
}

# Thin SD2.x: like SD1.5 but 1024-wide context (OpenCLIP-H) and linear projections in the
# transformers. Detected as supported_models.SD20 (eps; SD2's v-prediction is chosen by
# ComfyUI from trained weights, so tests set it with the ModelSamplingDiscrete node).
SD2_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "use_linear_in_transformer": True,
    "context_dim": 1024,
}

# Real-size UNets (the published SD1.5 / SDXL layouts), for benchmarks only: random
# weights, same shapes and FLOPs as the real models. Output depths are listed
# shallowest-last because the UNet pops them from the end (deepest level first).
SD15_FULL_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
}
SDXL_FULL_UNET_CONFIG = {
    **SDXL_UNET_CONFIG,
    "channel_mult": [1, 2, 4],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
}

# The ddconfig comfy.sd.VAE uses for "decoder.conv_in.weight" with 4 latent channels.
VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

# Init scales.  Linear/conv weights ~ N(0, 0.02); biases 0; norm weights 1.
# CLIP token embeddings: std 0.014/elem -> row norm ~0.39 at 768 (real CLIP-L rows
# are ~0.4) and ~0.50 at 1280.  Position embeddings: std 0.01.
WEIGHT_STD = 0.02
TOKEN_EMBEDDING_STD = 0.014
POSITION_EMBEDDING_STD = 0.01
LOGIT_SCALE = 4.6055  # ComfyUI's own default (log(100))


def _spec(kind):
    if kind not in KINDS + FULL_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS + FULL_KINDS}")
    import comfy.supported_models as sm
    return {
        "sd15": (sm.SD15, SD15_UNET_CONFIG),
        "sdxl": (sm.SDXL, SDXL_UNET_CONFIG),
        "sd2": (sm.SD20, SD2_UNET_CONFIG),
        "sd15-full": (sm.SD15, SD15_FULL_UNET_CONFIG),
        "sdxl-full": (sm.SDXL, SDXL_FULL_UNET_CONFIG),
    }[kind]


def expected_config_class(kind):
    """The comfy.supported_models class ComfyUI must detect for ``kind``."""
    return _spec(kind)[0]


def checkpoint_filename(kind, seed=DEFAULT_SEED, dtype=torch.float16):
    dt = str(dtype).replace("torch.", "")
    return f"dti-test-{kind}-{GENERATOR_VERSION}-seed{seed}-{dt}.safetensors"


# ----------------------------------------------------------------------------
# explicit, deterministic init
# ----------------------------------------------------------------------------

def _is_norm(mod):
    return isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "Norm" in type(mod).__name__


@torch.no_grad()
def init_weights_(root, generator, *, weight_std=WEIGHT_STD,
                  token_embedding_std=TOKEN_EMBEDDING_STD,
                  position_embedding_std=POSITION_EMBEDDING_STD):
    """Initialise *every* parameter of ``root`` in place, deterministically.

    Raises on a parameter it does not know how to initialise (so a new ComfyUI
    module with an odd parameter cannot silently keep ``torch.empty`` garbage) and
    on floating-point buffers (none are expected in the modules built here).
    Returns the number of parameters initialised.
    """
    n = 0
    for mname, mod in root.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "bias":
                p.zero_()
            elif pname == "logit_scale":
                p.fill_(LOGIT_SCALE)
            elif pname == "weight" and _is_norm(mod):
                p.fill_(1.0)
            elif pname == "weight" and isinstance(mod, torch.nn.Embedding):
                std = position_embedding_std if "position" in mname else token_embedding_std
                p.normal_(0.0, std, generator=generator)
            elif pname == "weight" and p.dim() >= 2:
                p.normal_(0.0, weight_std, generator=generator)
            else:
                raise ValueError(f"init_weights_: no rule for parameter {full} {tuple(p.shape)} in {type(mod).__name__}")
            n += p.numel()
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                raise ValueError(f"init_weights_: unexpected floating buffer {mname}.{bname}")
    return n


def _to_saved(sd, dtype):
    out = {}
    for k, t in sd.items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous()
    return out


# ----------------------------------------------------------------------------
# build / save
# ----------------------------------------------------------------------------

def build_state_dict(kind, seed=DEFAULT_SEED, dtype=torch.float16):
    """Return ``(state_dict, info)`` for a thin random checkpoint of ``kind``.

    Components are built one after another and converted to ``dtype`` right away
    to keep the fp32 peak at the size of the largest component (CLIP-G for SDXL).
    """
    import comfy.model_detection
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config_cls, unet_config = _spec(kind)
    model_config = config_cls(dict(unet_config))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    info = {"kind": kind, "seed": seed, "dtype": str(dtype), "params": {}}
    sd = {}

    # UNet (BaseModel / SDXL wrapper; only diffusion_model is saved).
    base = model_config.get_model({}, "")
    info["params"]["unet"] = init_weights_(base.diffusion_model, gen)
    sd.update(_to_saved(model_config.process_unet_state_dict_for_saving(base.diffusion_model.state_dict()), dtype))
    info["model_class"] = f"{type(base).__module__}.{type(base).__qualname__}"
    del base

    # Self-check: ComfyUI's detector must pick the intended config from these keys.
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected) is not config_cls:
        raise AssertionError(f"generated {kind} UNet detected as {type(detected).__name__ if detected is not None else None}, "
                             f"expected {config_cls.__name__}")
    det_cfg = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    for k, v in unet_config.items():
        if det_cfg.get(k) != v:
            raise AssertionError(f"detected unet_config[{k!r}] = {det_cfg.get(k)!r}, generated with {v!r}")

    # Text encoder(s): full-size, as ComfyUI fixes their widths/depths.
    clip_model = model_config.clip_target().clip(device="cpu", dtype=torch.float32)
    info["params"]["clip"] = init_weights_(clip_model, gen)
    sd.update(_to_saved(model_config.process_clip_state_dict_for_saving(clip_model.state_dict()), dtype))
    del clip_model

    # VAE: the standard SD VAE layout (same for SD1.5 and SDXL).
    vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    info["params"]["vae"] = init_weights_(vae, gen)
    sd.update(_to_saved(model_config.process_vae_state_dict_for_saving(vae.state_dict()), dtype))
    del vae

    info["params"]["total"] = sum(v for v in info["params"].values())
    return sd, info


def generate_checkpoint(kind, path, seed=DEFAULT_SEED, dtype=torch.float16):
    """Write a checkpoint of ``kind`` to ``path`` atomically; return info dict."""
    import comfy.utils

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd, info = build_state_dict(kind, seed=seed, dtype=dtype)
    metadata = {"dti_test_generator": GENERATOR_VERSION, "dti_test_kind": kind,
                "dti_test_seed": str(seed), "dti_test_dtype": str(dtype)}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        comfy.utils.save_torch_file(sd, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    info["path"] = str(path)
    info["bytes"] = path.stat().st_size
    info["seconds"] = time.perf_counter() - t0
    return info


def ensure_checkpoint(kind, folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """Return the path of the checkpoint of ``kind`` in ``folder``, generating it if
    missing.  The file name carries GENERATOR_VERSION, seed and dtype, so a cache
    folder never serves a file from another generator version."""
    path = Path(folder) / checkpoint_filename(kind, seed, dtype)
    if not path.exists():
        generate_checkpoint(kind, path, seed=seed, dtype=dtype)
    return path


# ----------------------------------------------------------------------------
# ComfyUI setup / loading
# ----------------------------------------------------------------------------

def is_comfyui_dir(path):
    p = Path(path) if path else None
    return bool(p) and (p / "comfy" / "sd.py").is_file() and (p / "nodes.py").is_file() and (p / "folder_paths.py").is_file()


def setup_comfy(comfy_path, cpu=True):
    """Make ``comfy_path`` importable, headless on the CPU (``cpu=False`` leaves
    ComfyUI's device choice alone, for a GPU run), and return it.

    * ComfyUI's folder goes to ``sys.path[0]``: it has a top-level ``nodes.py``
      (this pack has a ``nodes/`` package at the repo root, which pytest's
      ``pythonpath = ["."]`` also puts on sys.path) and a regular ``tests``
      package (``tests/__init__.py``) that would shadow this repo's ``tests``.
    * If our ``nodes`` package was imported as top-level ``nodes`` before, it is
      evicted from ``sys.modules`` so ComfyUI's own ``import nodes`` (server.py,
      execution.py, comfy_extras, ...) gets ComfyUI's nodes.py.
    * ``args.cpu = True`` is set before ``comfy.model_management`` is imported.
    """
    comfy_path = str(Path(comfy_path).resolve())
    while comfy_path in sys.path:
        sys.path.remove(comfy_path)
    sys.path.insert(0, comfy_path)

    mod = sys.modules.get("nodes")
    if mod is not None and os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) != comfy_path:
        for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
            del sys.modules[name]

    # comfy.cli_args parses an empty argv unless comfy.options.enable_args_parsing()
    # was called, so pytest's own command line does not reach ComfyUI's parser.
    from comfy.cli_args import args
    if cpu and "comfy.model_management" in sys.modules:
        import comfy.model_management as mm
        if not args.cpu and mm.cpu_state != mm.CPUState.CPU:
            raise RuntimeError("comfy.model_management was imported before args.cpu was set; "
                               "the device is already chosen")
    if cpu:
        args.cpu = True
    import comfy.model_management  # noqa: F401  (decides the device from args)
    return comfy_path


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


@contextlib.contextmanager
def capture_logs():
    """Record every log record (DEBUG included) while keeping what the existing
    root handlers print unchanged (their level is raised to the old root level
    for the duration, so lowering the root level does not flood the console)."""
    h = _Capture()
    root = logging.getLogger()
    old_level = root.level
    old_handler_levels = [(x, x.level) for x in root.handlers]
    for x, lvl in old_handler_levels:
        x.setLevel(max(lvl, old_level))
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        yield h.records
    finally:
        root.removeHandler(h)
        root.setLevel(old_level)
        for x, lvl in old_handler_levels:
            x.setLevel(lvl)


def load_checkpoint(path, embedding_directory=None, model_options=None):
    """Load like ``CheckpointLoaderSimple`` does inside ComfyUI's executor: with
    ``comfy.sd.load_checkpoint_guess_config(..., output_vae=True, output_clip=True)``
    under ``torch.inference_mode()`` (execution.py runs every node under it, so the
    weights are inference tensors).  Returns ``((model, clip, vae), log_records)``;
    log_records holds ComfyUI's log lines (e.g. "clip missing: ...") of the load.
    """
    import comfy.sd
    with capture_logs() as records, torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=embedding_directory,
            model_options=model_options or {})
    return tuple(out[:3]), records


def load_problems(records):
    """Log lines of a load that mean the checkpoint did not round-trip cleanly.

    ComfyUI itself treats a missing ``clip_l`` ``text_projection`` / ``logit_scale``
    (SD1.x-style checkpoints do not carry them) and an unexpected ``position_ids``
    as normal and logs them at DEBUG; everything else about missing/unexpected/
    left-over keys counts here."""
    out = []
    for level, msg in records:
        low = msg.lower()
        if level in ("ERROR", "CRITICAL"):
            out.append(f"{level}: {msg[:500]}")
        elif level == "WARNING" and any(w in low for w in ("missing", "unexpected", "leftover", "left over")):
            out.append(f"{level}: {msg[:500]}")
        elif low.startswith(("unet missing", "unet unexpected", "leftover vae keys", "missing vae keys")):
            out.append(f"{level}: {msg[:500]}")
        elif low.startswith("left over keys") and "[]" not in low:
            out.append(f"{level}: {msg[:500]}")
    return out


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def human_bytes(n):
    return f"{n / 2**20:.1f} MiB"


__all__ = [
    "GENERATOR_VERSION", "DEFAULT_SEED", "KINDS", "SD15_UNET_CONFIG", "SDXL_UNET_CONFIG", "VAE_DDCONFIG",
    "expected_config_class", "checkpoint_filename", "init_weights_", "build_state_dict",
    "generate_checkpoint", "ensure_checkpoint", "is_comfyui_dir", "setup_comfy", "capture_logs",
    "load_checkpoint", "load_problems", "param_count", "human_bytes",
]
