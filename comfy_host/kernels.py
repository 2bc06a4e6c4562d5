"""Host kernels without a backward on the training path: stand-ins for the run, and the check that
every learned row gets a gradient.

ComfyUI's comfy-kitchen kernels are written for inference: ``torch.library`` custom ops with a
forward and no autograd formula. ComfyUI gates its own fused DiT kernels behind ``in_training``
(see ``memory.training_flag``), but nothing in ComfyUI trains a text encoder, so nothing gates
theirs: from about 0.36, ``comfy/text_encoders/llama.py``'s ``apply_rope`` calls
``comfy_kitchen.apply_rope_split_half`` in every layer of Gemma-2, Qwen3 and Qwen2.5-VL (Lumina 2,
Z-Image, FLUX.2 klein, Qwen-Image), and a backward through it raises.

Why a stand-in op with a backward, and not a differentiable RoPE swapped into ``llama.py``: it works
wherever the op is called, whatever the host's ``apply_rope`` looks like around it (0.36+ source is
not runnable here); its forward is the host's own kernel, so the values are the ones sampling gets;
its backward is the same kernel on the transposed rotation (RoPE rotates each pair by a 2x2 matrix,
whose inverse is its transpose), as fast as the forward. It acts only inside the training forward
(a torch-function mode entered around each text encoder's forward by ``autograd.py``), only when
an input requires grad, and only for ops whose own backward is missing (probed once); nothing is
registered in torch or the host, so sampling, previews and the host after a run are as they were.
"""

from __future__ import annotations

import functools
import re

import torch

from .contracts import HostContractError

# "Trying to backward through comfy_kitchen.apply_rope_split_half.default but no autograd formula was
# registered" (torch.library custom ops); "derivative for ... is not implemented" (aten-style).
_NO_BACKWARD = re.compile(r"backward through (?P<op>[\w.:]+) but no autograd formula|"
                          r"derivative for (?P<op2>[\w.:]+) is not implemented")


def op_without_backward(error: BaseException) -> str | None:
    """The op named by torch's "no backward" error, or None for any other error."""
    m = _NO_BACKWARD.search(str(error))
    return (m.group("op") or m.group("op2")) if m else None


class _RopeSplitHalf(torch.autograd.Function):
    """``comfy_kitchen::apply_rope_split_half`` with its backward: per pair (i, i + D/2) of the head
    dim, ``y = M x`` with ``M`` the 2x2 matrix in ``freqs[..., i, :, :]``; so ``dx = M^T dy``, which
    is the op itself on the transposed matrices. The tables get no gradient (they are constants)."""

    @staticmethod
    def forward(ctx, op, xq, xk, freqs):
        ctx.op = op
        ctx.save_for_backward(freqs)
        return op(xq, xk, freqs)

    @staticmethod
    def backward(ctx, gq, gk):
        (freqs,) = ctx.saved_tensors
        q_needed, k_needed = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        gq = torch.zeros_like(gk) if gq is None else gq
        gk = torch.zeros_like(gq) if gk is None else gk
        dq, dk = ctx.op(gq.contiguous(), gk.contiguous(), freqs.transpose(-1, -2).contiguous())
        return None, dq if q_needed else None, dk if k_needed else None, None


def _rope_split_half(op, xq, xk, freqs):
    return _RopeSplitHalf.apply(op, xq, xk, freqs)


# op name (as torch names the packet) -> a differentiable call of it
STAND_INS = {"comfy_kitchen.apply_rope_split_half": _rope_split_half}


def _probe_rope_split_half(op) -> None:
    x = torch.randn(1, 1, 2, 4, requires_grad=True)
    ang = torch.randn(1, 1, 2, 2)
    c, s = ang.cos(), ang.sin()
    m = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    q, k = op(x, x, m)
    (q.sum() + k.sum()).backward()


_PROBES = {"comfy_kitchen.apply_rope_split_half": _probe_rope_split_half}


@functools.cache
def _has_backward(name: str, op) -> bool:
    """Whether the host's op differentiates on its own (a later comfy-kitchen may add a formula)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            _PROBES[name](op)
    except RuntimeError as e:
        if op_without_backward(e):
            return False
        raise
    return True


def _op_name(func) -> str:
    packet = getattr(func, "overloadpacket", func)  # an OpOverload names its packet
    return str(packet)


def stand_in_for(func):
    """The differentiable stand-in for a host op (one of ``OP_TYPES``) that has no backward, or None.
    For a torch-function mode of the training forward, on calls whose inputs require grad."""
    name = _op_name(func)
    fn = STAND_INS.get(name)
    if fn is None or _has_backward(name, func):
        return None
    return functools.partial(fn, func)


# what a host kernel is, as a torch-function mode sees it (``torch.ops.ns.op`` and its overloads)
OP_TYPES = (torch._ops.OpOverloadPacket, torch._ops.OpOverload)


# ---------------------------------------------------------------------------------------------
# the run-time check
# ---------------------------------------------------------------------------------------------

def check_text_backward(clip, prompt, vectors_by_token_key: dict[str, torch.Tensor], learned: list[str],
                        names_by_token_key: dict[str, str]) -> None:
    """One encode of ``prompt`` (``vectors_by_token_key``: every encoder's rows in the word's place) and
    a backward per ``learned`` token key: the learned rows must get a finite, non-zero gradient. A host
    op without a backward (or any break of the gradient) is one ``HostContractError`` naming the op, the
    encoder and the ComfyUI version. Run when a first training step went wrong (``DiffusionStep.
    first_step_check``), before the optimizer moved anything, so nothing is trained or written. Must run
    inside ``autograd.differentiable`` (what training runs under), with grad enabled.

    The encoders to check share one forward (a two- or three-encoder family would otherwise run every
    encoder once per learned one: SD3.5's T5-XXL three times); each gets its own backward, which
    reaches only its own graph, so a failure still names its encoder. A forward that fails is redone
    one encoder at a time, for the same reason."""
    try:
        leaves, total = _encode_for_check(clip, prompt, vectors_by_token_key, learned)
    except RuntimeError as e:
        if len(learned) == 1 or op_without_backward(e) is None:
            _raise_for(e, names_by_token_key[learned[0]])
        for tkey in learned:  # which encoder's forward it is
            check_text_backward(clip, prompt, vectors_by_token_key, [tkey], names_by_token_key)
        raise
    for i, tkey in enumerate(learned):
        name = names_by_token_key[tkey]
        grad = None  # (an output cut from every learned row has no graph at all)
        if total.requires_grad:
            try:
                (grad,) = torch.autograd.grad(total, [leaves[tkey]], retain_graph=i < len(learned) - 1, allow_unused=True)
            except RuntimeError as e:
                _raise_for(e, name)
        what = gradient_problem(grad)
        if what is not None:
            raise HostContractError(f"the {name} text encoder", "a finite, non-zero gradient at the learned rows",
                                    what)


def gradient_problem(grad: torch.Tensor | None) -> str | None:
    """What keeps ``grad`` (a learned row's gradient) from showing a working backward, or None: it
    must be there, finite and not all zero."""
    if grad is None:
        return "no gradient"
    if not bool(torch.isfinite(grad).all()):
        return "a non-finite gradient"
    if not bool(grad.abs().sum() > 0):
        return "an all-zero gradient"
    return None


def _encode_for_check(clip, prompt, vectors_by_token_key, keys):
    from .text import encode_token_batch

    leaves = {k: (v.detach().clone().requires_grad_(True) if k in keys else v.detach())
              for k, v in vectors_by_token_key.items()}
    cond, pooled = encode_token_batch(clip, [prompt.with_vectors(leaves)], want_pooled=True)
    total = cond.float().square().mean() if torch.is_tensor(cond) else sum(c.float().square().mean() for c in cond)
    if pooled is not None:
        total = total + pooled.float().square().mean()
    return leaves, total


def _raise_for(error: RuntimeError, name: str):
    op = op_without_backward(error)
    if op is None:
        raise error
    raise HostContractError(f"the {name} text encoder", "a backward through every op of its forward",
                            f"{op}, which has no backward (torch: {str(error).splitlines()[0]})") from None


def diffusion_error(error: BaseException) -> HostContractError | None:
    """A clear error for a diffusion-model op without a backward met at the first step, or None (also
    for the text encoders' own clear error, which stands as it is)."""
    if isinstance(error, HostContractError):
        return None
    op = op_without_backward(error)
    if op is None:
        return None
    return HostContractError("the diffusion model's training path", "a backward through every op of its forward",
                             f"{op}, which has no backward (torch: {str(error).splitlines()[0]})")
