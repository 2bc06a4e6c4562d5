"""Memory and devices: where training runs, what stays loaded, out of memory, cancel, clean-up."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

import torch

import comfy.model_management as mm


def torch_device():
    return mm.get_torch_device()


def full_load() -> bool:
    """Whether the models may be loaded whole: not under --lowvram / --novram, where ComfyUI keeps
    part of the weights off the GPU and casts them per layer (training follows, see autograd.py)."""
    return mm.vram_state not in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)


def load_for_training(model, clip) -> None:
    """The diffusion model and the text encoders on the device for the training steps."""
    mm.load_models_gpu([model, clip.patcher], force_full_load=full_load())


def load_text_encoders(clip) -> None:
    """The CLIP's text encoders on the device (for encodes outside ``CLIP.encode_from_tokens``)."""
    mm.load_models_gpu([clip.patcher])


def device_context(device):
    """The host's CUDA device context for ``device`` (0.33: ``cuda_device_context``, so kernels such
    as comfy-kitchen's fp8 ones pick the right card); nothing on hosts without it."""
    ctx = getattr(mm, "cuda_device_context", None)
    return ctx(device) if ctx is not None else contextlib.nullcontext()


@contextlib.contextmanager
def training_flag(value: bool):
    """ComfyUI's own "a training loop is running" flag (0.33: ``in_training``, which its trainer sets)
    at ``value`` while active, then back. Under it the DiTs take their differentiable paths (Lumina 2's
    q/k norm and RoPE in PyTorch instead of comfy-kitchen's fused op, which has no backward). Hosts
    without the flag have no such paths: nothing to set."""
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = value
    try:
        yield
    finally:
        mm.in_training = before


def keeping_pins(patcher, replace) -> None:
    """Run ``replace()`` (which swaps the patcher's weight tensors for copies) so that the weights
    ComfyUI pinned stay pinned and in its accounting: 0.33 pins the CPU weights of offloaded layers
    (--novram, a partial load) and unpins them by address later; a swapped tensor would be unpinned
    memory ("Tried to unpin tensor not pinned by ComfyUI") with slower copies to the GPU. Hosts
    without pinning (0.3.64) just run ``replace()``."""
    keys = sorted(getattr(patcher, "pinned", ()) or ()) if patcher is not None else []
    for key in keys:
        patcher.unpin_weight(key)
    try:
        replace()
    finally:
        for key in keys:
            patcher.pin_weight_to_device(key)


def _is_dynamic(patcher) -> bool:
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def trainable(model, clip):
    """``(model, clip)`` whose weights stay resident and can be trained through.

    Dynamic VRAM (0.33, ``comfy-aimdo``: on by default on NVIDIA) streams weights from a mapped
    file per call, so ``force_full_load`` does not keep them resident and the training hooks would
    see weights come and go. A dynamic patcher is swapped, for the run, for a classic one: ComfyUI's
    cached non-dynamic delegate where the patcher has one (``get_non_dynamic_delegate``, what its
    sampler uses: the checkpoint is re-read once, not at every run), else
    ``clone(disable_dynamic=True)`` (as core's torch-compile and multi-GPU nodes do). Either reloads
    the weights through the loader's ``cached_patcher_init``; a dynamic model from a loader that set
    none is refused with the way out. Classic patchers come back unchanged."""
    if _is_dynamic(model):
        model = _classic(model, "MODEL")
    if _is_dynamic(clip.patcher):
        new = clip.clone()
        new.patcher = _classic(clip.patcher, "CLIP")
        # the classic patcher carries its own copy of the encoders
        new.cond_stage_model = new.patcher.model
        clip = new
    return model, clip


def _classic(patcher, what: str):
    from .contracts import UnsupportedModelError

    cached = getattr(patcher, "non_dynamic_delegate_model", None) is not None
    if getattr(patcher, "cached_patcher_init", None) is None and not cached:
        raise UnsupportedModelError(
            f"DTI Train: this {what} is a dynamic-VRAM model from a loader that cannot reload it as a classic "
            f"model (it set no cached_patcher_init), and training needs the weights resident. Load it with "
            f"a core loader (CheckpointLoaderSimple, UNETLoader, CLIPLoader / DualCLIPLoader, VAELoader), or "
            f"start ComfyUI with --disable-dynamic-vram. Nothing was trained or written.")
    delegate = getattr(patcher, "get_non_dynamic_delegate", None)
    return delegate() if delegate is not None else patcher.clone(disable_dynamic=True)


def any_dynamic(model, clip) -> bool:
    """Whether the MODEL or the CLIP came as a dynamic-VRAM patcher (0.33 on NVIDIA, by default)."""
    return _is_dynamic(model) or _is_dynamic(clip.patcher)


def start_peak(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def resident(model, clip) -> str:
    """How much of each model's weights the host holds on the device now (``loaded_size`` of
    ``model_size``): whole under a full load, a part under --lowvram / --novram."""
    parts = []
    for what, patcher in (("diffusion model", model), ("text encoders", clip.patcher)):
        try:
            parts.append(f"{what} {patcher.loaded_size() / 2**30:.2f} of {patcher.model_size() / 2**30:.2f} GiB")
        except Exception:  # (a patcher without the two counters: say nothing rather than guess)
            continue
    return "weights on the device: " + ", ".join(parts) if parts else ""


def weights_gib(patcher) -> float:
    """GiB of weights a model patcher holds as loaded (``model_size``: the dtype it loaded in)."""
    return patcher.model_size() / 2**30


def peak_line(device, was_dynamic: bool, weights: str = "") -> str | None:
    """One log line with the run's peak GPU memory (torch's allocations), or None off CUDA. A
    dynamic-VRAM model trains on a classic copy, whose weights sit whole in VRAM: the line says so, as
    that is the memory dynamic VRAM would have saved. ``weights``: what ``resident`` said at the start."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    how = ("dynamic VRAM model, trained as a classic fully loaded copy" if was_dynamic
           else "classic model patcher")
    return f"DTI Train: peak GPU memory {peak:.2f} GiB ({how}){'; ' + weights if weights else ''}"


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the accelerator (0.33's ``is_oom`` also knows the accelerator's own
    error codes)."""
    check = getattr(mm, "is_oom", None)
    if check is not None:
        return bool(check(e))
    return isinstance(e, torch.OutOfMemoryError)


def oom_error(message: str) -> Exception:
    """The host's OOM exception type, which its executor recognises (it frees models and tells the UI)."""
    return mm.OOM_EXCEPTION(message)


def check_interrupted() -> None:
    """Raise the host's interrupt exception if the user cancelled the prompt."""
    mm.throw_exception_if_processing_interrupted()


def release() -> None:
    gc.collect()
    mm.soft_empty_cache()
    if sys.platform.startswith("linux"):
        # glibc keeps freed activations mapped; hand them back so a long-lived server's resident
        # memory falls after a run (cheap, and a no-op where unsupported).
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def rng_devices() -> list:
    device = mm.get_torch_device()
    return [device] if getattr(device, "type", "cpu") == "cuda" else []
