"""ComfyUI after 0.33, emulated on 0.33.0 (no newer tree runs here; ``../shared/docs/current-comfyui.md``).
Loaded by ``conftest.py`` as ``tests_host_newer_host``.

From about 0.36 (core 6cff1e97, PR 16326; 9b572343, PR 16351), ``comfy/text_encoders/llama.py``'s
``apply_rope`` builds a per-pair 2x2 rotation matrix from the same cos/sin tables 0.33's torch code
uses and calls ``comfy_kitchen.apply_rope_split_half(xq, xk, matrix)``: a custom op with no autograd
formula, in every layer of Gemma-2, Qwen3 and Qwen2.5-VL. ``kitchen_rope`` puts that ``apply_rope``
in place for a test (``op`` another op of the same convention, e.g. one without any backward).
"""

from __future__ import annotations

import contextlib

import torch


def rotation_matrices(freqs_cis):
    """0.33's ``(cos, sin, -sin)`` tables as the newer host's ``(..., D/2, 2, 2)`` matrices:
    ``y[i] = m00 x[i] + m01 x[i + D/2]``, ``y[i + D/2] = m10 x[i] + m11 x[i + D/2]``."""
    cos, sin, nsin = freqs_cis[0], freqs_cis[1], freqs_cis[2]
    half = cos.shape[-1] // 2
    top = torch.stack([cos[..., :half], nsin], dim=-1)
    bottom = torch.stack([sin, cos[..., half:]], dim=-1)
    return torch.stack([top, bottom], dim=-2)


@contextlib.contextmanager
def kitchen_rope(monkeypatch, op=None):
    """``llama.apply_rope`` as the newer hosts have it: the kitchen op (or ``op``) on the matrices."""
    import comfy.text_encoders.llama as llama

    if op is None:
        import comfy_kitchen
        op = comfy_kitchen.apply_rope_split_half

    def apply_rope(xq, xk, freqs_cis):
        return op(xq, xk, rotation_matrices(freqs_cis).to(xq.device))

    original = llama.apply_rope
    monkeypatch.setattr(llama, "apply_rope", apply_rope)
    try:
        yield apply_rope
    finally:
        monkeypatch.setattr(llama, "apply_rope", original)


def no_backward_rope_op():
    """A ``torch.library`` custom op with the kitchen RoPE's forward and no autograd formula, that no
    stand-in knows: what a future host kernel without a backward looks like."""
    name = "dti_test::rope_without_backward"
    try:
        return torch.ops.dti_test.rope_without_backward
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op(name, mutates_args=())
    def rope(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def one(t):
            t_ = t.reshape(*t.shape[:-1], 2, -1).movedim(-2, -1).unsqueeze(-2).to(freqs.dtype)
            out = freqs[..., 0] * t_[..., 0] + freqs[..., 1] * t_[..., 1]
            return out.movedim(-1, -2).reshape(*t.shape).type_as(t)
        return one(xq), one(xk)

    @rope.register_fake
    def _(xq, xk, freqs):
        return torch.empty_like(xq), torch.empty_like(xk)

    return torch.ops.dti_test.rope_without_backward
