"""Small, randomly initialised SD1.5 / SDXL checkpoints for host (ComfyUI) tests, and
Flux.1 dev / schnell, Chroma and SD3 / SD3.5 component files (see the section
"Flux.1 dev / schnell, Chroma, SD3 / SD3.5" further down).

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
import types
from pathlib import Path

import torch

def _record_timing(name, seconds):
    """A generation's time into tests/timings.py's log, where the suite loaded it (tests/conftest.py);
    nothing for this helper used on its own (bench/)."""
    timings = sys.modules.get("dti_test_timings")
    if timings is not None:
        timings.record("model generation", name, seconds)


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
def _init_tensor_(mod, mname, pname, p, generator, *, weight_std=WEIGHT_STD,
                  token_embedding_std=TOKEN_EMBEDDING_STD,
                  position_embedding_std=POSITION_EMBEDDING_STD):
    """Fill ``p`` (parameter ``pname`` of module ``mod`` named ``mname``) by the rule
    ``init_weights_`` documents; raise ValueError when no rule applies."""
    if pname == "bias":
        p.zero_()
    elif pname == "logit_scale":
        p.fill_(LOGIT_SCALE)
    elif pname in ("weight", "scale") and _is_norm(mod):
        # ("scale": the RMSNorm of Flux/Chroma's QK-norm and Chroma's approximator)
        p.fill_(1.0)
    elif pname == "weight" and isinstance(mod, torch.nn.Embedding):
        std = position_embedding_std if "position" in mname else token_embedding_std
        p.normal_(0.0, std, generator=generator)
    elif pname == "weight" and p.dim() >= 2:
        p.normal_(0.0, weight_std, generator=generator)
    elif pname == "modulation" or pname == "gamma" and not _is_norm(mod) and p.dim() >= 3:
        # (Wan's per-block and head modulation tables: N(0, std), as a weight)
        p.normal_(0.0, weight_std, generator=generator)
    elif pname == "gamma":
        # (the Wan VAE's RMS_norm scale)
        p.fill_(1.0)
    elif pname in ("class_embedding", "cls_token", "mask_token"):
        # (the CLIP vision and DINOv2 class / mask tokens: token-like)
        p.normal_(0.0, token_embedding_std, generator=generator)
    elif pname == "position_embeddings":
        # (DINOv2's position table, a plain parameter)
        p.normal_(0.0, position_embedding_std, generator=generator)
    elif pname == "lambda1":
        # (DINOv2's layer scale: its config's layerscale_value, 1.0)
        p.fill_(1.0)
    elif pname.endswith("_pad_token") and not mname:
        # (Z-Image's learned padding rows, x_pad_token / cap_pad_token: token-like)
        p.normal_(0.0, token_embedding_std, generator=generator)
    else:
        full = f"{mname}.{pname}" if mname else pname
        raise ValueError(f"init_weights_: no rule for parameter {full} {tuple(p.shape)} in {type(mod).__name__}")


@torch.no_grad()
def init_weights_(root, generator, *, weight_std=WEIGHT_STD,
                  token_embedding_std=TOKEN_EMBEDDING_STD,
                  position_embedding_std=POSITION_EMBEDDING_STD):
    """Initialise *every* parameter of ``root`` in place, deterministically.

    Rules: biases 0, ``logit_scale`` log(100), norm weights/scales 1, embeddings
    N(0, token/position std), other weight matrices/kernels N(0, weight_std).
    Raises on a parameter it does not know how to initialise (so a new ComfyUI
    module with an odd parameter cannot silently keep ``torch.empty`` garbage) and
    on floating-point buffers (none are expected in the modules built here).
    Returns the number of parameters initialised.
    """
    n = 0
    for mname, mod in root.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            _init_tensor_(mod, mname, pname, p, generator, weight_std=weight_std,
                          token_embedding_std=token_embedding_std, position_embedding_std=position_embedding_std)
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
    _record_timing(path.name, info["seconds"])
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

def comfyui_version(path):
    """``__version__`` from a ComfyUI folder's comfyui_version.py, without importing it; None if absent."""
    import re
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else None


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


# ============================================================================
# Flux.1 dev / schnell, Chroma, SD3 / SD3.5: the 16-channel-latent families
# ============================================================================
#
# These are distributed as separate files, and the generator writes them that way:
#
# * a diffusion-model-only file (what UNETLoader / ``comfy.sd.load_diffusion_model``
#   reads; raw ``diffusion_model`` keys, no prefix, like flux1-dev.safetensors);
# * text-encoder files in the layout of the published clip_l / clip_g / t5xxl files
#   (the ``transformer`` of ComfyUI's encoder module: ``text_model.*``, ``encoder.*``,
#   ``shared.weight``), read by CLIPLoader / DualCLIPLoader / TripleCLIPLoader through
#   ``comfy.sd.load_clip``;
# * a 16-channel VAE (the Flux / SD3 ``ae.safetensors`` layout: ``encoder.*``,
#   ``decoder.*``, no quant convs; ``comfy.sd.VAE`` derives z_channels from
#   ``decoder.conv_in.weight`` and builds an AutoencodingEngine; same file for all);
# * for SD3.5 also a single-file checkpoint "incl. clips" (MMDiT + CLIP-L + CLIP-G +
#   VAE, no T5, like the published sd3_medium_incl_clips) for CheckpointLoaderSimple.
#
# What ComfyUI 0.3.64's detection pins (comfy/model_detection.py):
# * Flux / Chroma: hidden 3072, 24 heads, context 4096 are hard-coded; only the number of
#   double / single blocks is read from the keys (one of each here).  ``guidance_in`` keys
#   decide Flux (dev, guidance-distilled) vs FluxSchnell.  Chroma is recognised by its
#   ``distilled_guidance_layer`` whose size (64 -> 5120 x 5 layers -> 3072) is pinned.
# * SD3 / SD3.5 (MMDiT): width = 64 x depth (heads = depth); every layout detects as
#   ``supported_models.SD3``.  The layouts differ in ``qk_norm`` (SD3.5), dual-attention
#   ``x_block_self_attn_layers`` (SD3.5 medium) and ``pos_embed_max_size``.
# * CLIP-L / CLIP-G / T5-XXL configs are fixed JSON files; only the T5 depth can be changed,
#   through ``model_options={"t5xxl_model_config": {"num_layers": N}}`` (SDClipModel reads
#   ``<model_name>_model_config``; T5XXLModel's model_name is "t5xxl").  The loader nodes
#   pass no such option and route files by deep keys (``encoder.block.23...`` means T5-XXL),
#   so a one-layer T5 must be loaded with ``comfy.sd.load_clip(..., model_options=
#   T5XXL_ONE_LAYER_OPTIONS)``; the full-depth T5 (``t5_layers=24``) is what the nodes load.
#
# All files are written tensor by tensor from a module built on the meta device
# (``write_safetensors_streaming``), so generating even the 4.8B-parameter T5-XXL needs
# one tensor's memory, not the model's.

FAMILY_GENERATOR_VERSION = "f1"

T5XXL_FULL_LAYERS = 24
# A T5 deeper than this keeps random weights only in its first T5XXL_LIVE_LAYERS blocks; the rest
# have zero projections (identity blocks). The loaders still see and load a full-depth file, with
# no uninitialised weight, but it takes ~0.4 GB of disk instead of 4.8 GB (its zeros are holes).
T5XXL_LIVE_LAYERS = 2
T5XXL_ONE_LAYER_OPTIONS = {"t5xxl_model_config": {"num_layers": 1}}

# Flux and Chroma configs come from the host's own detector: it is handed the few keys and shapes
# it reads from a real file (a one-block model at the real widths) and returns the config its loader
# will build. Hand-written configs went stale when ComfyUI added fields (0.33's FluxParams needs
# txt_ids_dims; ChromaParams vec_in_dim), so the builders follow the host instead.
_FLUX_SKELETON = {
    "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.norm.key_norm.scale": (128,),
}
_DIT_SKELETONS = {
    "flux-dev": {**_FLUX_SKELETON, "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256)},
    "flux-schnell": {**_FLUX_SKELETON, "vector_in.in_layer.weight": (3072, 768)},
    "chroma": {**_FLUX_SKELETON, "img_in.weight": (3072, 64), "distilled_guidance_layer.norms.0.scale": (5120,)},
}
# What the generated files must be detected as, whatever else the host's config holds.
_DIT_EXPECT = {
    "flux-dev": {"image_model": "flux", "in_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
                 "hidden_size": 3072, "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True},
    "flux-schnell": {"image_model": "flux", "in_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
                     "hidden_size": 3072, "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "guidance_embed": False},
    "chroma": {"image_model": "chroma", "in_channels": 64, "context_in_dim": 4096, "hidden_size": 3072,
               "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "n_layers": 5},
}


def _detected_config(skeleton, expect, what, hint=""):
    """The host's detected config for a key layout (``{key: shape}``), checked against ``expect``."""
    import comfy.model_detection
    sd = {k: _ShapeOnly._T.of(shape) for k, shape in skeleton.items()}
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    if cfg is None:
        raise AssertionError(f"this ComfyUI does not detect the {what} key layout{hint}")
    for k, v in expect.items():
        if cfg.get(k) != v:
            raise AssertionError(f"{what}: this ComfyUI detects {k!r} = {cfg.get(k)!r}, the tests expect {v!r}")
    return cfg


def _host_dit_config(kind):
    """The host's detected config for a one-block ``kind`` model (see _DIT_SKELETONS)."""
    return _detected_config(_DIT_SKELETONS[kind], _DIT_EXPECT[kind], kind)


# Depth 2 (width 128, 2 heads): one ordinary joint block and the final one, whose text
# stream is "pre_only" as in the real models.
_SD3_COMMON = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 192 * 192, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
SD3_MEDIUM_DIT_CONFIG = dict(_SD3_COMMON)                                  # SD3 (2024) medium: no qk-norm
SD35_LARGE_DIT_CONFIG = {**_SD3_COMMON, "qk_norm": "rms"}                  # SD3.5 large / large turbo
SD35_MEDIUM_DIT_CONFIG = {**_SD3_COMMON, "qk_norm": "rms", "x_block_self_attn_layers": [0],
                          "num_patches": 384 * 384, "pos_embed_max_size": 384}  # SD3.5 medium (MMDiT-X)

VAE16_DDCONFIG = {**VAE_DDCONFIG, "z_channels": 16}

# diffusion kind -> (supported_models class name, detected config)
# (None: the host's own, _host_dit_config)
DIT_KINDS = {
    "flux-dev": ("Flux", None),
    "flux-schnell": ("FluxSchnell", None),
    "chroma": ("Chroma", None),
    "sd3-medium": ("SD3", SD3_MEDIUM_DIT_CONFIG),
    "sd35-medium": ("SD3", SD35_MEDIUM_DIT_CONFIG),
    "sd35-large": ("SD3", SD35_LARGE_DIT_CONFIG),
}
TEXT_ENCODER_KINDS = ("clip-l", "clip-g", "t5xxl")


def dit_config(kind):
    """``(supported_models class name, unet config)`` of a generated diffusion-model kind, as the host
    under test detects it."""
    cls_name, cfg = DIT_KINDS[kind]
    return cls_name, dict(cfg) if cfg is not None else _host_dit_config(kind)


class Family:
    """How one family is put together from the generated files and loaded."""

    def __init__(self, name, dit, text_encoders, clip_type, config, model_class, expected_tokenizers):
        self.name = name
        self.dit = dit                        # key of DIT_KINDS
        self.text_encoders = text_encoders    # subset of TEXT_ENCODER_KINDS, in loader order
        self.clip_type = clip_type            # comfy.sd.CLIPType member name
        self.config = config                  # comfy.supported_models class name
        self.model_class = model_class        # comfy.model_base class name
        # attribute of clip.tokenizer -> its embedding_key (what embedding files are read by)
        self.expected_tokenizers = expected_tokenizers

    def __repr__(self):
        return f"Family({self.name!r})"


FAMILIES = {f.name: f for f in (
    Family("flux-dev", "flux-dev", ("clip-l", "t5xxl"), "FLUX", "Flux", "Flux",
           {"clip_l": "clip_l", "t5xxl": "t5xxl"}),
    Family("flux-schnell", "flux-schnell", ("clip-l", "t5xxl"), "FLUX", "FluxSchnell", "Flux",
           {"clip_l": "clip_l", "t5xxl": "t5xxl"}),
    Family("chroma", "chroma", ("t5xxl",), "CHROMA", "Chroma", "Chroma",
           {"clip_t5xxl": "t5xxl"}),
    Family("sd3", "sd35-medium", ("clip-l", "clip-g", "t5xxl"), "SD3", "SD3", "SD3",
           {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5xxl"}),
    Family("sd35-large", "sd35-large", ("clip-l", "clip-g", "t5xxl"), "SD3", "SD3", "SD3",
           {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5xxl"}),
    Family("sd3-medium", "sd3-medium", ("clip-l", "clip-g", "t5xxl"), "SD3", "SD3", "SD3",
           {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5xxl"}),
)}
# The single-file SD3.5 checkpoint (CheckpointLoaderSimple): MMDiT of this layout + clips + VAE.
SD3_CHECKPOINT_DIT = "sd35-medium"


def component_filename(component, seed=DEFAULT_SEED, dtype=torch.float16):
    """Cache file name of one generated component: ``<dit kind>-dit``, ``clip-l``,
    ``clip-g``, ``t5xxl-<N>layer``, ``vae16`` or ``sd3-checkpoint`` (carries
    FAMILY_GENERATOR_VERSION, seed and dtype)."""
    dt = str(dtype).replace("torch.", "")
    return f"dti-test-{component}-{FAMILY_GENERATOR_VERSION}-seed{seed}-{dt}.safetensors"


def _component_seed(component, seed):
    import zlib
    return (int(seed) * 1_000_003 + zlib.crc32(component.encode())) % (2**63)


# ----------------------------------------------------------------------------
# streaming safetensors writer
# ----------------------------------------------------------------------------

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


_HOLE_MIN_BYTES = 1 << 16


def write_safetensors_streaming(path, entries, metadata=None):
    """Write a safetensors file one tensor at a time (atomically: temp file + rename).

    ``entries``: sequence of ``(name, shape, dtype, produce)``; ``produce()`` returns the
    tensor (CPU, that shape and dtype), or None for an all-zero one, and is called once, in order,
    while writing, so only one tensor is alive at a time.  Aligned 64 KiB runs of zero bytes become
    holes of a sparse file where the file system allows it.  Returns the file's length."""
    import json
    import math
    import struct

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, off = {}, 0
    for name, shape, dtype, _ in entries:
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(x) for x in shape], "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, shape, dtype, produce in entries:
                t = produce()
                if t is None:  # all zeros: one hole (the file's final truncate gives a trailing one its length)
                    f.seek(header[name]["data_offsets"][1] - header[name]["data_offsets"][0], os.SEEK_CUR)
                    continue
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device.type != "cpu":
                    raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype} {t.device}, declared {tuple(shape)} {dtype}")
                raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                # Zero bytes, 64 KiB at a time (the whole tensor, or a zero tail such as unused
                # vocabulary rows): leave a hole (a sparse file reads back zeros and takes no disk).
                # The zero chunks are found in one pass; each run of the others is one write.
                full = raw.size // _HOLE_MIN_BYTES
                zero = ~raw[:full * _HOLE_MIN_BYTES].reshape(full, _HOLE_MIN_BYTES).any(axis=1)
                chunk = 0
                while chunk < full:
                    end = chunk + 1
                    while end < full and zero[end] == zero[chunk]:
                        end += 1
                    if zero[chunk]:
                        f.seek((end - chunk) * _HOLE_MIN_BYTES, os.SEEK_CUR)
                    else:
                        f.write(memoryview(raw[chunk * _HOLE_MIN_BYTES:end * _HOLE_MIN_BYTES]))
                    chunk = end
                if raw.size > full * _HOLE_MIN_BYTES:  # a short tail is written as it is
                    f.write(memoryview(raw[full * _HOLE_MIN_BYTES:]))
                del t, raw
            f.truncate(8 + len(hb) + off)  # a trailing hole must still count in the file's length
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _record_timing(path.name, time.perf_counter() - t0)
    return path.stat().st_size


def _plan_module(root, prefix="", buffers=None):
    """``[(name, shape, fill)]`` for every parameter (and the floating buffers named in
    ``buffers``: ``{name: fill}``) of ``root`` (usually built on the meta device);
    ``fill(t, generator)`` fills a fresh float32 tensor by ``_init_tensor_``'s rules.
    Raises for a parameter without a rule or an unlisted floating buffer, before
    anything is written."""
    plan = []
    buffers = dict(buffers or {})
    probe = torch.Generator().manual_seed(0)
    for mname, mod in root.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            _init_tensor_(mod, mname, pname, torch.empty((2,) * p.dim() if p.dim() else ()), probe)  # rule exists?
            plan.append((prefix + full, tuple(p.shape),
                         (lambda m, mn, pn: lambda t, g: _init_tensor_(m, mn, pn, t, g))(mod, mname, pname)))
        for bname, b in mod.named_buffers(recurse=False):
            full = f"{mname}.{bname}" if mname else bname
            if b is None or not b.is_floating_point():
                continue
            if full not in buffers:
                raise ValueError(f"no rule for floating buffer {full} {tuple(b.shape)} in {type(mod).__name__}")
            plan.append((prefix + full, tuple(b.shape), buffers.pop(full)))
    if buffers:
        raise ValueError(f"buffers not found: {sorted(buffers)}")
    return plan


def _entries(plan, generator, dtype):
    """Writer entries that fill each tensor in fp32 from ``generator`` (in plan order, so
    the file is deterministic) and store it as ``dtype``."""
    def produce(shape, fill):
        def _p():
            if fill is _zero_fill:
                return None  # (all zeros: the writer leaves a hole, no fp32 pass and no cast)
            t = torch.empty(shape, dtype=torch.float32)
            with torch.no_grad():
                fill(t, generator)
            return t.to(dtype)
        return _p
    return [(name, shape, dtype, produce(shape, fill)) for name, shape, fill in plan]


def _sd3_pos_embed_fill(hidden, max_size):
    """SD3's fixed 2-D sin-cos position table (what the released files hold)."""
    def fill(t, _g):
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
        pe = get_2d_sincos_pos_embed(hidden, max_size)
        t.copy_(torch.from_numpy(pe).float().reshape(t.shape))
    return fill


# ----------------------------------------------------------------------------
# component plans (modules built on the meta device)
# ----------------------------------------------------------------------------

def _dit_plan(kind, prefix=""):
    import comfy.supported_models as sm
    cls_name, cfg = dit_config(kind)
    model_config = getattr(sm, cls_name)(dict(cfg))
    with torch.device("meta"):
        base = model_config.get_model({}, "")
    dm = base.diffusion_model
    buffers = {}
    if cls_name == "SD3":
        buffers["pos_embed"] = _sd3_pos_embed_fill(dm.hidden_size, cfg["pos_embed_max_size"])
    return _plan_module(dm, prefix, buffers), getattr(sm, cls_name), cfg


def _text_encoder_module(kind, t5_layers=1):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip
    with torch.device("meta"):
        if kind == "clip-l":
            return comfy.sd1_clip.SDClipModel(device=None, dtype=torch.float32)
        if kind == "clip-g":
            return comfy.sdxl_clip.SDXLClipG(device=None, dtype=torch.float32)
        if kind == "t5xxl":
            return comfy.text_encoders.sd3_clip.T5XXLModel(
                device=None, dtype=torch.float32, model_options={"t5xxl_model_config": {"num_layers": int(t5_layers)}})
    raise ValueError(f"unknown text encoder {kind!r}; expected one of {TEXT_ENCODER_KINDS}")


def _text_encoder_plan(kind, t5_layers=1, prefix=""):
    # The files hold the ``transformer`` of ComfyUI's encoder module, as published files do.
    plan = _plan_module(_text_encoder_module(kind, t5_layers).transformer, prefix)
    if kind == "t5xxl" and int(t5_layers) > T5XXL_LIVE_LAYERS:
        plan = [(name, shape, _zero_fill if _is_idle_t5_matrix(name) else fill) for name, shape, fill in plan]
    return plan


def _zero_fill(t, _g):
    t.zero_()


def _is_idle_t5_matrix(name):
    """A projection matrix of a T5 block past the live ones: zeroed, that block adds nothing to its
    residual stream (an identity), and the file keeps it as a hole."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or "block" not in parts:
        return False
    i = parts.index("block")
    return int(parts[i + 1]) >= T5XXL_LIVE_LAYERS and "layer_norm" not in name


def _vae16_plan(prefix=""):
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    ddconfig = dict(VAE16_DDCONFIG)
    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return _plan_module(vae, prefix)


def _component_name(component, t5_layers=1):
    if component == "t5xxl":
        n = int(t5_layers)
        return f"t5xxl-{n}layer" if n <= T5XXL_LIVE_LAYERS else f"t5xxl-{n}layer-{T5XXL_LIVE_LAYERS}live"
    if component in DIT_KINDS:
        return f"{component}-dit"
    return component


def generate_component(component, path, seed=DEFAULT_SEED, dtype=torch.float16, t5_layers=1):
    """Write one component file; return an info dict (params, bytes, seconds, ...).

    ``component``: a DIT_KINDS key (diffusion-model-only file), ``clip-l``, ``clip-g``,
    ``t5xxl`` (``t5_layers`` deep; 24 is the real T5-XXL), ``vae16``."""
    t0 = time.perf_counter()
    name = _component_name(component, t5_layers)
    gen = torch.Generator(device="cpu").manual_seed(_component_seed(name, seed))
    info = {"component": name, "seed": seed, "dtype": str(dtype)}
    if component in DIT_KINDS:
        plan, config_cls, cfg = _dit_plan(component)
        info["config"] = config_cls.__name__
    elif component in TEXT_ENCODER_KINDS:
        plan = _text_encoder_plan(component, t5_layers)
    elif component == "vae16":
        plan = _vae16_plan()
    else:
        raise ValueError(f"unknown component {component!r}")
    metadata = {"dti_test_generator": FAMILY_GENERATOR_VERSION, "dti_test_component": name,
                "dti_test_seed": str(seed), "dti_test_dtype": str(dtype)}
    info["params"] = sum(_numel(shape) for _n, shape, _f in plan)
    info["bytes"] = write_safetensors_streaming(path, _entries(plan, gen, dtype), metadata)
    info["path"] = str(path)
    if component in DIT_KINDS:
        _check_dit_detection(path, component)
    info["seconds"] = time.perf_counter() - t0
    return info


def _numel(shape):
    n = 1
    for x in shape:
        n *= int(x)
    return n


def _check_dit_detection(path, kind):
    """ComfyUI's detector must pick the intended config class and read back the config."""
    import comfy.model_detection
    import comfy.supported_models as sm
    from safetensors import safe_open
    cls_name, cfg = dit_config(kind)
    with safe_open(str(path), framework="pt") as f:
        # Detection reads key names and a few shapes; give it the real tensors for those.
        sd = {k: f.get_slice(k) for k in f.keys()}
        sd = _ShapeOnly(sd)
        detected = comfy.model_detection.model_config_from_unet(sd, "")
        det_cfg = comfy.model_detection.detect_unet_config(sd, "")
    if type(detected) is not getattr(sm, cls_name):
        raise AssertionError(f"generated {kind} detected as {type(detected).__name__ if detected is not None else None}, "
                             f"expected {cls_name}")
    for k, v in cfg.items():
        if det_cfg.get(k) != v:
            raise AssertionError(f"{kind}: detected {k!r} = {det_cfg.get(k)!r}, generated with {v!r}")


class _ShapeOnly(dict):
    """A state dict of safetensors slices: detection only needs ``.shape`` and keys."""

    class _T:
        def __init__(self, sl):
            self.shape = torch.Size(sl.get_shape())
            dt = sl.get_dtype()
            self.dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(dt, dt)

        @classmethod
        def of(cls, shape, dtype=torch.float16):
            t = cls.__new__(cls)
            t.shape, t.dtype = torch.Size(shape), dtype
            return t

        def size(self, dim=None):
            return self.shape if dim is None else self.shape[dim]

    def __init__(self, slices):
        super().__init__({k: self._T(v) for k, v in slices.items()})


def ensure_component(component, folder, seed=DEFAULT_SEED, dtype=torch.float16, t5_layers=1):
    """Path of ``component`` in ``folder`` (cache), generating it when missing."""
    path = Path(folder) / component_filename(_component_name(component, t5_layers), seed, dtype)
    if not path.exists():
        generate_component(component, path, seed=seed, dtype=dtype, t5_layers=t5_layers)
    return path


def ensure_sd3_checkpoint(folder, seed=DEFAULT_SEED, dtype=torch.float16, clips=True):
    """Single-file SD3.5 checkpoint "incl. clips" (CheckpointLoaderSimple): the
    SD3_CHECKPOINT_DIT MMDiT under ``model.diffusion_model.``, CLIP-L / CLIP-G under
    ``text_encoders.clip_{l,g}.transformer.``, the 16-channel VAE under
    ``first_stage_model.``; no T5 (as in the published sd3_medium_incl_clips: the
    loader then builds SD3's text encoder without T5).  ``clips=False``: MMDiT + VAE only,
    like the published sd3.5_medium / sd3.5_large files (text encoders from TripleCLIPLoader).
    Copied tensor by tensor from the component files, so the weights are the same as the
    separate files'."""
    from safetensors import safe_open
    component = "sd3-checkpoint" if clips else "sd3-checkpoint-noclips"
    path = Path(folder) / component_filename(component, seed, dtype)
    if path.exists():
        return path
    parts = [("model.diffusion_model.", ensure_component(SD3_CHECKPOINT_DIT, folder, seed, dtype))]
    if clips:
        parts += [("text_encoders.clip_l.transformer.", ensure_component("clip-l", folder, seed, dtype)),
                  ("text_encoders.clip_g.transformer.", ensure_component("clip-g", folder, seed, dtype))]
    parts.append(("first_stage_model.", ensure_component("vae16", folder, seed, dtype)))
    entries = []
    for prefix, src in parts:
        with safe_open(str(src), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                st = sl.get_dtype()
                dt = {v: k2 for k2, v in _ST_DTYPES.items()}[st]

                def produce(src=src, k=k):
                    with safe_open(str(src), framework="pt") as g:
                        return g.get_tensor(k)
                entries.append((prefix + k, tuple(sl.get_shape()), dt, produce))
    write_safetensors_streaming(path, entries, {"dti_test_generator": FAMILY_GENERATOR_VERSION,
                                                "dti_test_component": component,
                                                "dti_test_dit": SD3_CHECKPOINT_DIT,
                                                "dti_test_seed": str(seed), "dti_test_dtype": str(dtype)})
    return path


def ensure_family_files(family, folder, seed=DEFAULT_SEED, dtype=torch.float16, t5_layers=1, t5_dtype=None):
    """``{"diffusion_model": path, "text_encoders": [paths in loader order], "vae": path}``
    for ``family`` (a FAMILIES key), generating what the cache lacks.  The T5 file is
    ``t5_layers`` deep and stored as ``t5_dtype`` (default ``dtype``; the full-depth T5 is
    4.8B parameters: 9.5 GB in fp16, 4.8 GB in float8_e4m3fn like t5xxl_fp8_e4m3fn)."""
    fam = FAMILIES[family]
    return {
        "diffusion_model": ensure_component(fam.dit, folder, seed, dtype),
        "text_encoders": [ensure_component(te, folder, seed, (t5_dtype or dtype) if te == "t5xxl" else dtype,
                                           t5_layers=t5_layers) for te in fam.text_encoders],
        "vae": ensure_component("vae16", folder, seed, dtype),
    }


# ----------------------------------------------------------------------------
# loading, as ComfyUI's loader nodes do inside the executor
# ----------------------------------------------------------------------------

def load_diffusion_model(path, model_options=None):
    """UNETLoader's call (``comfy.sd.load_diffusion_model``; weight_dtype "default" gives
    ``model_options={}``) under ``torch.inference_mode()``.  Returns ``(model, log)``."""
    import comfy.sd
    with capture_logs() as records, torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(path), model_options=dict(model_options or {}))
    return model, records


def load_vae(path):
    """VAELoader's call: ``comfy.sd.VAE(sd=load_torch_file(path))`` under inference mode."""
    import comfy.sd
    import comfy.utils
    with capture_logs() as records, torch.inference_mode():
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
        vae.throw_exception_if_invalid()
    return vae, records


def t5_model_options(t5_layers):
    """The ``model_options`` for ``comfy.sd.load_clip`` that build a T5-XXL of
    ``t5_layers`` layers (none for the real depth: what the loader nodes use)."""
    if int(t5_layers) == T5XXL_FULL_LAYERS:
        return {}
    return {"t5xxl_model_config": {"num_layers": int(t5_layers)}}


def load_text_encoders(paths, clip_type, embedding_directory=None, model_options=None):
    """CLIPLoader / DualCLIPLoader / TripleCLIPLoader's call, ``comfy.sd.load_clip(
    ckpt_paths, embedding_directory, clip_type, model_options)``, under inference mode.
    ``clip_type``: a ``comfy.sd.CLIPType`` member or its name ("FLUX", "SD3", "CHROMA").

    One exception, for a shallow T5 alone (Chroma / PixArt): ``load_text_encoder_state_dicts``
    recognises a single T5-XXL file only by ``encoder.block.23`` and takes a shallower one
    for T5-Base (Stable Audio's encoder).  There the CLIP is built exactly as that function
    builds it for a full T5-XXL with this clip_type (``pixart_te(**t5_xxl_detect(sd))`` +
    ``PixArtTokenizer``, ``comfy.sd.CLIP(...)``, ``clip.load_sd``).  Returns ``(clip, log)``."""
    import comfy.sd
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.sd3_clip
    import comfy.utils
    ct = getattr(comfy.sd.CLIPType, clip_type) if isinstance(clip_type, str) else clip_type
    model_options = dict(model_options or {})
    paths = [str(p) for p in paths]
    with capture_logs() as records, torch.inference_mode():
        if ct in (comfy.sd.CLIPType.CHROMA, comfy.sd.CLIPType.PIXART) and len(paths) == 1:
            sd = comfy.utils.load_torch_file(paths[0], safe_load=True)
            if comfy.sd.detect_te_model(sd) != comfy.sd.TEModel.T5_XXL:
                target = types.SimpleNamespace(
                    clip=comfy.text_encoders.pixart_t5.pixart_te(**comfy.text_encoders.sd3_clip.t5_xxl_detect(sd)),
                    tokenizer=comfy.text_encoders.pixart_t5.PixArtTokenizer, params={})
                clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                                     parameters=comfy.utils.calculate_parameters(sd), tokenizer_data={},
                                     model_options=model_options)
                m, u = clip.load_sd(sd)
                if m:
                    logging.warning("clip missing: {}".format(m))
                if u:
                    logging.debug("clip unexpected: {}".format(u))
                return clip, records
            del sd
        clip = comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=embedding_directory,
                                  clip_type=ct, model_options=model_options)
    return clip, records


def load_family(family, folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16, t5_layers=1,
                t5_dtype=None):
    """Generate (if needed) and load ``family`` the way a UNETLoader + (Dual/Triple)CLIPLoader
    + VAELoader graph does, everything under ``torch.inference_mode()``.  The T5 is
    ``t5_layers`` deep, built with ``t5_model_options(t5_layers)``.

    Returns ``SimpleNamespace(out=(model, clip, vae), log=[records], paths=..., seconds=...)``."""
    fam = FAMILIES[family]
    paths = ensure_family_files(family, folder, seed, dtype, t5_layers=t5_layers, t5_dtype=t5_dtype)
    t0 = time.perf_counter()
    model, log_m = load_diffusion_model(paths["diffusion_model"])
    clip, log_c = load_text_encoders(paths["text_encoders"], fam.clip_type, embedding_directory,
                                     t5_model_options(t5_layers) if "t5xxl" in fam.text_encoders else {})
    vae, log_v = load_vae(paths["vae"])
    return types.SimpleNamespace(out=(model, clip, vae), log=log_m + log_c + log_v, paths=paths,
                                 seconds=time.perf_counter() - t0, family=fam)


def load_sd3_checkpoint(folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16):
    """The SD3.5 single-file checkpoint through CheckpointLoaderSimple's call
    (``load_checkpoint``).  Returns ``SimpleNamespace(out, log, path, seconds)``."""
    path = ensure_sd3_checkpoint(folder, seed, dtype)
    t0 = time.perf_counter()
    out, records = load_checkpoint(path, embedding_directory=embedding_directory)
    return types.SimpleNamespace(out=out, log=records, path=path, seconds=time.perf_counter() - t0)


def model_conds(model, cond, pooled, latent, **extra):
    """What the sampler feeds ``apply_model`` for one conditioning: ``model.model.extra_conds``
    called as ``comfy.samplers.encode_model_conds`` calls it (cross_attn, pooled_output,
    noise, device, width/height = 8 x latent size), each cond processed for the batch.
    Returns a dict of tensors / values to pass as ``apply_model(x, t, **conds)``."""
    params = {"cross_attn": cond, "pooled_output": pooled, "noise": latent, "device": latent.device,
              "width": latent.shape[3] * 8, "height": latent.shape[2] * 8, "prompt_type": "positive", **extra}
    out = model.model.extra_conds(**params)
    return {k: v.process_cond(batch_size=latent.shape[0], device=latent.device, area=None).cond for k, v in out.items()}


__all__ = [
    "GENERATOR_VERSION", "DEFAULT_SEED", "KINDS", "SD15_UNET_CONFIG", "SDXL_UNET_CONFIG", "VAE_DDCONFIG",
    "expected_config_class", "checkpoint_filename", "init_weights_", "build_state_dict",
    "generate_checkpoint", "ensure_checkpoint", "is_comfyui_dir", "setup_comfy", "capture_logs",
    "load_checkpoint", "load_problems", "param_count", "human_bytes", "comfyui_version",
    "FAMILY_GENERATOR_VERSION", "FAMILIES", "DIT_KINDS", "dit_config", "TEXT_ENCODER_KINDS", "T5XXL_FULL_LAYERS",
    "T5XXL_ONE_LAYER_OPTIONS", "component_filename", "write_safetensors_streaming", "generate_component",
    "ensure_component", "ensure_sd3_checkpoint", "ensure_family_files", "load_diffusion_model", "load_vae",
    "t5_model_options", "load_text_encoders", "load_family", "load_sd3_checkpoint", "model_conds",
]


# ============================================================================
# Lumina 2 (NextDiT + Gemma-2-2B)
# ============================================================================
#
# What ComfyUI 0.3.64 pins: the NextDiT's width (2304), heads (24 / 8 kv), qk-norm, axes and the
# two noise / two context refiner blocks are hard-coded in model_detection; only the number of main
# ``layers`` is read from the keys (one here).  The Gemma-2-2B config is a dataclass whose fields
# ``model_options={"gemma2_2b_model_config": {...}}`` overrides (SDClipModel reads
# ``<model_name>_model_config``), like the T5 depth: the thin Gemma has 3 layers, a small FFN and
# the vocabulary of a small SentencePiece model trained here (Gemma's own tokenizer is not in
# ComfyUI; the text-encoder file carries it as the ``spiece_model`` tensor, as the published
# gemma_2_2b files do).  The loader nodes pass no such option, so the thin Gemma is loaded with
# ``load_text_encoders(..., model_options=GEMMA_THIN_OPTIONS)``.
#
# Idle blocks: the refiners (and the main layer's FFN) have zero projection matrices, so each adds
# nothing to its residual stream (zero attention / FFN output, a zero modulation gate) and the file
# keeps them as holes.  Text still reaches the image through the live joint attention of layer 0.

LUMINA2_DIT_CONFIG = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 2304,
    "n_layers": 1, "n_heads": 24, "n_kv_heads": 8, "qk_norm": True, "axes_dims": [32, 32, 32],
    "axes_lens": [300, 512, 512],
}
# Three layers: Lumina reads the second-to-last hidden state (layer_idx -2 must be inside the
# model), so the last layer's output is never used; its matrices are zero (holes).
GEMMA_THIN_LAYERS = 3
GEMMA_THIN_FFN = 512
SPIECE_VOCAB = 1024


def _spiece_corpus():
    """Deterministic training text for the test tokenizer: the pack's templates, Lumina's system
    prompts and a few concept words, so every word the tests use is a piece of its own."""
    from importlib import util
    spec = util.spec_from_file_location("_dti_templates", Path(__file__).resolve().parents[2] / "dti_core" / "templates.py")
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    words = ("dog cat car mug object toy sks photo painting style beach red blue green small large "
             "clean dirty one close-up rendering rendition nice weird cool good bright dark").split()
    system = ("You are an assistant designed to generate superior images with the superior degree of image-text "
              "alignment based on textual prompts or user prompts. You are an assistant designed to generate "
              "high-quality images with the highest degree of image-text alignment based on textual prompts. "
              "<Prompt Start>")
    lines = [system] * 20
    for t in mod.OBJECT + mod.STYLE:
        lines += [t.format(w) for w in words]
    return "\n".join(lines) + "\n"


def spiece_model_bytes():
    """A small SentencePiece BPE model in Gemma's id layout (pad 0, eos 1, bos 2, unk 3), with byte
    fallback so any text tokenizes.  Single-threaded training on fixed text: the same bytes each run."""
    import io
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_spiece_corpus().splitlines()), model_writer=out, vocab_size=SPIECE_VOCAB,
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1,
        hard_vocab_limit=False, minloglevel=2, user_defined_symbols=["<Prompt Start>"])
    return out.getvalue()


def _ensure_generated(folder, component, plan, seed, dtype, detected_as=None, entries=None):
    """Path of a generated file (``component`` in ``folder``), written from ``plan()`` (or the writer
    ``entries(generator)``) when missing; ``detected_as``: the ``comfy.supported_models`` class ComfyUI's
    detector must take a diffusion-model file for."""
    path = Path(folder) / component_filename(component, seed, dtype)
    if path.exists():
        return path
    gen = torch.Generator().manual_seed(_component_seed(component, seed))
    write_safetensors_streaming(path, entries(gen) if entries is not None else _entries(plan(), gen, dtype),
                                {"dti_test_generator": FAMILY_GENERATOR_VERSION, "dti_test_component": component})
    if detected_as is not None:
        import comfy.model_detection
        import comfy.supported_models as sm
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            sd = _ShapeOnly({k: f.get_slice(k) for k in f.keys()})
        if type(comfy.model_detection.model_config_from_unet(sd, "")) is not getattr(sm, detected_as):
            raise AssertionError(f"the generated {component} is not detected as supported_models.{detected_as}")
    return path


def _spiece_entry(sp):
    """The writer entry of a SentencePiece model under ``spiece_model`` (uint8), where ComfyUI's loaders
    read a tokenizer model from (Gemma-2, UMT5)."""
    raw = torch.frombuffer(bytearray(sp), dtype=torch.uint8)
    return [("spiece_model", tuple(raw.shape), torch.uint8, lambda: raw.clone())]


def _write_with_spiece(path, entries, sp, metadata):
    write_safetensors_streaming(path, list(entries) + _spiece_entry(sp), metadata)


def gemma_thin_options(vocab_size):
    return {"gemma2_2b_model_config": {"num_hidden_layers": GEMMA_THIN_LAYERS, "intermediate_size": GEMMA_THIN_FFN,
                                       "vocab_size": int(vocab_size)}}


def _is_idle_lumina_matrix(name):
    if "norm" in name or not name.endswith("weight"):
        return False
    return name.startswith(("noise_refiner.", "context_refiner.")) or (name.startswith("layers.") and ".feed_forward." in name)


def _lumina2_dit_plan():
    import comfy.supported_models as sm
    model_config = sm.Lumina2(dict(LUMINA2_DIT_CONFIG))
    with torch.device("meta"):
        base = model_config.get_model({}, "")
    plan = _plan_module(base.diffusion_model)
    return [(n, s, _zero_fill if _is_idle_lumina_matrix(n) else f) for n, s, f in plan]


def _gemma_plan(vocab_size):
    import comfy.text_encoders.lumina2
    with torch.device("meta"):
        te = comfy.text_encoders.lumina2.Gemma2_2BModel(device=None, dtype=torch.float32,
                                                         model_options={"model_name": "gemma2_2b",
                                                                        **gemma_thin_options(vocab_size)})
    last = f"model.layers.{GEMMA_THIN_LAYERS - 1}."
    return [(n, s, _zero_fill if n.startswith(last) and "norm" not in n else f)
            for n, s, f in _plan_module(te.transformer)]


def ensure_lumina2_files(folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """``{"diffusion_model", "text_encoder", "vae", "vocab_size"}``: the thin NextDiT (detected as
    ``supported_models.Lumina2``), the thin Gemma-2 file with its ``spiece_model``, the 16-channel VAE."""
    folder = Path(folder)
    sp = spiece_model_bytes()
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_proto=sp).get_piece_size()
    dit = folder / component_filename("lumina2-dit", seed, dtype)
    if not dit.exists():
        gen = torch.Generator().manual_seed(_component_seed("lumina2-dit", seed))
        write_safetensors_streaming(dit, _entries(_lumina2_dit_plan(), gen, dtype),
                                    {"dti_test_generator": FAMILY_GENERATOR_VERSION, "dti_test_component": "lumina2-dit"})
        _check_lumina2_detection(dit)
    name = f"gemma2-{GEMMA_THIN_LAYERS}layer-v{vocab}"
    te = folder / component_filename(name, seed, dtype)
    if not te.exists():
        gen = torch.Generator().manual_seed(_component_seed(name, seed))
        _write_with_spiece(te, _entries(_gemma_plan(vocab), gen, dtype), sp,
                           {"dti_test_generator": FAMILY_GENERATOR_VERSION, "dti_test_component": name})
    return {"diffusion_model": dit, "text_encoder": te, "vae": ensure_component("vae16", folder, seed, dtype),
            "vocab_size": vocab}


def _check_nextdit_detection(path, config_class, expected):
    """The generated NextDiT file is detected as ``supported_models.<config_class>`` with ``expected``'s
    values (Lumina 2 and Z-Image share the model class; model_detection tells them apart by width)."""
    import comfy.model_detection
    import comfy.supported_models as sm
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        sd = _ShapeOnly({k: f.get_slice(k) for k in f.keys()})
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    det_cfg = comfy.model_detection.detect_unet_config(sd, "")
    if type(detected) is not getattr(sm, config_class):
        raise AssertionError(f"generated {config_class} DiT detected as {type(detected).__name__}")
    for k, v in expected.items():
        if det_cfg.get(k) != v:
            raise AssertionError(f"{config_class}: detected {k!r} = {det_cfg.get(k)!r}, generated with {v!r}")


def _check_lumina2_detection(path):
    _check_nextdit_detection(path, "Lumina2", LUMINA2_DIT_CONFIG)


def load_lumina2(folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16):
    """UNETLoader + CLIPLoader(type lumina2, thin-Gemma model_options) + VAELoader, under inference mode.
    Returns ``SimpleNamespace(out=(model, clip, vae), log, paths)``."""
    paths = ensure_lumina2_files(folder, seed, dtype)
    model, log_m = load_diffusion_model(paths["diffusion_model"])
    clip, log_c = load_text_encoders([paths["text_encoder"]], "LUMINA2", embedding_directory,
                                     gemma_thin_options(paths["vocab_size"]))
    vae, log_v = load_vae(paths["vae"])
    return types.SimpleNamespace(out=(model, clip, vae), log=log_m + log_c + log_v, paths=paths)


# ----------------------------------------------------------------------------
# Full-config Gemma-2-2B for the stock CLIPLoader (type lumina2)
# ----------------------------------------------------------------------------
# CLIPLoader builds Gemma-2-2B from its fixed config (26 layers, 256000 x 2304 embedding table, FFN
# 9216); it passes no model_options, so a file for a workflow run on the server must have exactly
# those shapes.  Layers from GEMMA_FULL_LIVE_LAYERS on have zero projection matrices: with a zero
# o_proj / down_proj the attention and FFN outputs are zero, Gemma-2's post-attention and
# post-feedforward RMSNorms scale a zero input to zero (x * rsqrt(mean(x^2) + eps) * (1 + w)), so
# the block adds nothing to its residual stream (an identity).  Lumina reads hidden layer -2
# (after block 24), which therefore equals the output of the live blocks and depends on the text.
# Embedding rows past the test tokenizer's vocabulary are zero: no token id reaches them, and m*
# is the mean of the *non-zero* row norms (dti_core.magnitude.vocabulary_norms), so it is the mean
# norm of the rows the tokenizer can produce, as for a real table.  Zeros are holes on disk; in
# memory the encoder is still the full 2.6B parameters (5.2 GB in fp16).
GEMMA_FULL_LIVE_LAYERS = 2


def _is_idle_gemma_matrix(name):
    parts = name.split(".")
    if "layers" not in parts or "norm" in name or parts[-1] != "weight":
        return False
    return int(parts[parts.index("layers") + 1]) >= GEMMA_FULL_LIVE_LAYERS


def _gemma_full_plan():
    import comfy.text_encoders.lumina2
    with torch.device("meta"):
        te = comfy.text_encoders.lumina2.Gemma2_2BModel(device=None, dtype=torch.float32,
                                                         model_options={"model_name": "gemma2_2b"})
    return [(n, s, _zero_fill if _is_idle_gemma_matrix(n) else f) for n, s, f in _plan_module(te.transformer)]


def _entries_half_table(plan, generator, dtype, table, vocab):
    """Like ``_entries``, but the embedding table ``table`` is filled row block by row block
    (a 256000 x 2304 fp32 staging tensor would be 2.4 GB): only its first ``vocab`` rows are live."""
    entries = _entries(plan, generator, dtype)
    out = []
    for (name, shape, fill), entry in zip(plan, entries):
        if name != table:
            out.append(entry)
            continue

        def produce(shape=shape, fill=fill):
            t = torch.zeros(shape, dtype=dtype)
            live = torch.empty((vocab, shape[1]), dtype=torch.float32)
            with torch.no_grad():
                fill(live, generator)
            t[:vocab] = live.to(dtype)
            return t
        out.append((name, shape, dtype, produce))
    return out


def ensure_gemma2_2b_full(folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """Path of the full-config Gemma-2-2B file (with the test ``spiece_model``) that the stock
    CLIPLoader(type lumina2) loads; generated once into ``folder``."""
    folder = Path(folder)
    sp = spiece_model_bytes()
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_proto=sp).get_piece_size()
    name = f"gemma2_2b-26layer-{GEMMA_FULL_LIVE_LAYERS}live-v{vocab}"
    path = folder / component_filename(name, seed, dtype)
    if not path.exists():
        gen = torch.Generator().manual_seed(_component_seed(name, seed))
        entries = _entries_half_table(_gemma_full_plan(), gen, dtype, "model.embed_tokens.weight", vocab)
        raw = torch.frombuffer(bytearray(sp), dtype=torch.uint8)
        entries.append(("spiece_model", tuple(raw.shape), torch.uint8, lambda: raw.clone()))
        write_safetensors_streaming(path, entries, {"dti_test_generator": FAMILY_GENERATOR_VERSION,
                                                    "dti_test_component": name})
    return path


# ============================================================================
# Z-Image (0.33: supported_models.ZImage(Lumina2) on model_base.Lumina2, Qwen3-4B text encoder)
# ============================================================================
#
# model_detection takes a Lumina 2 NextDiT of width 3840 for Z-Image and hard-codes the rest (30
# heads, axes, rope theta 256, z_image_modulation, time scale); only the number of main ``layers``
# is read from the keys (one here), and ``cap_pad_token`` gives the 32-token padding the real files
# have.  As for Lumina 2, the refiners and the main layer's FFN are idle (zero matrices, holes in
# the file): text reaches the image through layer 0's joint attention.
#
# Qwen3-4B: ComfyUI's own Qwen tokenizer (151936 tokens, width 2560) is fixed, so the table keeps
# its real shape; the depth is reduced IN-PROCESS through ``model_options={"qwen3_4b_model_config":
# {...}}`` (SDClipModel reads ``<model_name>_model_config``), as for the thin Gemma: 3 layers and a
# small FFN instead of 36 layers (4.0B parameters, 16 GB in fp32: more than this 24 GiB CPU machine
# trains through).  The loader detects Qwen3-4B by its width and q_norm, not its depth; the stock
# loader nodes pass no such option.  Z-Image reads the second-to-last hidden state, so the last
# layer's matrices are zero (holes).

ZIMAGE_DIT_CONFIG = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
    "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
QWEN3_THIN_LAYERS = 3
QWEN3_THIN_FFN = 512
QWEN3_THIN_OPTIONS = {"qwen3_4b_model_config": {"num_hidden_layers": QWEN3_THIN_LAYERS,
                                                "intermediate_size": QWEN3_THIN_FFN}}


def _config_model_plan(config_class, cfg):
    """The plan of the diffusion model that ``comfy.supported_models.<config_class>(cfg)`` builds."""
    import comfy.supported_models as sm
    with torch.device("meta"):
        base = getattr(sm, config_class)(dict(cfg)).get_model({}, "")
    return _plan_module(base.diffusion_model)


def _encoder_plan(model_cls, model_name, options):
    """The plan of a host text-encoder class's ``transformer``, built with ``options`` (thin sizes)."""
    with torch.device("meta"):
        te = model_cls(device=None, dtype=torch.float32, model_options={"model_name": model_name, **options})
    return _plan_module(te.transformer)


def _zimage_dit_plan():
    plan = _config_model_plan("ZImage", ZIMAGE_DIT_CONFIG)
    return [(n, s, _zero_fill if _is_idle_lumina_matrix(n) else f) for n, s, f in plan]


def _qwen3_thin_plan():
    import comfy.text_encoders.z_image
    last = f"model.layers.{QWEN3_THIN_LAYERS - 1}."
    return [(n, s, _zero_fill if n.startswith(last) and "norm" not in n else f)
            for n, s, f in _encoder_plan(comfy.text_encoders.z_image.Qwen3_4BModel, "qwen3_4b", QWEN3_THIN_OPTIONS)]


def ensure_zimage_files(folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """``{"diffusion_model", "text_encoder", "vae"}``: the thin Z-Image NextDiT (detected as
    ``supported_models.ZImage``), the thin Qwen3-4B file (detected as ``TEModel.QWEN3_4B``), the
    16-channel VAE."""
    folder = Path(folder)
    dit = folder / component_filename("zimage-dit", seed, dtype)
    if not dit.exists():
        gen = torch.Generator().manual_seed(_component_seed("zimage-dit", seed))
        write_safetensors_streaming(dit, _entries(_zimage_dit_plan(), gen, dtype),
                                    {"dti_test_generator": FAMILY_GENERATOR_VERSION, "dti_test_component": "zimage-dit"})
        _check_zimage_detection(dit)
    name = f"qwen3_4b-{QWEN3_THIN_LAYERS}layer"
    te = folder / component_filename(name, seed, dtype)
    if not te.exists():
        gen = torch.Generator().manual_seed(_component_seed(name, seed))
        write_safetensors_streaming(te, _entries(_qwen3_thin_plan(), gen, dtype),
                                    {"dti_test_generator": FAMILY_GENERATOR_VERSION, "dti_test_component": name})
    return {"diffusion_model": dit, "text_encoder": te, "vae": ensure_component("vae16", folder, seed, dtype)}


def _check_zimage_detection(path):
    _check_nextdit_detection(path, "ZImage", ZIMAGE_DIT_CONFIG)


def load_zimage(folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16):
    """UNETLoader + CLIPLoader(type lumina2, as ComfyUI's Z-Image template; the thin Qwen3's
    model_options) + VAELoader, under inference mode. Returns ``SimpleNamespace(out=(model, clip, vae),
    log, paths)``."""
    paths = ensure_zimage_files(folder, seed, dtype)
    model, log_m = load_diffusion_model(paths["diffusion_model"])
    clip, log_c = load_text_encoders([paths["text_encoder"]], "LUMINA2", embedding_directory, QWEN3_THIN_OPTIONS)
    vae, log_v = load_vae(paths["vae"])
    return types.SimpleNamespace(out=(model, clip, vae), log=log_m + log_c + log_v, paths=paths)


# ----------------------------------------------------------------------------
# FLUX.2 klein (ComfyUI 0.33): the Flux2 DiT, Qwen3-4B through klein_te, the 32-channel KL VAE whose
# batch-norm'd 2x2 patches make FLUX.2's 128-channel, 16x latents
# ----------------------------------------------------------------------------

# The host's detector, handed a one-block FLUX.2 key layout at width 256 (num_heads = width / 128 = 2),
# gives the config its loader builds; klein 4B's real width is 3072, its text input the real 3 x 2560.
FLUX2_KLEIN_WIDTH = 256
_FLUX2_KLEIN_SKELETON = {
    "img_in.weight": (FLUX2_KLEIN_WIDTH, 128), "txt_in.weight": (FLUX2_KLEIN_WIDTH, 3 * 2560),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.norm.key_norm.scale": (128,),
    "double_stream_modulation_img.lin.weight": (6 * FLUX2_KLEIN_WIDTH, FLUX2_KLEIN_WIDTH),
}
_FLUX2_KLEIN_EXPECT = {"image_model": "flux2", "in_channels": 128, "context_in_dim": 3 * 2560,
                       "hidden_size": FLUX2_KLEIN_WIDTH, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                       "guidance_embed": False, "vec_in_dim": None}
# klein_te reads Qwen3's hidden layers 9, 18 and 27, so the thin Qwen3 keeps 28 layers; it is thin in
# width instead (2 query heads, 1 key/value head, FFN 256) and keeps the real 151936 x 2560 token table.
# CLIPLoader builds the real 36 x 32-head model from such a file, so the tests load it with these
# model_options (the host's own Qwen3_4B class, reduced).
QWEN3_KLEIN_LAYERS = 28
QWEN3_KLEIN_OPTIONS = {"qwen3_4b_model_config": {"num_hidden_layers": QWEN3_KLEIN_LAYERS, "intermediate_size": 256,
                                                 "num_attention_heads": 2, "num_key_value_heads": 1}}
VAE32BN_DDCONFIG = {**VAE_DDCONFIG, "z_channels": 32, "batch_norm_latent": True}


def _flux2_klein_config():
    return _detected_config(_FLUX2_KLEIN_SKELETON, _FLUX2_KLEIN_EXPECT, "flux2-klein",
                            " (FLUX.2 needs ComfyUI 0.33 or newer)")


def _flux2_klein_dit_plan():
    return _config_model_plan("Flux2", _flux2_klein_config())


def _qwen3_klein_plan():
    import comfy.text_encoders.flux
    return _encoder_plan(comfy.text_encoders.flux.Qwen3_4BModel, "qwen3_4b", QWEN3_KLEIN_OPTIONS)


def _vae32bn_entries(gen, dtype):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(VAE32BN_DDCONFIG), embed_dim=32)
    fills = {"bn.running_mean": _zero_fill, "bn.running_var": lambda t, _g: t.fill_(1.0)}
    entries = _entries(_plan_module(vae, buffers=fills), gen, dtype)
    entries.append(("bn.num_batches_tracked", (), torch.int64, lambda: torch.tensor(0, dtype=torch.int64)))
    return entries


def ensure_flux2_klein_files(folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """``{"diffusion_model", "text_encoder", "vae"}``: the thin FLUX.2 DiT (detected as
    ``supported_models.Flux2``), the thin Qwen3-4B file (detected as ``TEModel.QWEN3_4B``), the FLUX.2
    VAE layout (32 channels + batch norm: 128-channel latents at 1/16)."""
    return {"diffusion_model": _ensure_generated(folder, "flux2-klein-dit", _flux2_klein_dit_plan, seed, dtype, "Flux2"),
            "text_encoder": _ensure_generated(folder, f"qwen3_4b-klein-{QWEN3_KLEIN_LAYERS}layer", _qwen3_klein_plan,
                                              seed, dtype),
            "vae": _ensure_generated(folder, "vae32bn", None, seed, dtype,
                                     entries=lambda gen: _vae32bn_entries(gen, dtype))}


def load_flux2_klein(folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16):
    """UNETLoader + CLIPLoader(type flux2, as ComfyUI's klein templates; the thin Qwen3's
    model_options) + VAELoader, under inference mode. Returns ``SimpleNamespace(out, log, paths)``."""
    paths = ensure_flux2_klein_files(folder, seed, dtype)
    model, log_m = load_diffusion_model(paths["diffusion_model"])
    clip, log_c = load_text_encoders([paths["text_encoder"]], "FLUX2", embedding_directory, QWEN3_KLEIN_OPTIONS)
    vae, log_v = load_vae(paths["vae"])
    return types.SimpleNamespace(out=(model, clip, vae), log=log_m + log_c + log_v, paths=paths)


# ----------------------------------------------------------------------------
# Wan 2.1 text-to-video (ComfyUI 0.33): the Wan DiT, UMT5-XXL, the Wan 2.1 VAE (3-D latents)
# ----------------------------------------------------------------------------

WAN_DIT_WIDTH = 256  # 2 heads of 128 (detection: num_heads = dim / 128); Wan 2.1 1.3B is 1536 wide
_WAN_SKELETON = {
    "head.modulation": (1, 2, WAN_DIT_WIDTH), "head.head.weight": (16 * 4, WAN_DIT_WIDTH),
    "blocks.0.ffn.0.weight": (512, WAN_DIT_WIDTH), "patch_embedding.weight": (WAN_DIT_WIDTH, 16, 1, 2, 2),
}
_WAN_EXPECT = {"image_model": "wan2.1", "model_type": "t2v", "dim": WAN_DIT_WIDTH, "num_heads": 2, "in_dim": 16,
               "out_dim": 16, "num_layers": 1}
# UMT5-XXL at 2 of its 24 layers and with the thin SentencePiece vocabulary of the Gemma tests (its
# ComfyUI tokenizer reads the SentencePiece model from the file, so the table follows it): the real
# width 4096. ComfyUI's loader recognises a UMT5-XXL file only by its 24th block, so the tests build the
# CLIP as CLIPLoader(type wan) builds it for a full one (see load_wan).
UMT5_THIN_LAYERS = 2
WAN_VAE_DIM = 96  # the real Wan 2.1 VAE width: 0.3.64's loader builds 96 whatever the file holds


def umt5_thin_options(vocab_size):
    return {"umt5xxl_model_config": {"num_layers": UMT5_THIN_LAYERS, "vocab_size": int(vocab_size)}}


def _wan_dit_config():
    return _detected_config(_WAN_SKELETON, _WAN_EXPECT, "wan")


def _wan_dit_plan():
    return _config_model_plan("WAN21_T2V", _wan_dit_config())


def _umt5_plan(vocab_size):
    import comfy.text_encoders.wan
    return _encoder_plan(comfy.text_encoders.wan.UMT5XXlModel, "umt5xxl", umt5_thin_options(vocab_size))


def _wan_vae_plan():
    import inspect
    import comfy.ldm.wan.vae
    kwargs = dict(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
    accepted = inspect.signature(comfy.ldm.wan.vae.WanVAE.__init__).parameters
    # (0.33's WanVAE also takes its image and output channels; 0.3.64's has RGB built in)
    kwargs.update({k: 3 for k in ("image_channels", "conv_out_channels") if k in accepted})
    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(**kwargs)
    return _plan_module(vae)


def ensure_wan_files(folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """``{"diffusion_model", "text_encoder", "vae", "vocab_size"}``: the thin Wan DiT (detected as
    ``supported_models.WAN21_T2V``), the thin UMT5-XXL file with its ``spiece_model``, the thin Wan 2.1
    VAE (detected by ComfyUI's VAE loader as Wan 2.1's: 16 channels, 8x, 3-D latents)."""
    import sentencepiece
    sp = spiece_model_bytes()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=sp).get_piece_size()
    name = f"umt5xxl-{UMT5_THIN_LAYERS}layer-v{vocab}"
    return {"diffusion_model": _ensure_generated(folder, "wan-dit", _wan_dit_plan, seed, dtype, "WAN21_T2V"),
            "text_encoder": _ensure_generated(folder, name, None, seed, dtype,
                                              entries=lambda gen: _entries(_umt5_plan(vocab), gen, dtype) + _spiece_entry(sp)),
            "vae": _ensure_generated(folder, f"wan21-vae-{WAN_VAE_DIM}", _wan_vae_plan, seed, dtype),
            "vocab_size": vocab}


def load_wan(folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16):
    """UNETLoader + the CLIP CLIPLoader(type wan) builds for a UMT5-XXL file (``wan.te`` +
    ``WanT5Tokenizer``, the file's SentencePiece model; the thin UMT5's model_options) + VAELoader, under
    inference mode. Returns ``SimpleNamespace(out=(model, clip, vae), log, paths)``."""
    import comfy.sd
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.wan
    import comfy.utils
    paths = ensure_wan_files(folder, seed, dtype)
    model, log_m = load_diffusion_model(paths["diffusion_model"])
    with capture_logs() as log_c, torch.inference_mode():
        sd = comfy.utils.load_torch_file(str(paths["text_encoder"]), safe_load=True)
        target = types.SimpleNamespace(clip=comfy.text_encoders.wan.te(**comfy.text_encoders.sd3_clip.t5_xxl_detect(sd)),
                                       tokenizer=comfy.text_encoders.wan.WanT5Tokenizer, params={})
        clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, parameters=comfy.utils.calculate_parameters(sd),
                             tokenizer_data={"spiece_model": sd.get("spiece_model")},
                             model_options=umt5_thin_options(paths["vocab_size"]))
        m, u = clip.load_sd(sd)
        if m:
            logging.warning("clip missing: {}".format(m))
    vae, log_v = load_vae(paths["vae"])
    return types.SimpleNamespace(out=(model, clip, vae), log=log_m + log_c + log_v, paths=paths)


# ----------------------------------------------------------------------------
# Qwen-Image: its MMDiT (the real width: the loader reads only the depth and input channels from a
# file), Qwen2.5-VL-7B's language model (CLIPLoader type qwen_image)
# ----------------------------------------------------------------------------

QWEN_IMAGE_SKELETON = {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64),
                       "transformer_blocks.0.attn.to_q.weight": (3072, 3072)}
# Qwen2.5-VL-7B at 2 of its 28 layers, 4 query and 4 key/value heads (ComfyUI tells Qwen2.5-7B by its
# 4 key/value heads), FFN 256, the real 152064 x 3584 table (its tokenizer is Qwen's own BPE).
QWEN25_THIN_LAYERS = 2
QWEN25_THIN_OPTIONS = {"qwen25_7b_model_config": {"num_hidden_layers": QWEN25_THIN_LAYERS, "intermediate_size": 256,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4}}


def _qwen_image_dit_plan():
    cfg = _detected_config(QWEN_IMAGE_SKELETON, {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1},
                           "qwen-image")
    return _config_model_plan("QwenImage", cfg)


def _qwen25_plan():
    import comfy.text_encoders.qwen_image
    return _encoder_plan(comfy.text_encoders.qwen_image.Qwen25_7BVLIModel, "qwen25_7b", QWEN25_THIN_OPTIONS)


def ensure_qwen_image_files(folder, seed=DEFAULT_SEED, dtype=torch.float16):
    """``{"diffusion_model", "text_encoder", "vae"}``: a one-block Qwen-Image DiT (detected as
    ``supported_models.QwenImage``), the thin Qwen2.5-VL-7B file (detected as ``TEModel.QWEN25_7B``) and
    the Wan 2.1 VAE that Qwen-Image renders with (Wan's thin one)."""
    return {"diffusion_model": _ensure_generated(folder, "qwen-image-dit", _qwen_image_dit_plan, seed, dtype, "QwenImage"),
            "text_encoder": _ensure_generated(folder, f"qwen25_7b-{QWEN25_THIN_LAYERS}layer", _qwen25_plan, seed, dtype),
            "vae": _ensure_generated(folder, f"wan21-vae-{WAN_VAE_DIM}", _wan_vae_plan, seed, dtype)}


def load_qwen_image(folder, embedding_directory=None, seed=DEFAULT_SEED, dtype=torch.float16):
    """UNETLoader + CLIPLoader(type qwen_image; the thin Qwen2.5's model_options) + VAELoader, under
    inference mode. Returns ``SimpleNamespace(out=(model, clip, vae), log, paths)``."""
    paths = ensure_qwen_image_files(folder, seed, dtype)
    model, log_m = load_diffusion_model(paths["diffusion_model"])
    clip, log_c = load_text_encoders([paths["text_encoder"]], "QWEN_IMAGE", embedding_directory, QWEN25_THIN_OPTIONS)
    vae, log_v = load_vae(paths["vae"])
    return types.SimpleNamespace(out=(model, clip, vae), log=log_m + log_c + log_v, paths=paths)


# ----------------------------------------------------------------------------
# Vision models for DTI Evaluate, as CLIPVisionLoader loads them: ComfyUI picks a fixed config by the
# depth it finds (CLIP ViT-L/14 by its 23rd layer, DINOv2 large by its 24th), so these are full-size
# (304M parameters each) with random weights, built from the host's own classes and configs.
# ----------------------------------------------------------------------------

VISION_KINDS = {"clip-vision-vitl": ("clip_model", "CLIPVisionModelProjection", "clip_vision_config_vitl.json"),
                "dinov2-large": ("image_encoders.dino2", "Dinov2Model", "image_encoders/dino2_large.json")}


def _vision_plan(kind):
    import importlib
    import json
    import os

    import comfy.ops
    module, cls, config = VISION_KINDS[kind]
    mod = importlib.import_module(f"comfy.{module}")
    with open(os.path.join(os.path.dirname(mod.__file__) if "." not in module else
                           os.path.dirname(os.path.dirname(mod.__file__)), config)) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        model = getattr(mod, cls)(cfg, torch.float32, None, comfy.ops.manual_cast)
    return _plan_module(model)


def ensure_clip_vision(folder, kind, seed=DEFAULT_SEED, dtype=torch.float16):
    """Path of a random ``kind`` vision-model file (see VISION_KINDS) that CLIPVisionLoader detects."""
    return _ensure_generated(folder, kind, lambda: _vision_plan(kind), seed, dtype)


def load_clip_vision(path):
    """CLIPVisionLoader's call, ``comfy.clip_vision.load(path)``, under inference mode; ``(clip_vision, log)``."""
    import comfy.clip_vision
    with capture_logs() as records, torch.inference_mode():
        cv = comfy.clip_vision.load(str(path))
    if cv is None:
        raise AssertionError(f"CLIPVisionLoader does not recognise {path}")
    return cv, records
