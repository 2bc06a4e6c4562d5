"""Latents: each training image VAE-encoded once, its posterior moments in the model's latent space."""

from __future__ import annotations

import torch

from .images import TrainingImage, bucket_resize


def encode_buckets(vae, model, items: list[TrainingImage], resolution: int, hflip: bool) -> list["TrainingLatents"]:
    """Every image resized to its bucket and VAE-encoded once (posterior mean and std, mirrored too
    if ``hflip``), its mask averaged down to latent resolution; one ``TrainingLatents`` per bucket
    holding per-image tensors (images of one bucket may differ in size by the crop margin)."""
    any_mask = any(it.mask is not None for it in items)
    groups: dict[tuple[int, int], dict] = {}
    down = vae_downscale(vae)
    for k, it in enumerate(items):
        bucket, px, mask = bucket_resize(it, resolution, multiple=down)
        mean, std = _posterior_moments(vae, model, px)
        fmean, fstd = _posterior_moments(vae, model, px.flip(2)) if hflip else (None, None)
        lmask = None
        if any_mask:
            m = mask if mask is not None else torch.ones(px.shape[1:3])
            # the share of subject in each latent cell: the loss weight of that cell
            lmask = torch.nn.functional.adaptive_avg_pool2d(m[None, None].float(), tuple(mean.shape[-2:]))
            lmask = lmask.to(mean.device)
        g = groups.setdefault(bucket, dict(mean=[], std=[], fmean=[], fstd=[], mask=[], orig=[], index=[]))
        for key, v in (("mean", mean), ("std", std), ("fmean", fmean), ("fstd", fstd), ("mask", lmask)):
            g[key].append(v)
        g["orig"].append(tuple(int(x) for x in it.pixels.shape[:2]))
        g["index"].append(k)
    out = []
    for (bh, bw), g in groups.items():
        def lst(key):
            return None if any(v is None for v in g[key]) else g[key]
        out.append(TrainingLatents(g["mean"], lst("std"), lst("fmean"), lst("fstd"), original_size=g["orig"],
                                   mask=lst("mask"), crop=(bh // down, bw // down), index=g["index"],
                                   downscale=down))
    return out


def vae_downscale(vae) -> int:
    """Pixels per latent cell of this VAE: 8 for SD/SDXL/Flux.1, 16 for FLUX.2's patchified latents
    (the VAE's own ``spacial_compression_encode``, on both hosts)."""
    try:
        return max(1, int(vae.spacial_compression_encode()))
    except (AttributeError, TypeError, ValueError):
        return 8


class TrainingLatents:
    """The training images in the model's latent space: posterior mean and std (and the mirrored
    images'), cached once; each step samples ``mean + std * eps`` in a random crop, as the paper's
    code draws a fresh VAE posterior sample of a fresh random crop."""

    def __init__(self, mean, std, flipped_mean=None, flipped_std=None, original_size=None, *, mask=None,
                 crop=None, index=None, downscale=8):
        # One (B, C, h, w) tensor, or per image a list of (1, C, h_i, w_i) tensors (bucketed images).
        self.mean, self.std = mean, std
        self.flipped_mean, self.flipped_std = flipped_mean, flipped_std
        # (height, width) of the images before the resize: one for all, or a list, one per image
        self.original_size = original_size
        self.mask = mask  # subject weight per latent cell, (B or 1, 1, h, w) per image; None = all
        self.crop = crop  # the crop (latent units) each step trains; None = the training resolution
        self.index = index  # each image's position among all training images (binds its caption)
        self.downscale = downscale  # pixels per latent cell

    def cloned(self) -> "TrainingLatents":
        """A copy made of normal tensors (the VAE ran under ComfyUI's inference mode)."""
        def c(v):
            if v is None:
                return None
            return [t.clone() for t in v] if isinstance(v, list) else v.clone()
        return TrainingLatents(c(self.mean), c(self.std), c(self.flipped_mean), c(self.flipped_std),
                               self.original_size, mask=c(self.mask), crop=self.crop, index=self.index,
                               downscale=self.downscale)

    def count(self) -> int:
        return len(self.mean) if isinstance(self.mean, list) else int(self.mean.shape[0])


def _posterior_moments(vae, model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean, std)`` of the VAE posterior of each image, mapped into the model's latent space.

    The VAE's own encode runs (one image at a time: its activations dominate the run's peak memory
    otherwise); its posterior's moments are read where ComfyUI takes the mode. ``std`` is None for
    VAEs without a Gaussian posterior (or a tiled fallback encode): then the mode is used.
    """
    reg = getattr(getattr(vae, "first_stage_model", None), "regularization", None)
    means, stds = [], []
    for i in range(pixels.shape[0]):
        seen = []
        hook = reg.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if reg is not None else None
        try:
            mode = vae.encode(pixels[i:i + 1]).float()
        finally:
            if hook is not None:
                hook.remove()
        std = None
        if type(reg).__name__ == "DiagonalGaussianRegularizer" and len(seen) == 1:
            m, logvar = seen[0].float().to(mode.device).chunk(2, dim=1)
            if m.shape == mode.shape:
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        # process_latent_in is affine per channel (scale, shift): map the std with its slope.
        zero = model.model.process_latent_in(torch.zeros_like(mode)).float()
        slope = model.model.process_latent_in(torch.ones_like(mode)).float() - zero
        means.append(model.model.process_latent_in(mode).float())
        stds.append(None if std is None else (slope.abs() * std))
    std = None if any(x is None for x in stds) else torch.cat(stds)
    return torch.cat(means), std


def encode_latents(vae, model, images: torch.Tensor, hflip: bool, original_size=None) -> TrainingLatents:
    """VAE-encode every training image once (and its mirror image): posterior mean and std."""
    mean, std = _posterior_moments(vae, model, images)
    fmean, fstd = _posterior_moments(vae, model, images.flip(2)) if hflip else (None, None)
    return TrainingLatents(mean, std, fmean, fstd, original_size, downscale=vae_downscale(vae))
