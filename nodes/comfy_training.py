"""ComfyUI glue for training: the text path CLIPTextEncode uses, and one diffusion step.

Everything here translates ComfyUI objects (MODEL, CLIP, VAE) into what
``dti_core.training.train`` needs: the initial vectors, the prior, ``m*`` and a
``step_fn``. The learned vectors enter the text encoder exactly as an
``embedding:NAME`` does at inference: as tensor tokens that ComfyUI's own
tokenizer placed and ``encode_token_weights`` splices in.
"""

from __future__ import annotations

import contextlib
import logging

import torch

import comfy.model_management
import comfy.utils

from ..dti_core.magnitude import target_norm
from ..dti_core.sphere import normalize
from ..dti_core.training import step_generator
from . import differentiable as _differentiable

log = logging.getLogger("ComfyUI-DTI")

# The embedding name used while tokenizing training prompts; it never touches the disk.
PLACEHOLDER_NAME = "__dti_training_placeholder__"
# Marker rows stand in for the learned vectors until each step splices the real ones in.
_MARK_A, _MARK_B = 12345.0, -98765.0

SUPPORTED = "SD1.x, SD2.x and SDXL checkpoints (CLIP-L, CLIP-H, CLIP-L + CLIP-G)"


class UnsupportedModelError(ValueError):
    pass


def text_encoders(clip) -> dict[str, tuple[str, object, torch.nn.Module]]:
    """``{embedding_key: (token_dict_key, tokenizer, encoder)}`` for the CLIP's text encoders."""
    found = {}
    for attr, tok in vars(clip.tokenizer).items():
        key = getattr(tok, "embedding_key", None)
        if not (attr.startswith("clip_") and key == attr and hasattr(tok, "_try_get_embedding")):
            continue
        encoder = getattr(clip.cond_stage_model, attr, None)
        if encoder is None or not hasattr(encoder, "transformer"):
            continue
        found[key] = (attr[len("clip_"):], tok, encoder)
    if not found or any(k not in ("clip_l", "clip_g", "clip_h") for k in found) or "clip_g" in found and "clip_l" not in found:
        names = ", ".join(sorted(found)) or "none"
        raise UnsupportedModelError(
            f"DTI Train supports {SUPPORTED}; this CLIP's text encoders are: {names} "
            f"({type(clip.cond_stage_model).__name__})"
        )
    return found


def clip_widths(clip) -> dict[str, int]:
    """``{embedding_key: token width}`` of the CLIP's text encoders."""
    return {key: tok.embedding_size for key, (_, tok, _) in text_encoders(clip).items()}


def check_model(model) -> None:
    """Refuse diffusion models whose conditioning this trainer does not build."""
    import comfy.model_base as mb

    inner = model.model
    if type(inner) not in (mb.BaseModel, mb.SDXL):
        raise UnsupportedModelError(
            f"DTI Train supports {SUPPORTED}; this MODEL is {type(inner).__name__} "
            f"({type(inner.model_config).__name__})"
        )


def vocabulary(encoder) -> torch.Tensor:
    return encoder.transformer.get_input_embeddings().weight


def initializer_ids(tokenizer, words: str) -> list[int]:
    """Token ids of ``words`` as this tokenizer splits them, without start/end tokens."""
    ids = tokenizer.tokenizer(words)["input_ids"]
    end = -1 if getattr(tokenizer, "tokenizer_adds_end_token", True) else None
    return list(ids[tokenizer.tokens_start : end])


def initial_vectors(clip, words: str, count: int, magnitude) -> tuple[dict, dict, dict]:
    """``(init, mu, m_star)`` per encoder.

    By default one vector per initializer token, each starting at (and pulled
    toward) its token's direction. With an explicit ``count`` that differs, every
    vector starts at the mean direction of the initializer tokens.
    """
    if not words.strip():
        raise ValueError("initializer word is empty: give a word that describes the concept, e.g. 'dog'")
    init, mu, m_star = {}, {}, {}
    for key, (_, tok, encoder) in text_encoders(clip).items():
        ids = initializer_ids(tok, words)
        if not ids:
            raise ValueError(f"initializer {words!r} produced no tokens")
        vocab = vocabulary(encoder)
        with torch.inference_mode(False):
            rows = normalize(vocab[ids].detach().float().cpu().clone())
        n = count if count > 0 else len(ids)
        if n != len(ids):
            rows = normalize(rows.mean(dim=0, keepdim=True)).expand(n, -1).clone()
        init[key], mu[key] = rows, rows.clone()
        with torch.inference_mode(False):
            m_star[key] = target_norm(vocab.detach().float().cpu().clone(), magnitude)
    return init, mu, m_star


@contextlib.contextmanager
def placeholder_tokenizers(clip, num_vectors: int):
    """While active, ``embedding:PLACEHOLDER_NAME`` tokenizes to ``num_vectors`` marker rows."""
    originals = {}
    for key, (_, tok, _) in text_encoders(clip).items():
        marker = torch.zeros(num_vectors, tok.embedding_size)
        marker[:, 0], marker[:, 2] = _MARK_A, _MARK_B
        marker[:, 1] = torch.arange(num_vectors, dtype=torch.float32)
        original = tok._try_get_embedding

        def patched(embedding_name, _orig=original, _marker=marker):
            # Mirrors SDTokenizer._try_get_embedding, including its trailing-comma handling.
            split = embedding_name.split()
            first, leftover = (split[0] if split else ""), " ".join(split[1:])
            if first == PLACEHOLDER_NAME:
                return _marker, leftover
            if first.strip(",") == PLACEHOLDER_NAME:
                return _marker, "{} {}".format(first[len(PLACEHOLDER_NAME):], leftover)
            return _orig(embedding_name)

        originals[key] = (tok, original)
        tok._try_get_embedding = patched
    try:
        yield
    finally:
        for tok, _ in originals.values():
            # Drop the instance attribute so the class method shows through again.
            del tok._try_get_embedding


def _marker_row(t) -> int | None:
    if torch.is_tensor(t) and t.dim() == 1 and t.shape[0] > 2 and float(t[0]) == _MARK_A and float(t[2]) == _MARK_B:
        return int(t[1])
    return None


class PromptTokens:
    """One tokenized training prompt with the positions of the learned vectors."""

    def __init__(self, tokens: dict, slots: dict[str, list[tuple[int, int, int]]]):
        self.tokens = tokens  # as clip.tokenize returns it
        self.slots = slots  # token dict key -> [(chunk, position, vector row)]

    def with_vectors(self, embeds_by_token_key: dict[str, torch.Tensor]) -> dict:
        out = {k: [list(chunk) for chunk in chunks] for k, chunks in self.tokens.items()}
        for k, slots in self.slots.items():
            for c, j, row in slots:
                entry = out[k][c][j]
                out[k][c][j] = (embeds_by_token_key[k][row],) + tuple(entry[1:])
        return out


def tokenize_templates(clip, templates: list[str], num_vectors: int) -> list[PromptTokens]:
    encoders = text_encoders(clip)
    for key, (_, tok, _) in encoders.items():
        if tok.embedding_directory is None:
            # ComfyUI's tokenizer then ignores every "embedding:" word, in training and in prompts.
            raise ValueError(
                f"this CLIP's {key} tokenizer has no embeddings folder, so embedding:NAME cannot work with it. "
                f"Load the model with CheckpointLoaderSimple or CLIPLoader, which set the embeddings folders."
            )
    result = []
    with placeholder_tokenizers(clip, num_vectors):
        for template in templates:
            text = template.replace("{}", "embedding:" + PLACEHOLDER_NAME)
            tokens = clip.tokenize(text)
            slots = {}
            for tkey, chunks in tokens.items():
                found = [(c, j, _marker_row(e[0])) for c, chunk in enumerate(chunks) for j, e in enumerate(chunk)]
                slots[tkey] = [s for s in found if s[2] is not None]
            for key, (tkey, _, _) in encoders.items():
                if sorted(r for _, _, r in slots.get(tkey, [])) != list(range(num_vectors)):
                    raise ValueError(f"template {template!r}: the learned word did not tokenize into the {key} prompt")
            result.append(PromptTokens(tokens, slots))
    return result


def differentiable(model, clip, gradient_checkpointing: bool = False):
    """``differentiable.differentiable`` for the MODEL and every text encoder of the CLIP."""
    encoders = [encoder for _, _, encoder in text_encoders(clip).values()]
    return _differentiable.differentiable(model, encoders, gradient_checkpointing)


def prepare_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE (B, H, W, C in [0, 1]) -> RGB at ``resolution``², centre-cropped; bad pixels refused."""
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be an IMAGE batch (B, H, W, C); got {getattr(images, 'shape', type(images))}")
    if images.shape[0] == 0:
        raise ValueError("the image batch is empty: connect at least one image of the concept")
    channels = images.shape[-1]
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3]  # alpha is dropped: the VAE takes RGB
    elif channels != 3:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {channels}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("the image batch contains NaN or infinite pixel values")
    images = images.float().clamp(0.0, 1.0)  # out-of-range values are clipped, as SaveImage does
    samples = images.movedim(-1, 1)
    samples = comfy.utils.common_upscale(samples, resolution, resolution, "bicubic", "center").clamp(0.0, 1.0)
    return samples.movedim(1, -1)


def encode_latents(vae, model, images: torch.Tensor, hflip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VAE-encode every training image once (and its mirror image), in the model's latent space."""
    latents = model.model.process_latent_in(vae.encode(images)).float()
    flipped = model.model.process_latent_in(vae.encode(images.flip(2))).float() if hflip else None
    return latents, flipped


def encode_tokens(clip, tokens):
    """``(cond, pooled)`` of a token dict through ``encode_token_weights``, as CLIPTextEncode gets them.

    Does what ``CLIP.encode_from_tokens`` does before encoding (clip skip), without
    re-loading the models each step; tensor tokens keep their gradients.
    """
    cm = clip.cond_stage_model
    cm.reset_clip_options()
    if clip.layer_idx is not None:
        cm.set_clip_options({"layer": clip.layer_idx})
    cond, pooled = cm.encode_token_weights(tokens)[:2]
    return cond, pooled


def encode_token_batch(clip, token_dicts: list[dict], want_pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode several one-chunk prompts in one text-encoder pass: ``(B, 77, width)`` and pooled ``(B, ...)``.

    The prompts go through ``encode_token_weights`` as the chunks of one long prompt: ComfyUI
    encodes chunks as independent rows of one batch and concatenates them, so row k equals a
    separate encode of prompt k. The wrapper keeps only the first chunk's pooled output, so the
    pooled rows are read from the encoder's own forward. Prompts of several chunks fall back to
    one call each.
    """
    if any(len(chunks) != 1 for td in token_dicts for chunks in td.values()):
        outs = [encode_tokens(clip, td) for td in token_dicts]
        pooled = [p for _, p in outs]
        return torch.cat([c for c, _ in outs]), (torch.cat(pooled) if pooled[0] is not None else None)
    merged = {k: [td[k][0] for td in token_dicts] for k in token_dicts[0]}
    captured: dict[str, list] = {}
    hooks = [
        encoder.register_forward_hook(lambda mod, args, out, _k=key: captured.setdefault(_k, []).append(out))
        for key, (_, _, encoder) in text_encoders(clip).items()
    ]
    try:
        cond, first_pooled = encode_tokens(clip, merged)
    finally:
        for h in hooks:
            h.remove()
    b = len(token_dicts)
    cond = cond.reshape(b, -1, cond.shape[-1])
    if first_pooled is None or not want_pooled:
        return cond, None
    for outs in captured.values():
        rows = outs[0][1] if isinstance(outs[0], tuple) and len(outs[0]) > 1 else None
        if rows is not None and rows.shape[-1] == first_pooled.shape[-1] and torch.allclose(
                rows[0:1].to(first_pooled.device, first_pooled.dtype), first_pooled, rtol=0, atol=0, equal_nan=True):
            return cond, rows[:b]
    raise RuntimeError("could not find the pooled output of the batched prompts; please report this")


class DiffusionStep:
    """``step_fn`` for ``dti_core.training.train``: one batch of the noise-prediction loss.

    The loss is the mean squared error in the model's own output space, whatever
    its parameterisation: ``model_sampling.calculate_denoised`` is affine in the
    model output with slope ``b(sigma)``, so ``(x0_pred - x0) / b`` is the output
    error. For eps models this is exactly ``||eps_pred - eps||^2`` (the paper's
    loss), for v-prediction the v error, for flow models the velocity error.
    Reduction: element-wise mean over the batch, as the reference does, so kappa
    keeps its meaning.
    """

    def __init__(self, model, clip, prompts: list[PromptTokens], latents, flipped, batch_size: int,
                 seed: int, resolution: int, device):
        self.model, self.clip, self.prompts = model, clip, prompts
        self.device = device
        self.latents = latents.to(device)
        self.flipped = flipped.to(device) if flipped is not None else None
        self.batch_size, self.seed, self.resolution = batch_size, seed, resolution
        self.encoders = text_encoders(clip)
        # get_model_object sees object patches (e.g. ModelSamplingDiscrete v_prediction) too.
        ms = model.get_model_object("model_sampling")
        self.ms = ms
        self.t_min = float(ms.timestep(ms.sigma_min))
        self.t_max = float(ms.timestep(ms.sigma_max))
        # Differentiable attention for these calls only, whatever backend the launch flags chose.
        self.transformer_options = _differentiable.training_transformer_options(model)
        # SDXL-style models build their vector conditioning from the pooled text output; SD1/SD2 don't.
        self.uses_pooled = model.model.encode_adm(
            pooled_output=torch.zeros(1, 1280), width=resolution, height=resolution, crop_w=0, crop_h=0,
            target_width=resolution, target_height=resolution, device="cpu") is not None

    def __call__(self, embeds: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        g = step_generator(self.seed, step)
        n, b = self.latents.shape[0], self.batch_size
        idx = torch.randint(n, (b,), generator=g)
        flip = torch.rand(b, generator=g) < 0.5
        which = torch.randint(len(self.prompts), (b,), generator=g)
        u = torch.rand(b, generator=g, dtype=torch.float64)
        noise = torch.randn((b,) + tuple(self.latents.shape[1:]), generator=g).to(self.device)

        x0 = self.latents[idx.to(self.device)]
        if self.flipped is not None and bool(flip.any()):
            x0 = torch.where(flip.to(self.device).view(-1, 1, 1, 1), self.flipped[idx.to(self.device)], x0)

        by_token_key = {tkey: embeds[key] for key, (tkey, _, _) in self.encoders.items()}
        try:
            cond, pooled = encode_token_batch(
                self.clip, [self.prompts[int(i)].with_vectors(by_token_key) for i in which], self.uses_pooled)
        except RuntimeError as e:
            if "size" not in str(e) and "shape" not in str(e):
                raise
            raise ValueError("all training prompts must fit in one 75-token chunk; shorten the custom templates") from None
        cond = cond.to(self.device)

        timestep = (self.t_min + u * (self.t_max - self.t_min)).float()
        sigma = self.ms.sigma(timestep).to(self.device)
        x_t = self.ms.noise_scaling(sigma, noise, x0)
        kwargs = {}
        if self.uses_pooled:
            y = self.model.model.encode_adm(
                pooled_output=pooled.to(self.device), width=self.resolution, height=self.resolution,
                crop_w=0, crop_h=0, target_width=self.resolution, target_height=self.resolution, device=self.device,
            )
            if y is not None:
                kwargs["y"] = y
        x0_pred = self.model.model.apply_model(
            x_t, sigma, c_crossattn=cond, transformer_options=self.transformer_options, **kwargs
        ).float()
        # d(x0_pred)/d(model output) per sample; (b, 1, 1, 1) broadcasts, no latent-sized tensors.
        unit = torch.ones((b,) + (1,) * (x0_pred.dim() - 1), device=x0_pred.device)
        slope = self.ms.calculate_denoised(sigma, unit, torch.zeros_like(unit))
        return (((x0_pred - x0) / slope) ** 2).mean()
