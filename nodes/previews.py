"""Previews while training: one small image rendered with the current vectors through ComfyUI's sampler.

The learned vectors reach the text encoder exactly as in training (and as ``embedding:NAME`` does
at inference): the prompt is tokenized by ComfyUI's own tokenizer with a placeholder word whose
token slots then receive the current vectors (``comfy_host.text.tokenize_templates``), encoded as
CLIPTextEncode does and sampled by ``comfy_host.sampling.render`` without touching training's
random streams.
"""

from __future__ import annotations

import torch

from ..comfy_host import sampling

MAX_SIZE = 512  # previews are at most this many pixels on a side (the training resolution if smaller)


def check_prompt(prompt: str) -> str:
    """The preview prompt, refused when it has no ``{}`` for the word being trained."""
    if not isinstance(prompt, str) or "{}" not in prompt:
        raise ValueError(f"preview_prompt must contain {{}} where the word being trained goes, "
                         f"e.g. 'a photo of {{}}'; got {prompt!r}")
    return prompt


def preview_size(resolution: int) -> int:
    return max(64, min(int(resolution), MAX_SIZE) // 8 * 8)


def to_pil(image: torch.Tensor):
    """The first image of an IMAGE batch as a PIL image (what ComfyUI's preview messages carry)."""
    from PIL import Image

    array = (image[0].detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype("uint8")
    return Image.fromarray(array)


def blank(size: int = 64) -> torch.Tensor:
    """The ``preview`` output of a run without previews: one black image."""
    return torch.zeros((1, size, size, 3))


def render(model, clip, vae, vectors: dict[str, torch.Tensor], prompt: str, seed: int, size: int,
           steps: int, cfg: float = 4.0, guidance: float | None = None, prefix: str = "") -> torch.Tensor:
    """An IMAGE ``(1, size, size, 3)`` of ``prefix + prompt`` with ``{}`` standing for ``vectors``
    (see ``comfy_host.sampling.render``)."""
    check_prompt(prompt)
    return sampling.render(model, clip, vae, vectors, prompt, seed, size, steps, cfg=cfg, guidance=guidance,
                           prefix=prefix)
