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
* ``pinning``: ComfyUI's pinning of a partial load's offloaded weights (--lowvram / --novram), whose
  accounting a CUDA-less torch would skip.
* ``offload_buffer_reuse``: 0.33's offloaded casts, whose cast buffers are reused by the next layer once
  a cast context ends (offload streams).
"""

from __future__ import annotations

import contextlib
import logging

import pytest
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


class _FakeCudart:
    """``cudaHostRegister`` / ``cudaHostUnregister`` that succeed: ComfyUI's pinned-memory accounting
    runs on the CPU as on NVIDIA (the memory itself stays as it is)."""

    @staticmethod
    def cudaHostRegister(ptr, size, flags):
        return 0

    @staticmethod
    def cudaHostUnregister(ptr):
        return 0


@contextlib.contextmanager
def pinning(monkeypatch, caplog):
    """ComfyUI 0.33's pinning of offloaded weights, on the CPU: a partial load then pins each offloaded
    layer's weights (``ModelPatcher.pinned``, ``model_management.PINNED_MEMORY`` by address). Yields
    a function returning ComfyUI's warnings about pins so far ("Tried to unpin tensor not pinned by
    ComfyUI", "Size of pinned tensor changed"). Needs a host that pins (0.33)."""
    import comfy.model_management as mm

    if not hasattr(mm, "pin_memory") or not hasattr(mm, "PINNED_MEMORY"):
        pytest.skip("this ComfyUI does not pin offloaded weights (0.3.64 has no async offload)")
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 64 * 2**30)
    monkeypatch.setattr(mm, "PINNED_MEMORY", {})
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart)
    with caplog.at_level(logging.WARNING):
        try:
            yield lambda: [r.getMessage() for r in caplog.records if "pinned" in r.getMessage().lower()]
        finally:
            monkeypatch.undo()


@contextlib.contextmanager
def offload_buffer_reuse(monkeypatch):
    """0.33's offloaded casts, as they behave on CUDA streams: a cast weight lives in a cast buffer that
    the next layer's cast reuses once ComfyUI's cast context ends (``uncast_bias_weight``). Emulated by
    overwriting every cast copy with NaN at that moment, without bumping its autograd version (as a
    copy on another stream would not): a weight that was saved for backward then poisons the
    gradient, silently. Yields the number of copies overwritten so far (a one-element list)."""
    import comfy.ops

    uncast = getattr(comfy.ops, "uncast_bias_weight", None)
    if uncast is None:
        pytest.skip("this ComfyUI casts without offload streams (0.3.64): nothing to emulate")
    poisoned = [0]

    def reused(s, weight, bias, offload_stream):
        uncast(s, weight, bias, offload_stream)
        for cast, own in ((weight, getattr(s, "weight", None)), (bias, getattr(s, "bias", None))):
            if (isinstance(cast, torch.Tensor) and isinstance(own, torch.Tensor) and cast.is_floating_point()
                    and cast.untyped_storage().data_ptr() != own.untyped_storage().data_ptr()):
                cast.data.fill_(float("nan"))
                poisoned[0] += 1

    monkeypatch.setattr(comfy.ops, "uncast_bias_weight", reused)
    try:
        yield poisoned
    finally:
        monkeypatch.setattr(comfy.ops, "uncast_bias_weight", uncast)


def _half_matmul_op():
    """A custom op like the cublas_ops package's half-precision matmul: a forward, no backward."""
    try:
        return torch.ops.dti_test.half_matmul
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("dti_test::half_matmul", mutates_args=())
    def half_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    @half_matmul.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    return torch.ops.dti_test.half_matmul


class CublasLinear(torch.nn.Linear):
    """Stands for the ``cublas_ops`` package's class (ComfyUI recognises nothing else of it)."""

    def forward(self, x):
        return _half_matmul_op()(x, self.weight, self.bias)


def cublas_operations():
    """ComfyUI 0.33's ``comfy.ops.cublas_ops`` (what ``--fast cublas_ops`` picks for fp16 weights computed
    in fp16 when the package is installed), built on the stand-in ``CublasLinear``: a loaded layer runs
    the package's kernel, a cast one ComfyUI's cast around it. Pass as ``custom_operations``."""
    import comfy.ops

    if not hasattr(comfy.ops, "CastBiasWeightContext"):
        pytest.skip("this ComfyUI's cublas ops differ (0.33's CastBiasWeightContext is emulated)")
    matmul = _half_matmul_op()

    class cublas_ops(comfy.ops.manual_cast):
        class Linear(CublasLinear, comfy.ops.manual_cast.Linear):
            def reset_parameters(self):
                return None

            def forward_comfy_cast_weights(self, input):
                with comfy.ops.CastBiasWeightContext(self, input, offloadable=True) as (weight, bias):
                    return matmul(input, weight, bias)

            def forward(self, *args, **kwargs):
                if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                    return self.forward_comfy_cast_weights(*args, **kwargs)
                return super().forward(*args, **kwargs)

    return cublas_ops
