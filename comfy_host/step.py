"""One diffusion training step for any family: conditioning from the model's own ``extra_conds``,
noise from its ``model_sampling``, the loss in its own output space."""

from __future__ import annotations

import math

import torch

from comfy.model_sampling import ModelSamplingDiscrete

from ..dti_core.training import step_generator
from . import kernels, memory
from .autograd import training_transformer_options
from .latents import TrainingLatents
from .text import PromptTokens, TextPath, text_encoders


def model_conds(model, cond, pooled, noise, resolution: tuple[int, int], device, guidance=None,
                original=None, crop=(0, 0), **extra) -> dict:
    """The keyword arguments ``apply_model`` gets for this conditioning, built by the model itself
    (``extra_conds``, as ComfyUI's sampler does in ``encode_model_conds``): SDXL's pooled ``y`` with
    size micro-conditioning (``original`` (h, w) of the photo, ``crop`` (top, left) in px, target =
    ``resolution``), Flux's guidance, attention masks."""
    height, width = resolution
    oh, ow = original if original is not None else (height, width)
    params = dict(cross_attn=cond, pooled_output=pooled, device=device, noise=noise, width=ow, height=oh,
                  crop_w=crop[1], crop_h=crop[0], target_width=width, target_height=height)
    if guidance is not None:
        params["guidance"] = guidance
    params.update(extra)  # what CLIPTextEncode's conditioning carries besides the tensor (attention_mask)
    out = model.model.extra_conds(**params)
    b = noise.shape[0]
    return {k: c.process_cond(batch_size=b, device=device, area=None).cond for k, c in out.items()}


def _cat_conds(parts: list[dict]) -> dict:
    """Per-sample ``model_conds`` joined into one batch (tensors concatenated, constants shared)."""
    out = {}
    for k, v in parts[0].items():
        out[k] = torch.cat([p[k] for p in parts]) if torch.is_tensor(v) else v
    return out


class DiffusionStep:
    """``step_fn`` for ``dti_core.training.train``: one batch of the noise-prediction loss.

    The loss is the mean squared error in the model's own output space, whatever
    its parameterisation: ``model_sampling.calculate_denoised`` is affine in the
    model output with slope ``b(sigma)``, so ``(x0_pred - x0) / b`` is the output
    error. For eps models this is exactly ``||eps_pred - eps||^2`` (the paper's
    loss), for v-prediction the v error, for flow models the velocity error.
    Reduction: element-wise mean over the batch, as the reference does, so kappa
    keeps its meaning. Conditioning comes from the model's own ``extra_conds``.
    """

    def __init__(self, model, clip, prompts: list[PromptTokens], latents, flipped, batch_size: int,
                 seed: int, resolution: int, device, *, guidance: float | None = None,
                 per_image_prompts: bool = False, text_mask: bool = False):
        self.model, self.clip, self.prompts = model, clip, prompts
        self.device = device
        # A TrainingLatents (posterior mean/std, original size) from encode_latents, a list of them
        # (one per bucket) from encode_buckets, or plain latents (the mode; no posterior sampling, no
        # micro-conditioning from the photo's size).
        if isinstance(latents, (list, tuple)):
            groups = list(latents)
        else:
            groups = [latents if isinstance(latents, TrainingLatents) else TrainingLatents(latents, None, flipped, None)]
        self.buckets = [_Bucket(tl, resolution, device) for tl in groups]
        self.bucket_weights = torch.tensor([float(len(bk.mean)) for bk in self.buckets])
        self.masked = any(bk.mask is not None for bk in self.buckets)
        # captions: prompt k belongs to image k
        self.per_image_prompts = per_image_prompts
        self.batch_size, self.seed, self.resolution = batch_size, seed, resolution
        self.guidance = guidance
        self.text_mask = text_mask
        self.encoders = text_encoders(clip)
        # get_model_object sees object patches (e.g. ModelSamplingDiscrete v_prediction) too.
        ms = model.get_model_object("model_sampling")
        self.ms = ms
        self.t_min = float(ms.timestep(ms.sigma_min))
        self.t_max = float(ms.timestep(ms.sigma_max))
        # Discrete-time models (SD1.x/SD2.x/SDXL, eps or v) train at integer DDPM timesteps drawn
        # uniformly from the table, as the paper's code does: the noise level and the timestep the
        # UNet sees are the same table entry. Flow models keep their continuous schedule.
        self.table = ms.sigmas.detach().float().clone() if isinstance(ms, ModelSamplingDiscrete) else None
        # Differentiable attention for these calls only, whatever backend the launch flags chose.
        self.transformer_options = training_transformer_options(model)
        # Models that condition on the pooled text (SDXL's y, Flux's vector) get it; others don't
        # need the encoder to compute it.
        first = self.buckets[0]
        self.uses_pooled = _needs_pooled(model, tuple(first.mean[0].shape[:-2]) + tuple(first.crop))
        self._text = None
        # Elements the loss averages over (the first bucket's batch): its per-element gradients are
        # about 1/elements, under fp16's normal range at a real resolution (loss_scale below).
        self._elements = batch_size * int(torch.Size(tuple(first.mean[0].shape[:-2]) + tuple(first.crop)).numel())

    @property
    def loss_scale(self) -> float:
        """The static factor ``train`` multiplies the loss by before backward (and divides out of the
        vectors' fp32 gradients before the optimizer): 1 unless the diffusion model or a text encoder
        computes in fp16 (ComfyUI on NVIDIA for SD1.5/SDXL), where the mean's 1/elements gradients
        underflow (a third of the text conditioning's gradient entries were zero in a CPU emulation).
        A power of two near the element count, so the backward carries sum-sized gradients and the
        division is exact; ``train`` lowers it if a step's gradient overflows. Known after the first
        step (the encoders' compute dtype is seen in the text path's probe)."""
        dtypes = {compute_dtype(self.model)} | (self._text.compute_dtypes if self._text is not None else set())
        if torch.float16 not in dtypes:
            return 1.0
        return float(2 ** math.ceil(math.log2(max(self._elements, 1))))

    def first_step_check(self, embeds: dict[str, torch.Tensor], learned):
        """For ``train``'s ``first_step_check``: a first step whose backward gave every ``learned``
        encoder's vectors a finite, non-zero gradient shows each encoder's backward works, and costs
        nothing more. Otherwise (an error in that step, or a missing, non-finite or zero gradient)
        ``check_backward`` with ``embeds`` (the vectors the run starts from) says which encoder and op
        are at fault, as one clear error; if the encoders pass it, the step's own error stands."""
        def check(grads: dict[str, torch.Tensor | None], error: BaseException | None) -> None:
            if error is not None and memory.is_oom(error):
                return
            if error is None and all(kernels.gradient_problem(grads.get(k)) is None for k in learned):
                return
            self.check_backward(embeds, learned)
        return check

    def check_backward(self, embeds: dict[str, torch.Tensor], learned) -> None:
        """``kernels.check_text_backward`` for this run's first prompt with ``embeds`` (every encoder's
        vectors) in the word's place, for the ``learned`` encoders."""
        kernels.check_text_backward(
            self.clip, self.prompts[0], {tkey: embeds[key] for key, (tkey, _, _) in self.encoders.items()},
            [self.encoders[k][0] for k in learned], {tkey: key for key, (tkey, _, _) in self.encoders.items()})

    def _text_path(self, by_token_key):
        if self._text is None:
            self._text = TextPath(self.clip, self.prompts, by_token_key, self.uses_pooled, self.batch_size)
        return self._text

    def __call__(self, embeds: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        g = step_generator(self.seed, step)
        # One bucket per step, chosen in proportion to its images: every image is drawn equally often.
        k = int(torch.multinomial(self.bucket_weights, 1, generator=g)) if len(self.buckets) > 1 else 0
        bk = self.buckets[k]
        n, b = len(bk.mean), self.batch_size
        idx = torch.randint(n, (b,), generator=g)
        flip = torch.rand(b, generator=g) < 0.5
        which = torch.randint(len(self.prompts), (b,), generator=g)
        u = torch.rand(b, generator=g, dtype=torch.float64)
        ch, cw = bk.crop
        # (C, h, w) latents, or (C, T, h, w) for video models trained on still images (Wan: T = 1)
        noise = torch.randn((b,) + tuple(bk.mean[0].shape[:-2]) + (ch, cw), generator=g).to(self.device)
        # A fresh random crop corner per sample, within that image's margin (latent units).
        ru = torch.rand(b, generator=g, dtype=torch.float64)
        rv = torch.rand(b, generator=g, dtype=torch.float64)
        eps = torch.randn(noise.shape, generator=g).to(self.device) if bk.std is not None else None
        if self.per_image_prompts:
            which = torch.tensor([bk.index[int(i)] for i in idx])

        x0, weights, crops, originals = [], [], [], []
        for i in range(b):
            j = int(idx[i])
            mirrored = bk.flipped is not None and bool(flip[i])
            mean, std = (bk.flipped[j], bk.flipped_std) if mirrored else (bk.mean[j], bk.std)
            lh, lw = mean.shape[-2:]
            top, left = int(ru[i] * (lh - ch + 1)), int(rv[i] * (lw - cw + 1))
            window = (Ellipsis, slice(top, top + ch), slice(left, left + cw))
            sample = mean[window]
            if eps is not None and std is not None:
                sample = sample + std[j][window] * eps[i]  # a fresh posterior sample, as the paper's code draws
            x0.append(sample)
            if self.masked:
                m = bk.flipped_mask[j] if mirrored else bk.mask[j]
                weights.append(m[window])
            crops.append((bk.down * top, bk.down * left))
            originals.append(bk.original_size[j])
        x0 = torch.stack(x0)
        weight = torch.stack(weights) if self.masked else None
        if weight is not None and x0.dim() == 5:
            weight = weight.unsqueeze(2)  # (b, 1, h, w) -> (b, 1, 1, h, w): every frame

        by_token_key = {tkey: embeds[key] for key, (tkey, _, _) in self.encoders.items()}
        text = self._text_path({k: v.detach() for k, v in by_token_key.items()})
        cond, pooled = text([self.prompts[int(i)].with_vectors(by_token_key) for i in which])

        if self.table is not None:
            index = (u * len(self.table)).floor().long().clamp(max=len(self.table) - 1)
            sigma = self.table[index].to(self.device)
        else:
            timestep = (self.t_min + u * (self.t_max - self.t_min)).float()
            sigma = self.ms.sigma(timestep).to(self.device)
        x_t = self.ms.noise_scaling(sigma, noise, x0)
        h, w = bk.down * ch, bk.down * cw  # SDXL's target size: the bucket
        if torch.is_tensor(cond):
            groups = [(list(range(b)), cond)]
        else:
            # Prompts of different lengths (unpadded T5) are run apart, as ComfyUI's sampler batches
            # only conds of equal shape.
            by_len: dict[int, list[int]] = {}
            for i, c in enumerate(cond):
                by_len.setdefault(c.shape[1], []).append(i)
            groups = [(rows, torch.cat([cond[i] for i in rows])) for rows in by_len.values()]
        total = None
        for rows, c in groups:
            r = torch.tensor(rows, device=self.device)
            p = pooled[rows].to(self.device) if pooled is not None else None
            c = c.to(self.device)
            extra = {}
            if self.text_mask:
                # The mask CLIPTextEncode hands the sampler for one unpadded prompt: all ones, one row
                # (extra_conds turns its sum into Lumina 2's num_tokens, so never a batch of rows).
                extra["attention_mask"] = torch.ones(1, c.shape[1], dtype=torch.long)
            if all(originals[i] is None and crops[i] == (0, 0) for i in rows):
                kwargs = model_conds(self.model, c, p, noise[r], (h, w), self.device, self.guidance, **extra)
            else:
                # SDXL's micro-conditioning: the photo's real size and this sample's crop corner.
                kwargs = _cat_conds([model_conds(self.model, c[j:j + 1], None if p is None else p[j:j + 1],
                                                 noise[i:i + 1], (h, w), self.device, self.guidance,
                                                 original=originals[i], crop=crops[i], **extra)
                                     for j, i in enumerate(rows)])
            x0_pred = self.model.model.apply_model(x_t[r], sigma[r], transformer_options=self.transformer_options,
                                                   **kwargs).float()
            # d(x0_pred)/d(model output) per sample; (b, 1, 1, 1) broadcasts, no latent-sized tensors.
            unit = torch.ones((len(rows),) + (1,) * (x0_pred.dim() - 1), device=x0_pred.device)
            slope = self.ms.calculate_denoised(sigma[r], unit, torch.zeros_like(unit))
            err = ((x0_pred - x0[r]) / slope) ** 2
            part = (err * weight[r]).sum() if weight is not None else err.sum()
            total = part if total is None else total + part
        if weight is None:
            return total / x0.numel()  # element-wise mean over the batch, as the reference
        # Masked: the weighted mean over the subject's latent cells (and all channels, frames) of the batch.
        per_cell = x0.numel() // (x0.shape[0] * x0.shape[-2] * x0.shape[-1])
        return total / (weight.sum() * per_cell).clamp(min=1e-8)


class _Bucket:
    """One bucket's cached latents as per-image tensors on the device, and its crop size."""

    def __init__(self, tl: TrainingLatents, resolution: int, device):
        def per_image(v):
            if v is None:
                return None
            return [t[0].to(device) for t in v] if isinstance(v, list) else list(v.to(device))
        self.mean, self.std = per_image(tl.mean), per_image(tl.std)
        self.flipped, self.flipped_std = per_image(tl.flipped_mean), per_image(tl.flipped_std)
        self.mask = per_image(tl.mask)
        self.flipped_mask = [m.flip(-1) for m in self.mask] if self.mask is not None and self.flipped is not None else None
        n = len(self.mean)
        orig = tl.original_size
        self.original_size = list(orig) if isinstance(orig, list) else [orig] * n
        self.index = list(tl.index) if tl.index is not None else list(range(n))
        self.down = tl.downscale
        if tl.crop is not None:
            self.crop = tuple(tl.crop)
        else:
            lh = min(t.shape[-2] for t in self.mean)
            lw = min(t.shape[-1] for t in self.mean)
            self.crop = (min(lh, max(1, resolution // self.down)), min(lw, max(1, resolution // self.down)))


def compute_dtype(model) -> torch.dtype:
    """The dtype the diffusion model computes in: ComfyUI's manual cast where it set one (fp8 or fp16
    weights on a device that computes them in another dtype), else its weights' dtype."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()


def _needs_pooled(model, latent_shape: tuple) -> bool:
    """Whether the model's conditioning reads the pooled text output (SDXL ``y``, Flux's vector)."""
    marker = torch.full((1, 1), 1234.5)
    try:
        out = model.model.extra_conds(pooled_output=marker, cross_attn=None, device="cpu",
                                      noise=torch.zeros(1, *latent_shape), width=64, height=64)
    except (KeyError, TypeError, AttributeError, RuntimeError):
        return True  # it read pooled_output and could not use a placeholder: it needs it
    return any(torch.is_tensor(c.cond) and bool((c.cond == 1234.5).any()) for c in out.values()
               if hasattr(c, "cond"))
