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

from ..dti_core.magnitude import target_norm
from ..dti_core.sphere import normalize
from ..dti_core.training import step_generator
from . import differentiable as _differentiable

log = logging.getLogger("ComfyUI-DTI")

# The embedding name used while tokenizing training prompts; it never touches the disk.
PLACEHOLDER_NAME = "__dti_training_placeholder__"
# Marker rows stand in for the learned vectors until each step splices the real ones in.
_MARK_A, _MARK_B = 12345.0, -98765.0

class UnsupportedModelError(ValueError):
    pass


def text_encoders(clip) -> dict[str, tuple[str, object, torch.nn.Module]]:
    """``{embedding_key: (token_dict_key, tokenizer, encoder)}`` for every text encoder of the CLIP
    whose ComfyUI tokenizer reads ``embedding:NAME`` (CLIP-L/G/H, T5-XXL, ...).

    The embedding key is what ComfyUI looks up in an embedding file for that encoder
    (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``); the token dict key is the encoder's key in
    ``clip.tokenize(...)`` output (``l``, ``g``, ``h``, ``t5xxl``).
    """
    found = {}
    outer = clip.tokenizer
    for attr, tok in vars(outer).items():
        key = getattr(tok, "embedding_key", None)
        if key is None or not hasattr(tok, "_try_get_embedding") or attr not in (key, "clip_" + key):
            continue
        # (the tokenizer and the model may name it differently: PixArt/Chroma's T5 is clip_t5xxl vs t5xxl)
        encoder = next((e for e in (getattr(clip.cond_stage_model, a, None) for a in (attr, key, "clip_" + key))
                        if e is not None and hasattr(e, "transformer")), None)
        if encoder is None:
            continue
        if attr == getattr(outer, "clip", None) and getattr(outer, "clip_name", None):
            tkey = outer.clip_name  # a one-encoder SD1Tokenizer wrapper: tokens under its clip_name
        else:
            tkey = attr[len("clip_"):] if attr.startswith("clip_") else attr
        found[key] = (tkey, tok, encoder)
    if not found:
        from .families import supported_text
        raise UnsupportedModelError(
            f"DTI Train supports {supported_text()}; this CLIP ({type(clip.cond_stage_model).__name__}) has no text "
            "encoder whose tokenizer reads embedding:NAME")
    return found


def clip_widths(clip) -> dict[str, int]:
    """``{embedding_key: token width}`` of the CLIP's text encoders."""
    return {key: tok.embedding_size for key, (_, tok, _) in text_encoders(clip).items()}


def vocabulary(encoder) -> torch.Tensor:
    return encoder.transformer.get_input_embeddings().weight


def initializer_ids(tokenizer, words: str) -> list[int]:
    """Token ids of ``words`` as this tokenizer splits them, without start/end tokens."""
    ids = tokenizer.tokenizer(words)["input_ids"]
    end = -1 if getattr(tokenizer, "tokenizer_adds_end_token", True) else None
    return list(ids[tokenizer.tokens_start : end])


def initial_vectors(clip, words: str, count: int, magnitude, keys=None) -> tuple[dict, dict, dict]:
    """``(init, mu, m_star)`` per encoder (all of the CLIP's, or ``keys``).

    By default one vector per initializer token of that encoder's tokenizer (CLIP and
    T5 may split a word differently), each starting at (and pulled toward) its
    token's direction. With an explicit ``count`` that differs, every vector starts
    at the mean direction of the initializer tokens.
    """
    if not words.strip():
        raise ValueError("initializer word is empty: give a word that describes the concept, e.g. 'dog'")
    init, mu, m_star = {}, {}, {}
    for key, (_, tok, encoder) in text_encoders(clip).items():
        if keys is not None and key not in keys:
            continue
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
            # row norms block by block, no float copy of the whole table (Gemma-2's is 256000 x 2304)
            m_star[key] = target_norm(vocab.detach(), magnitude)
    return init, mu, m_star


@contextlib.contextmanager
def placeholder_tokenizers(clip, num_vectors):
    """While active, ``embedding:PLACEHOLDER_NAME`` tokenizes to marker rows: ``num_vectors`` of
    them (an int for every encoder, or ``{embedding_key: count}``)."""
    originals = {}
    for key, (_, tok, _) in text_encoders(clip).items():
        n = num_vectors if isinstance(num_vectors, int) else num_vectors[key]
        marker = torch.zeros(n, tok.embedding_size)
        marker[:, 0], marker[:, 2] = _MARK_A, _MARK_B
        marker[:, 1] = torch.arange(n, dtype=torch.float32)
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


def tokenize_templates(clip, templates: list[str], num_vectors) -> list[PromptTokens]:
    """Each template with ``{}`` replaced by the learned word, tokenized by the CLIP's own tokenizers.

    ``num_vectors``: an int for every encoder, or ``{embedding_key: count}``."""
    encoders = text_encoders(clip)
    for key, (_, tok, _) in encoders.items():
        if tok.embedding_directory is None:
            # ComfyUI's tokenizer then ignores every "embedding:" word, in training and in prompts.
            raise ValueError(
                f"this CLIP's {key} tokenizer has no embeddings folder, so embedding:NAME cannot work with it. "
                f"Load the model with CheckpointLoaderSimple or CLIPLoader, which set the embeddings folders, "
                f"or pass the CLIP through DTI Enable Embeddings."
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
                n = num_vectors if isinstance(num_vectors, int) else num_vectors[key]
                if sorted(r for _, _, r in slots.get(tkey, [])) != list(range(n)):
                    raise ValueError(f"template {template!r}: the learned word did not tokenize into the {key} prompt")
            result.append(PromptTokens(tokens, slots))
    return result


def differentiable(model, clip, gradient_checkpointing: bool = False):
    """``differentiable.differentiable`` for the MODEL and every text encoder of the CLIP."""
    encoders = [encoder for _, _, encoder in text_encoders(clip).values()]
    return _differentiable.differentiable(model, encoders, gradient_checkpointing)


# SDXL's training buckets (height, width) at 1024 x 1024 px area (SDXL report, appendix I).
SDXL_BUCKETS = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def buckets_for(resolution: int) -> list[tuple[int, int]]:
    """SDXL's bucket list scaled to ``resolution``'s area: sides in multiples of 64 px (8 px below
    512, where 64 px steps would be too coarse), duplicates after rounding dropped."""
    q = 64 if resolution >= 512 else 8
    scale = resolution / 1024
    return sorted({(max(q, round(h * scale / q) * q), max(q, round(w * scale / q) * q)) for h, w in SDXL_BUCKETS})


def choose_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio), then the one whose
    area is closest to ``resolution`` squared."""
    import math

    ratio = math.log(height / width)
    return min(buckets_for(resolution),
               key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), abs(b[0] * b[1] - resolution ** 2)))


class TrainingImage:
    """One training photo at its own size: RGB (H, W, 3) in [0, 1], an optional subject mask
    (H, W) (1 = subject: the loss counts there), and where it came from (for error messages)."""

    def __init__(self, pixels: torch.Tensor, mask: torch.Tensor | None, source: str):
        self.pixels, self.mask, self.source = pixels, mask, source


def _rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    channels = images.shape[-1]
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3]
    elif channels != 3:
        raise ValueError(f"{what} must have 1, 3 or 4 channels, got {channels}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} contains NaN or infinite pixel values")
    return images.float().clamp(0.0, 1.0)


def _check_mask(mask: torch.Tensor, source: str) -> torch.Tensor:
    if not bool(torch.isfinite(mask).all()):
        raise ValueError(f"the mask of {source} contains NaN or infinite values")
    mask = mask.float().clamp(0.0, 1.0)
    if float(mask.max()) <= 0.0:
        raise ValueError(f"the mask of {source} is empty (all 0): the mask marks the subject with 1 (white). "
                         "LoadImage's MASK is 1 where the PNG is transparent, so for a cut-out subject on a "
                         "transparent background put an InvertMask node between them")
    return mask


def load_training_images(images: torch.Tensor | None, mask: torch.Tensor | None = None,
                         folder: str = "") -> list[TrainingImage]:
    """The IMAGE batch (with the optional MASK: one for all images or one per image, resized to the
    images if its size differs) and every image of ``folder`` (a folder under ComfyUI's input
    directory, files by name, each at its own size; PNG alpha is its subject mask)."""
    items = []
    if mask is not None and images is None:
        raise ValueError("mask belongs to the images batch, which is not connected (the photos of image_folder "
                         "take their mask from their transparency)")
    if images is not None:
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"images must be an IMAGE batch (B, H, W, C); got {getattr(images, 'shape', type(images))}")
        if images.shape[0] > 0:
            px = _rgb(images, "the image batch")
            masks = None
            if mask is not None:
                m = mask if mask.dim() == 3 else mask.view(1, *mask.shape[-2:])
                if m.shape[0] not in (1, px.shape[0]):
                    raise ValueError(f"mask: {m.shape[0]} masks for {px.shape[0]} images; give one mask for all "
                                     "images or one per image")
                m = m.float()
                if tuple(m.shape[-2:]) != tuple(px.shape[1:3]):
                    m = torch.nn.functional.interpolate(m[:, None], size=tuple(px.shape[1:3]), mode="bilinear",
                                                        align_corners=False)[:, 0]
                masks = m.expand(px.shape[0], -1, -1)
            for i in range(px.shape[0]):
                src = f"image {i + 1} of the batch"
                items.append(TrainingImage(px[i], None if masks is None else _check_mask(masks[i], src), src))
    if folder and folder.strip():
        items.extend(_folder_images(folder.strip()))
    if not items:
        raise ValueError("no training images (the images batch is empty or not connected, and no image_folder): "
                         "connect an IMAGE batch of the concept, or name a folder of its photos inside ComfyUI's "
                         "input folder in image_folder")
    return items


def read_image(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rgb (H, W, 3), alpha (H, W) or None)`` float32 in [0, 1], as ComfyUI's LoadImage reads a photo:
    first frame, EXIF orientation applied, 16-bit grey ("I") scaled to 8 bits. ``alpha`` is the
    transparency as stored (opaque = 1), where the file has one. ``ValueError`` if it cannot be read."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode == "I":
                im = im.point(lambda i: i * (1 / 255))
            alpha = None
            if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
                alpha = torch.from_numpy(np.array(im.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0)
            rgb = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.float32) / 255.0)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return rgb, alpha


def image_files(folder: str) -> list[str]:
    """The photos in ``folder`` (not its subfolders), sorted by name."""
    import os

    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, n)))


def _folder_images(folder: str) -> list[TrainingImage]:
    import os

    import folder_paths

    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.isabs(folder) or "\0" in folder or os.path.commonpath([root, path]) != root:
        raise ValueError(f"image_folder {folder!r} must be a folder inside ComfyUI's input directory")
    if not os.path.isdir(path):
        raise ValueError(f"image_folder {folder!r}: no such folder in ComfyUI's input directory ({root})")
    names = image_files(path)
    if not names:
        raise ValueError(f"image_folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    items = []
    for name in names:
        src = f"{folder}/{name}"
        try:
            rgb, alpha = read_image(os.path.join(path, name))
        except ValueError as e:
            raise ValueError(f"image_folder: {e}".replace(os.path.join(path, name), src)) from None
        # alpha is the subject mask as it stands (opaque = subject), unlike LoadImage's 1 - alpha
        mask = _check_mask(alpha, src) if alpha is not None else None
        items.append(TrainingImage(rgb, mask, src))
    return items


def bucket_resize(item: TrainingImage, resolution: int):
    """``(bucket, pixels (1, h, w, 3), mask (h, w) or None)``: the image resized (antialiased
    bicubic, as the paper's pipeline) to the smallest size that covers its bucket, sides rounded down
    to 8 px; each step crops a bucket-sized window of it in latent space."""
    h, w = item.pixels.shape[:2]
    bh, bw = choose_bucket(h, w, resolution)
    scale = max(bh / h, bw / w)
    size = (max(bh, int(h * scale) // 8 * 8), max(bw, int(w * scale) // 8 * 8))
    samples = item.pixels.movedim(-1, 0)[None]
    if (h, w) != size:
        samples = torch.nn.functional.interpolate(samples, size=size, mode="bicubic", antialias=True,
                                                  align_corners=False).clamp(0.0, 1.0)
    mask = item.mask
    if mask is not None and tuple(mask.shape) != size:
        mask = torch.nn.functional.interpolate(mask[None, None], size=size, mode="bilinear", antialias=True,
                                               align_corners=False)[0, 0].clamp(0.0, 1.0)
    return (bh, bw), samples.movedim(1, -1), mask


def encode_buckets(vae, model, items: list[TrainingImage], resolution: int, hflip: bool) -> list["TrainingLatents"]:
    """Every image resized to its bucket and VAE-encoded once (posterior mean and std, mirrored too
    if ``hflip``), its mask averaged down to latent resolution; one ``TrainingLatents`` per bucket
    holding per-image tensors (images of one bucket may differ in size by the crop margin)."""
    any_mask = any(it.mask is not None for it in items)
    groups: dict[tuple[int, int], dict] = {}
    for k, it in enumerate(items):
        bucket, px, mask = bucket_resize(it, resolution)
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
                                   mask=lst("mask"), crop=(bh // 8, bw // 8), index=g["index"]))
    return out


class TrainingLatents:
    """The training images in the model's latent space: posterior mean and std (and the mirrored
    images'), cached once; each step samples ``mean + std * eps`` in a random crop, as the paper's
    code draws a fresh VAE posterior sample of a fresh random crop."""

    def __init__(self, mean, std, flipped_mean=None, flipped_std=None, original_size=None, *, mask=None,
                 crop=None, index=None):
        # One (B, C, h, w) tensor, or per image a list of (1, C, h_i, w_i) tensors (bucketed images).
        self.mean, self.std = mean, std
        self.flipped_mean, self.flipped_std = flipped_mean, flipped_std
        # (height, width) of the images before the resize: one for all, or a list, one per image
        self.original_size = original_size
        self.mask = mask  # subject weight per latent cell, (B or 1, 1, h, w) per image; None = all
        self.crop = crop  # the crop (latent units) each step trains; None = the training resolution
        self.index = index  # each image's position among all training images (binds its caption)

    def cloned(self) -> "TrainingLatents":
        """A copy made of normal tensors (the VAE ran under ComfyUI's inference mode)."""
        def c(v):
            if v is None:
                return None
            return [t.clone() for t in v] if isinstance(v, list) else v.clone()
        return TrainingLatents(c(self.mean), c(self.std), c(self.flipped_mean), c(self.flipped_std),
                               self.original_size, mask=c(self.mask), crop=self.crop, index=self.index)

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
    return TrainingLatents(mean, std, fmean, fstd, original_size)


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
    """Encode several one-chunk prompts in one text-encoder pass: ``(B, L, width)`` and pooled ``(B, ...)``.

    The prompts go through ``encode_token_weights`` as the chunks of one long prompt: ComfyUI
    encodes chunks as independent rows of one batch and concatenates them, so row k equals a
    separate encode of prompt k -- for CLIP-style wrappers. The wrapper keeps only the first
    chunk's pooled output, so the pooled rows are read from the encoder's own forward. Prompts of
    several chunks fall back to one call each. Whether this trick is exact for a given CLIP is
    checked once per run by ``TextPath``.
    """
    if any(len(chunks) != 1 for td in token_dicts for chunks in td.values()):
        return encode_each(clip, token_dicts, want_pooled)
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
    if b == 1:
        return cond, first_pooled  # one prompt: the wrapper's own pooled output is its row
    for outs in captured.values():
        rows = outs[0][1] if isinstance(outs[0], tuple) and len(outs[0]) > 1 else None
        if rows is not None and rows.shape[-1] == first_pooled.shape[-1] and torch.allclose(
                rows[0:1].to(first_pooled.device, first_pooled.dtype), first_pooled, rtol=0, atol=0, equal_nan=True):
            return cond, rows[:b]
    raise RuntimeError("could not find the pooled output of the batched prompts")


def encode_each(clip, token_dicts: list[dict], want_pooled: bool = True):
    """One ``encode_token_weights`` call per prompt: a list of ``(1, L_k, width)`` conds (lengths
    may differ, e.g. T5 without padding) and the pooled rows ``(B, ...)`` or None."""
    outs = [encode_tokens(clip, td) for td in token_dicts]
    pooled = [p for _, p in outs]
    conds = [c for c, _ in outs]
    return conds, (torch.cat(pooled) if want_pooled and pooled[0] is not None else None)


class TextPath:
    """Encodes a step's prompts the way CLIPTextEncode would, batched where that is exact.

    At the start of a run, two training prompts (different ones where there are two; the one
    prompt twice otherwise) are encoded both ways (no gradient): if the one-pass batch equals one
    encode per prompt to the precision of the encoder's dtype, the batched pass is used; otherwise
    (wrappers that join encoders along the sequence or whose pooled vector no single encoder gives,
    like SD3's, or unpadded T5 prompts of different lengths) one encode per prompt.
    """

    def __init__(self, clip, prompts: list[PromptTokens], embeds_by_token_key: dict, want_pooled: bool):
        self.clip, self.want_pooled = clip, want_pooled
        self.batched = False
        probe = [p.with_vectors(embeds_by_token_key) for p in (prompts[0], prompts[min(1, len(prompts) - 1)])]
        with torch.no_grad():
            try:
                cond, pooled = encode_token_batch(clip, probe, want_pooled)
            except (RuntimeError, ValueError):
                return
            conds, ref_pooled = encode_each(clip, probe, want_pooled)
        if torch.is_tensor(cond) and all(c.shape[1:] == cond.shape[1:] for c in conds):
            ref = torch.cat(conds)
            # fp16 encoders: rows of one batch and single rows may round differently in the last
            # place; anything beyond a few ulps means the rows were mixed.
            tol = 8 * torch.finfo(ref.dtype).eps * float(ref.abs().max()) if ref.is_floating_point() else 0.0
            same = torch.allclose(cond.float(), ref.float(), rtol=0, atol=tol)
            if same and ref_pooled is not None:
                same = pooled is not None and torch.allclose(pooled.float(), ref_pooled.float(), rtol=0,
                                                             atol=8 * torch.finfo(ref_pooled.dtype).eps * float(ref_pooled.abs().max()))
            self.batched = bool(same)

    def __call__(self, token_dicts: list[dict]):
        """``(conds, pooled)``: conds a ``(B, L, width)`` tensor, or a list of ``(1, L_k, width)``."""
        if self.batched:
            return encode_token_batch(self.clip, token_dicts, self.want_pooled)
        return encode_each(self.clip, token_dicts, self.want_pooled)


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
        import comfy.model_sampling

        self.table = ms.sigmas.detach().float().clone() if isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) else None
        # Differentiable attention for these calls only, whatever backend the launch flags chose.
        self.transformer_options = _differentiable.training_transformer_options(model)
        # Models that condition on the pooled text (SDXL's y, Flux's vector) get it; others don't
        # need the encoder to compute it.
        first = self.buckets[0]
        self.uses_pooled = _needs_pooled(model, (first.mean[0].shape[0],) + tuple(first.crop))
        self._text = None

    def _text_path(self, by_token_key):
        if self._text is None:
            self._text = TextPath(self.clip, self.prompts, by_token_key, self.uses_pooled)
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
        noise = torch.randn((b, bk.mean[0].shape[0], ch, cw), generator=g).to(self.device)
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
            window = (slice(None), slice(top, top + ch), slice(left, left + cw))
            sample = mean[window]
            if eps is not None and std is not None:
                sample = sample + std[j][window] * eps[i]  # a fresh posterior sample, as the paper's code draws
            x0.append(sample)
            if self.masked:
                m = bk.flipped_mask[j] if mirrored else bk.mask[j]
                weights.append(m[window])
            crops.append((8 * top, 8 * left))
            originals.append(bk.original_size[j])
        x0 = torch.stack(x0)
        weight = torch.stack(weights) if self.masked else None

        by_token_key = {tkey: embeds[key] for key, (tkey, _, _) in self.encoders.items()}
        text = self._text_path({k: v.detach() for k, v in by_token_key.items()})
        try:
            cond, pooled = text([self.prompts[int(i)].with_vectors(by_token_key) for i in which])
        except RuntimeError as e:
            if "size" not in str(e) and "shape" not in str(e):
                raise
            raise ValueError("all training prompts must fit in one 75-token chunk; shorten the custom templates") from None

        if self.table is not None:
            index = (u * len(self.table)).floor().long().clamp(max=len(self.table) - 1)
            sigma = self.table[index].to(self.device)
        else:
            timestep = (self.t_min + u * (self.t_max - self.t_min)).float()
            sigma = self.ms.sigma(timestep).to(self.device)
        x_t = self.ms.noise_scaling(sigma, noise, x0)
        h, w = 8 * ch, 8 * cw  # SDXL's target size: the bucket
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
        # Masked: the weighted mean over the subject's latent cells (and all channels) of the batch.
        return total / (weight.sum() * x0.shape[1]).clamp(min=1e-8)


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
        if tl.crop is not None:
            self.crop = tuple(tl.crop)
        else:
            lh = min(t.shape[-2] for t in self.mean)
            lw = min(t.shape[-1] for t in self.mean)
            self.crop = (min(lh, max(1, resolution // 8)), min(lw, max(1, resolution // 8)))


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
