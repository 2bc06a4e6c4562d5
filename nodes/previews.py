"""Previews while training: one small image rendered with the current vectors through ComfyUI's sampler.

The learned vectors reach the text encoder exactly as in training (and as ``embedding:NAME`` does
at inference): the prompt is tokenized by ComfyUI's own tokenizer with a placeholder word whose
token slots then receive the current vectors (``comfy_training.tokenize_templates``), and
``clip.encode_from_tokens`` encodes it as CLIPTextEncode does. Sampling is ``comfy.sample.sample``
(the path of KSampler's ``common_ksampler``) with its own seeded noise; the global RNG state is
saved and restored around it, and training draws only from its per-step generators, so a run with
previews learns exactly what a run without them learns.
"""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.sample

from . import comfy_training as ct

SAMPLER, SCHEDULER = "euler", "simple"
MAX_SIZE = 512  # previews are at most this many pixels on a side (the training resolution if smaller)


def check_prompt(prompt: str) -> str:
    """The preview prompt, refused when it has no ``{}`` for the word being trained."""
    if not isinstance(prompt, str) or "{}" not in prompt:
        raise ValueError(f"preview_prompt must contain {{}} where the word being trained goes, "
                         f"e.g. 'a photo of {{}}'; got {prompt!r}")
    return prompt


def preview_size(resolution: int) -> int:
    return max(64, min(int(resolution), MAX_SIZE) // 8 * 8)


def render(model, clip, vae, vectors: dict[str, torch.Tensor], prompt: str, seed: int, size: int,
           steps: int, cfg: float = 4.0, guidance: float | None = None, prefix: str = "") -> torch.Tensor:
    """An IMAGE ``(1, size, size, 3)`` of ``prefix + prompt`` with ``{}`` standing for ``vectors``
    (``{embedding_key: (n, width)}``, the saved ``m* . v`` rows of every encoder). ``prefix``: what the
    family's own encode node puts before every prompt (Lumina 2's system prompt)."""
    check_prompt(prompt)
    counts = {k: int(v.shape[0]) for k, v in vectors.items()}
    encoders = ct.text_encoders(clip)
    missing = set(encoders) - set(vectors)
    if missing:
        raise ValueError(f"preview: no vectors for {', '.join(sorted(missing))}")
    (tokens,) = ct.tokenize_templates(clip, [prefix + prompt], counts)
    with torch.random.fork_rng(devices=_rng_devices()), torch.no_grad():
        by_token_key = {tkey: vectors[key].detach().float() for key, (tkey, _, _) in encoders.items()}
        positive = _conditioning(clip, tokens.with_vectors(by_token_key), guidance)
        negative = _conditioning(clip, clip.tokenize(prefix), guidance)
        latent = torch.zeros((1, 4, size // 8, size // 8))
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, int(seed))  # seeds the global RNG: fork_rng restores it
        samples = comfy.sample.sample(model, noise, int(steps), float(cfg), SAMPLER, SCHEDULER, positive, negative,
                                      latent, denoise=1.0, disable_pbar=True, seed=int(seed))
        images = vae.decode(samples)
    if images.dim() == 5:  # video VAEs: (B, T, H, W, C)
        images = images.reshape(-1, *images.shape[-3:])
    return images[:1].float().clamp(0.0, 1.0).cpu().contiguous()


def _conditioning(clip, tokens, guidance):
    # CLIPTextEncode's own call: the conditioning keeps every extra the encoder returns (pooled
    # output, Lumina 2's attention mask, ...); FluxGuidance's key on top.
    return clip.encode_from_tokens_scheduled(tokens, add_dict={} if guidance is None else {"guidance": float(guidance)},
                                             show_pbar=False)


def _rng_devices() -> list:
    device = mm.get_torch_device()
    return [device] if getattr(device, "type", "cpu") == "cuda" else []


def to_pil(image: torch.Tensor):
    """The first image of an IMAGE batch as a PIL image (what ComfyUI's preview messages carry)."""
    from PIL import Image

    array = (image[0].detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype("uint8")
    return Image.fromarray(array)


def blank(size: int = 64) -> torch.Tensor:
    """The ``preview`` output of a run without previews: one black image."""
    return torch.zeros((1, size, size, 3))
