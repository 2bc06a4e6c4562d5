"""The autograd patches: ComfyUI's inference-only modules made differentiable for one run, then undone.

ComfyUI builds its models for sampling; seven things stand between them and a backward pass,
and each is handled here, for the run only:

* weights loaded under ``inference_mode`` are inference tensors autograd cannot save
  (replaced by normal clones, one tensor at a time; the ones ComfyUI pinned are pinned again);
* CLIP/T5 layers add residuals in place after a layer norm saved its input (the norms get a copy);
  Llama/Gemma blocks (0.33) write their output into their input with ``out=``, which autograd
  refuses (the encoders run where such calls return a fresh tensor);
* the attention ComfyUI picked from the launch flags may not be differentiable
  (sub-quadratic attention exponentiates in place once free memory is short; sage has no
  backward): training calls get PyTorch SDPA through ``optimized_attention_override``;
* layers that cast their stored weights per call (fp16 text encoders on the CPU, fp8 weights,
  LoRA patches) would keep every cast copy alive until backward -- a second copy of the whole
  model -- and, on 0.33's offload streams, a copy in a cast buffer the next layer reuses: those
  layers (Linear, Conv2d and the norms) recast in backward instead;
* ComfyUI's DiTs take fused kernels without a backward (0.33's comfy-kitchen RoPE) unless
  ComfyUI's own training flag is set: it is, for the run (previews sample with it clear);
* optional activation checkpointing per UNet / DiT block and per text-encoder layer.

Sampling outside the run is untouched: the attention override lives only in the training
step's own ``transformer_options``, and every forward or hook installed here is removed on
exit, on error and on cancel.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

from . import kernels, memory, ops
from .text import text_encoders

log = logging.getLogger("ComfyUI-DTI")


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _sdpa_attention(func, *args, **kwargs):
    # Called by ComfyUI's wrap_attn with the backend it chose as `func`; kwargs already carry
    # the wrapper's re-entry flag, so attention_pytorch runs directly. SDPA has a backward on
    # every device and dtype, and never depends on free memory.
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def training_transformer_options(model) -> dict:
    """A copy of the MODEL's ``transformer_options`` whose attention is differentiable.

    Only calls that pass this dict get SDPA; the MODEL's own options (what KSampler uses)
    are not modified.
    """
    opts = dict(model.model_options.get("transformer_options", {}))
    if "optimized_attention_override" in opts:
        log.info("DTI Train: replacing this model's attention override with PyTorch SDPA for the run")
    opts["optimized_attention_override"] = _sdpa_attention
    return opts


# ---------------------------------------------------------------------------------------------
# per-call weight casting without a saved copy
# ---------------------------------------------------------------------------------------------

class _CastLinear(torch.autograd.Function):
    """``linear(x, cast(W))`` that keeps no cast weight for backward: the input gradient
    ``g @ cast(W)`` recasts W. Weights never need gradients here."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.dtype, ctx.device = module, x.dtype, x.device
        with ops.cast_weights(module, x) as (weight, bias):
            return F.linear(x, weight, bias)  # x is 2-D (see _lean_forward): a fresh tensor, not a view

    @staticmethod
    def backward(ctx, grad):
        with ops.cast_weights(ctx.module, dtype=ctx.dtype, device=ctx.device) as (weight, _):
            return grad.to(weight.dtype) @ weight, None


class _CastConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.dtype, ctx.device, ctx.shape = module, x.dtype, x.device, x.shape
        with ops.cast_weights(module, x) as (weight, bias):
            out = module._conv_forward(x, weight, bias)
        return out.clone() if out._is_view() else out

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        with ops.cast_weights(m, dtype=ctx.dtype, device=ctx.device) as (weight, _):
            gx = torch.nn.grad.conv2d_input(ctx.shape, weight, grad.to(weight.dtype), m.stride, m.padding,
                                            m.dilation, m.groups)
        return gx, None


def _norm(module, x, weight, bias):
    if isinstance(module, torch.nn.GroupNorm):
        return F.group_norm(x, module.num_groups, weight, bias, module.eps)
    if isinstance(module, torch.nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, weight, module.eps)
    return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


class _CastNorm(torch.autograd.Function):
    """A cast norm layer (GroupNorm, LayerNorm, RMSNorm) that keeps no cast weight for backward.

    ComfyUI's own forward saves the weight it cast. On 0.33 an offloaded layer (--novram, a partial
    load) casts into a cast buffer on an offload stream that the next layer's cast reuses once the
    context ends: a weight saved for backward could be overwritten before the backward kernel reads
    it, silently. Here the input gradient is computed in backward from a fresh cast, inside its
    context, by recomputing the (cheap) norm."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        ctx.save_for_backward(x)
        with ops.cast_weights(module, x) as (weight, bias):
            return _norm(module, x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad(), ops.cast_weights(ctx.module, x) as (weight, bias):
            xd = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(_norm(ctx.module, xd, weight, bias), xd, grad)
        return gx, None


def _lean_forward(fn, module, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled() or not x.requires_grad:
        return module.__class__.forward_comfy_cast_weights(module, x, *args, **kwargs)
    if fn is _CastLinear and x.dim() != 2:
        # A custom Function's output must not be a view (callers modify it in place: Flux does), and
        # linear on an N-D input returns one; run it on the flattened rows and reshape outside.
        return fn.apply(x.reshape(-1, x.shape[-1]), module).view(*x.shape[:-1], -1)
    return fn.apply(x, module)


def _lean_cast_layers(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Give every plain casting Linear/Conv2d of ComfyUI's ops a forward that saves no weight.

    Layers with their own cast forward (scaled fp8, cuBLAS ops) are wrapped in per-layer
    recomputation instead, which also saves only the input.
    """
    import comfy.ops

    dwi = comfy.ops.disable_weight_init
    base = {dwi.Linear.forward_comfy_cast_weights: _CastLinear, dwi.Conv2d.forward_comfy_cast_weights: _CastConv2d,
            dwi.GroupNorm.forward_comfy_cast_weights: _CastNorm, dwi.LayerNorm.forward_comfy_cast_weights: _CastNorm}
    if hasattr(dwi, "RMSNorm") and isinstance(dwi.RMSNorm, type) and issubclass(dwi.RMSNorm, torch.nn.RMSNorm):
        base[dwi.RMSNorm.forward_comfy_cast_weights] = _CastNorm  # (0.33; 0.3.64's is ComfyUI's own class)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)
    changed = []
    for m in root.modules():
        if not ops.is_cast_layer(m):
            continue
        if _is_cublas_linear(m):
            # (its own forward, not forward_comfy_cast_weights, runs the kernel when the layer is loaded)
            m.forward = functools.partial(_differentiable_linear, m, m.forward)
            changed.append(m)
            continue
        if isinstance(m, norms):
            own = type(m).forward_comfy_cast_weights
            if base.get(own) is _CastNorm and getattr(m, "weight", None) is not None:
                m.forward_comfy_cast_weights = functools.partial(_lean_forward, _CastNorm, m)
                changed.append(m)
            continue  # (a norm without weights casts nothing; another norm class keeps its forward)
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        own = type(m).forward_comfy_cast_weights
        fn = base.get(own)
        if isinstance(m, torch.nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            fn = None  # conv2d_input below assumes zero padding given as numbers
        if fn is not None:
            m.forward_comfy_cast_weights = functools.partial(_lean_forward, fn, m)
        else:
            m.forward_comfy_cast_weights = functools.partial(_recompute, functools.partial(own, m))
        changed.append(m)
    return changed


def _is_cublas_linear(m: torch.nn.Module) -> bool:
    # `--fast cublas_ops` (fp16 weights computed in fp16, the cublas_ops package installed): ComfyUI's
    # cublas_ops.Linear runs the package's half-precision matmul, which has no backward; it is not gated
    # behind in_training (docs/host-kernels.md). Recognised by the package's class in its MRO.
    return any(c.__name__ == "CublasLinear" for c in type(m).__mro__)


def _differentiable_linear(module, forward, x, *args, **kwargs):
    """A cuBLAS-ops Linear under grad: the plain cast ``linear`` that keeps no weight (``_CastLinear``);
    without grad (sampling, previews) the host's own kernel."""
    if args or kwargs or not torch.is_grad_enabled() or not x.requires_grad:
        return forward(x, *args, **kwargs)
    return _lean_forward(_CastLinear, module, x)


def _recompute(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# inference tensors and in-place residuals
# ---------------------------------------------------------------------------------------------

def clone_to_normal(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer with a normal (non-inference) clone, one at a time.

    Models loaded under ComfyUI's inference_mode hold inference tensors that
    autograd cannot save; on a GPU even ones reporting ``is_inference() == False``
    fail, so every tensor is replaced, not just the flagged ones.
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.clone()


def _clone_input(module, args):
    # ComfyUI's CLIPLayer adds residuals in place (x += attn(ln1(x))); handing the
    # layer norms a copy keeps the tensor they save for backward unmodified.
    if not args or not torch.is_tensor(args[0]):
        return None
    return (args[0].clone(),) + tuple(args[1:])


def _is_norm(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _checkpointed(forward, *args, **kwargs):
    def run(*a, **k):
        # DiT blocks add into their inputs in place (img += ...); the checkpoint keeps the inputs
        # for the recomputation, so the block works on copies of them.
        a = tuple(t.clone() if torch.is_tensor(t) and t.is_floating_point() else t for t in a)
        k = {n: (v.clone() if torch.is_tensor(v) and v.is_floating_point() else v) for n, v in k.items()}
        return forward(*a, **k)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def _checkpointed_encoder_layer(forward, *args, **kwargs):
    """A text-encoder layer under checkpointing: as ``_checkpointed``, and the recomputation in the
    backward pass (outside the encoder's forward) also returns fresh tensors for ``out=`` calls."""
    def run(*a, **k):
        with _FreshOutputs():
            return forward(*a, **k)
    return _checkpointed(run, *args, **kwargs)


def _requires_grad(values) -> bool:
    return any(torch.is_tensor(v) and v.requires_grad
               or isinstance(v, (list, tuple)) and _requires_grad(v) for v in values)


class _FreshOutputs(torch.overrides.TorchFunctionMode):
    """The text encoders' training forward. Calls with ``out=`` on tensors that require grad return a
    fresh tensor instead of writing into ``out``: autograd refuses them ("functions with out=...
    arguments don't support automatic differentiation"). 0.33's Llama/Gemma blocks end in
    ``x = torch.add(residual, x, out=x_in)`` and use the returned tensor, so the values are the same
    and the block's input stays unmodified. And host kernels without a backward (0.36+'s
    comfy-kitchen RoPE) go through their stand-ins (``kernels.py``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "out" in kwargs and torch.is_grad_enabled() and _requires_grad([*args, *kwargs.values()]):
            kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        if isinstance(func, kernels.OP_TYPES) and torch.is_grad_enabled() and _requires_grad([*args, *kwargs.values()]):
            stand_in = kernels.stand_in_for(func)
            if stand_in is not None:
                return stand_in(*args, **kwargs)
        return func(*args, **kwargs)


def _fresh_outputs(forward, *args, **kwargs):
    with _FreshOutputs():
        return forward(*args, **kwargs)


def _check_context_processor(net) -> None:
    """SD3 checkpoints with a context processor (``mmdit.ContextProcessor``) run its attention with the
    module-global backend the launch flags chose, with no ``transformer_options`` to override: sage,
    flash and comfy-kitchen attention have no backward there. Refused with the way out, before anything
    runs (no official SD3 / 3.5 checkpoint has one; docs/host-kernels.md)."""
    if getattr(net, "context_processor", None) is None:
        return
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    fn = getattr(mmdit, "optimized_attention", None)
    if fn in (attention.attention_pytorch, attention.attention_basic, attention.attention_split, None):
        return
    from .contracts import UnsupportedModelError

    raise UnsupportedModelError(
        f"DTI Train: this SD3 model's context processor runs ComfyUI's launch-chosen attention "
        f"({getattr(fn, '__name__', fn)}), which has no backward there. Start ComfyUI with "
        f"--use-pytorch-cross-attention (or without --use-sage-attention / --use-flash-attention / "
        f"--use-ck-attention) to train it. Nothing was trained or written.")


RESIDUAL_NORMS = ("layer_norm1", "layer_norm2", "layer_norm")
# Transformer block lists of ComfyUI's DiT families: Flux/Chroma, SD3 (MMDiT), Lumina 2 / others.
DIT_BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks", "layers", "blocks", "transformer_blocks")


def checkpoint_units(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose activations gradient checkpointing recomputes, for a UNet or a DiT."""
    if hasattr(net, "input_blocks"):
        blocks = list(net.input_blocks) + [getattr(net, "middle_block", None)] + list(getattr(net, "output_blocks", []))
        # ComfyUI's UNet runs a block's layers one by one (forward_timestep_embed), never the
        # block's own forward, so each layer (ResBlock, SpatialTransformer, ...) is the unit.
        return [layer for blk in blocks if blk is not None for layer in blk]
    units = []
    for attr in DIT_BLOCK_LISTS:
        blocks = getattr(net, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            units += list(blocks)
    return units


# The layer lists of ComfyUI's text encoders: CLIP (text_model.encoder.layers), Llama-style language
# models (Gemma-2, Qwen3: model.layers), T5 / UMT5 (encoder.block).
ENCODER_LAYER_LISTS = ("layers", "block")


def encoder_checkpoint_units(encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of a text encoder whose activations gradient checkpointing recomputes: the first
    layer list found in its transformer (empty for an encoder of another shape: then nothing is
    recomputed there)."""
    root = getattr(encoder, "transformer", encoder)
    for name, m in root.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ENCODER_LAYER_LISTS and len(m) > 1:
            return list(m)
    return []


@contextlib.contextmanager
def differentiable_modules(model, encoders, gradient_checkpointing: bool = False, text_patcher=None):
    """Make the shared MODEL and the given text encoders usable for backward, then undo it.

    Must run inside ``torch.inference_mode(False)``. The cloned weights stay (same
    values), so the objects keep sampling as before, LoRA patches included; weights ComfyUI
    pinned (the MODEL's, and ``text_patcher``'s: the CLIP patcher that holds the encoders) stay pinned.
    """
    hooks, wrapped, lean = [], [], []
    try:
        memory.keeping_pins(model, lambda: clone_to_normal(model.model))
        memory.keeping_pins(text_patcher, lambda: [clone_to_normal(encoder) for encoder in encoders])
        lean += _lean_cast_layers(model.model)
        net = model.model.diffusion_model
        _check_context_processor(net)
        if not hasattr(net, "input_blocks"):
            # ComfyUI's DiT blocks (Flux, Chroma, SD3, ...) add residuals in place into tensors their
            # norms saved for backward (img += gate * attn(norm1(img))); the norms get a copy.
            for m in net.modules():
                if _is_norm(m):
                    hooks.append(m.register_forward_pre_hook(_clone_input))
        for encoder in encoders:
            lean += _lean_cast_layers(encoder)
            for name, m in encoder.named_modules():
                # CLIP (layer_norm1/2) and T5 (layer_norm in its attention and feed-forward layers)
                # add residuals in place after these norms saved their input.
                if name.rsplit(".", 1)[-1] in RESIDUAL_NORMS:
                    hooks.append(m.register_forward_pre_hook(_clone_input))
            # (only the text encoders: the mode sees every op, and ComfyUI's DiTs use no out=)
            encoder.forward = functools.partial(_fresh_outputs, encoder.forward)
            wrapped.append(encoder)
        if gradient_checkpointing:
            for layer in checkpoint_units(model.model.diffusion_model):
                layer.forward = functools.partial(_checkpointed, layer.forward)
                wrapped.append(layer)
            # Language-model encoders (Gemma-2, Qwen3, T5-XXL) keep more activations for backward
            # than a small DiT: their layers are recomputed too.
            for encoder in encoders:
                for layer in encoder_checkpoint_units(encoder):
                    layer.forward = functools.partial(_checkpointed_encoder_layer, layer.forward)
                    wrapped.append(layer)
        with memory.training_flag(True):
            yield
    finally:
        for h in hooks:
            h.remove()
        for layer in wrapped:
            del layer.forward
        for m in lean:
            m.__dict__.pop("forward_comfy_cast_weights", None)
            m.__dict__.pop("forward", None)


def differentiable(model, clip, gradient_checkpointing: bool = False):
    """``differentiable_modules`` for the MODEL and every text encoder of the CLIP."""
    return differentiable_modules(model, [encoder for _, _, encoder in text_encoders(clip).values()], gradient_checkpointing,
                                  text_patcher=clip.patcher)
