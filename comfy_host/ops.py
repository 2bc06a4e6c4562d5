"""Reading a layer's weights the way ComfyUI's own ops do (fp8, quantized, offloaded, LoRA-patched).

ComfyUI's op classes (``comfy.ops.CastWeightBiasOp`` and the ``Linear``/``Conv2d``/``Embedding``
built on it, ``MixedPrecisionOps`` for fp8 and quantized checkpoints) cast their stored weights
per call. Code that reads ``m.weight`` directly would see an fp8 or ``QuantizedTensor`` storage,
or a weight the host has not moved or patched yet; these helpers go through the host's cast.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

import comfy.ops


def is_cast_layer(m: torch.nn.Module) -> bool:
    """A layer of ComfyUI's op classes (it casts its weights per call)."""
    return isinstance(m, comfy.ops.CastWeightBiasOp)


# 0.33 pairs the cast with an uncast (async offload streams, pinned dynamic-VRAM weights);
# 0.3.64 has only the cast, which returns (weight, bias).
HAS_UNCAST = hasattr(comfy.ops, "uncast_bias_weight") and "offloadable" in inspect.signature(
    comfy.ops.cast_bias_weight).parameters


@contextlib.contextmanager
def cast_weights(module: torch.nn.Module, input=None, dtype=None, device=None):
    """``(weight, bias)`` of a ComfyUI op layer as its forward would use them, released on exit."""
    if HAS_UNCAST:
        weight, bias, stream = comfy.ops.cast_bias_weight(module, input, dtype=dtype, device=device, offloadable=True)
        try:
            yield weight, bias
        finally:
            comfy.ops.uncast_bias_weight(module, weight, bias, stream)
    else:
        yield comfy.ops.cast_bias_weight(module, input, dtype=dtype, device=device)


def _quantized_type():
    try:
        import comfy.quant_ops
    except ImportError:  # 0.3.64: no quantized checkpoints
        return None
    return getattr(comfy.quant_ops, "QuantizedTensor", None)


def is_quantized(t) -> bool:
    qt = _quantized_type()
    return qt is not None and isinstance(t, qt)


def read_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as a plain tensor (detached): a quantized weight is dequantized through the
    host's cast to its original dtype; an fp8 or plain weight is returned as stored (no copy)."""
    weight = module.weight
    if is_quantized(weight):
        dtype = getattr(getattr(weight, "params", None), "orig_dtype", None) or torch.float32
        with cast_weights(module, dtype=dtype, device=weight.device) as (w, _):
            # An op class without a dequantizing cast (a plain Embedding) hands the storage back.
            w = w.dequantize() if is_quantized(w) else w
            return w.detach().clone()
    return weight.detach() if torch.is_tensor(weight) else weight
