"""What only a GPU runs, emulated on the CPU (``../shared/docs/gpu-paths.md``, recipes B-D; what each
covers and what only a GPU shows: ``docs/testing.md``). Loaded by ``conftest.py`` as
``tests_host_gpu_emulation``; every helper is a context manager that puts the host back on exit.

* ``text_encoders_on_device``: ComfyUI's text encoders return their outputs on an execution device
  other than its intermediate device (the default NVIDIA launch: encoders on the GPU, conditioning
  handed on the CPU). Tensors "on the GPU" are marked; an op that mixes marked and unmarked
  non-scalar tensors raises torch's device error, as CUDA would.
* ``fp16_compute``: the diffusion model stored and computed in fp16 (what ComfyUI picks on NVIDIA for
  SD1.5/SDXL checkpoints); the CPU otherwise computes in fp32.
* ``dynamic``: model patchers that report dynamic VRAM (0.33's comfy-aimdo), which a CPU load never makes.
* ``pinned_partial_load``: a partial load (--lowvram / --novram) whose offloaded weights ComfyUI pinned.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten, tree_map


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the GPU: ops keep the mark, ``.cpu()`` / ``.to(cpu)`` drop it,
    and mixing it with unmarked tensors of one or more dimensions raises (0-dim tensors mix freely, as
    CPU scalars do with CUDA tensors)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_cpu(args[1:], kwargs)):
                out = func(*args, **kwargs)
                return out.as_subclass(torch.Tensor) if isinstance(out, OnDevice) else out
            leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
            marked = [isinstance(t, OnDevice) for t in leaves]
        if any(marked) and not all(marked):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (emulated on the CPU, in {getattr(func, '__name__', func)})")
        return super().__torch_function__(func, types, args, kwargs)


def _to_cpu(args, kwargs) -> bool:
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
        if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice):
            return True  # .to(other): follows an unmarked (CPU) tensor
    return False


def mark(value):
    """``value`` with every tensor in it marked as living on the GPU."""
    return tree_map(lambda t: t.as_subclass(OnDevice) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)
                    else t, value)


def is_marked(t) -> bool:
    return isinstance(t, OnDevice)


@contextlib.contextmanager
def text_encoders_on_device(monkeypatch):
    """Every ComfyUI text encoder (``SDClipModel``: CLIP, T5 and the rest of sd1_clip's family) returns
    its outputs "on the GPU"; ComfyUI's own ``encode_token_weights`` then moves the conditioning and
    the first pooled row to its intermediate device (the CPU), as on an NVIDIA launch."""
    import comfy.sd1_clip

    forward = comfy.sd1_clip.SDClipModel.forward

    def on_device(self, *args, **kwargs):
        return mark(forward(self, *args, **kwargs))

    monkeypatch.setattr(comfy.sd1_clip.SDClipModel, "forward", on_device)
    try:
        yield
    finally:
        monkeypatch.setattr(comfy.sd1_clip.SDClipModel, "forward", forward)


@contextlib.contextmanager
def fp16_compute(monkeypatch):
    """Load options and host state for a diffusion model stored and computed in fp16, as ComfyUI runs
    SD1.5/SDXL on NVIDIA: yields the ``model_options`` for ``load_checkpoint``; while active,
    ``unet_manual_cast`` answers None (no cast to fp32, as the CPU would ask for)."""
    import comfy.model_management as mm
    import comfy.ops

    monkeypatch.setattr(mm, "unet_manual_cast", lambda *a, **k: None)
    try:
        yield {"dtype": torch.float16, "custom_operations": comfy.ops.disable_weight_init}
    finally:
        monkeypatch.undo()


@contextlib.contextmanager
def dynamic(*patchers):
    """Patchers that report dynamic VRAM on the instance (``ModelPatcherDynamic`` turns itself into a
    classic patcher for a CPU load device, so the class cannot be used here)."""
    for p in patchers:
        p.is_dynamic = lambda: True
    try:
        yield
    finally:
        for p in patchers:
            del p.is_dynamic


def pin_offloaded(patcher) -> list[torch.Tensor]:
    """Pin the CPU weights of a partially loaded patcher the way ComfyUI 0.33 does for its offloaded
    layers (``pin_memory``, which registers them in its pinned-memory accounting). Returns the pinned
    tensors. Needs a host with ``model_management.pin_memory`` and an accelerator to pin for: on a
    CPU-only torch it pins nothing (the test then says why it skipped)."""
    import comfy.model_management as mm

    pinned = []
    pin = getattr(mm, "pin_memory", None)
    if pin is None:
        return pinned
    for m in patcher.model.modules():
        if not getattr(m, "comfy_cast_weights", False):
            continue
        for p in m.parameters(recurse=False):
            try:
                if pin(p):
                    pinned.append(p)
            except Exception:
                continue
    return pinned
