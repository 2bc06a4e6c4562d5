"""Sampling a preview: one small image of a prompt with the current vectors, through ComfyUI's sampler.

Sampling is ``comfy.sample.sample`` (the path of KSampler's ``common_ksampler``) with its own
seeded noise; the global RNG state is saved and restored around it, and training draws only from
its per-step generators, so a run with previews learns exactly what a run without them learns.
"""

from __future__ import annotations

import torch

import comfy.sample

from . import memory
from .latents import vae_downscale
from .text import encode_conditioning, text_encoders, tokenize_templates

SAMPLER, SCHEDULER = "euler", "simple"


def render(model, clip, vae, vectors: dict[str, torch.Tensor], prompt: str, seed: int, size: int,
           steps: int, cfg: float = 4.0, guidance: float | None = None, prefix: str = "") -> torch.Tensor:
    """An IMAGE ``(1, size, size, 3)`` of ``prefix + prompt`` with ``{}`` standing for ``vectors``
    (``{embedding_key: (n, width)}``, the saved ``m* . v`` rows of every encoder). ``prefix``: what the
    family's own encode node puts before every prompt (Lumina 2's system prompt)."""
    if "{}" not in prompt:
        raise ValueError(f"the preview prompt has no {{}} for the word: {prompt!r}")
    counts = {k: int(v.shape[0]) for k, v in vectors.items()}
    encoders = text_encoders(clip)
    missing = set(encoders) - set(vectors)
    if missing:
        raise ValueError(f"preview: no vectors for {', '.join(sorted(missing))}")
    (tokens,) = tokenize_templates(clip, [prefix + prompt], counts)
    # (a preview inside a run samples as KSampler does: with ComfyUI's training flag clear)
    with torch.random.fork_rng(devices=memory.rng_devices()), torch.no_grad(), memory.training_flag(False):
        by_token_key = {tkey: vectors[key].detach().float() for key, (tkey, _, _) in encoders.items()}
        positive = encode_conditioning(clip, tokens.with_vectors(by_token_key), guidance)
        negative = encode_conditioning(clip, clip.tokenize(prefix), guidance)
        down = vae_downscale(vae)  # (the latent grid training uses: 16 px per cell for FLUX.2, 8 for most)
        latent = torch.zeros((1, 4, max(1, size // down), max(1, size // down)))
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, int(seed))  # seeds the global RNG: fork_rng restores it
        samples = comfy.sample.sample(model, noise, int(steps), float(cfg), SAMPLER, SCHEDULER, positive, negative,
                                      latent, denoise=1.0, disable_pbar=True, seed=int(seed))
        images = vae.decode(samples)
    if images.dim() == 5:  # video VAEs: (B, T, H, W, C)
        images = images.reshape(-1, *images.shape[-3:])
    return images[:1].float().clamp(0.0, 1.0).cpu().contiguous()
