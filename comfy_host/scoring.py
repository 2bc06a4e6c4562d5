"""The paper's two scores for a learned word, through models ComfyUI's own loaders give.

- image score: cosine between a generated image's features and each reference photo's, averaged over
  the references (the authors' ``row_mean``), then over the images. Features are the vision model's
  ``image_embeds`` from ``ClipVisionModel.encode_image``: DINOv2's CLS token after its last norm (the
  authors' feature) or a CLIP vision model's projected embedding (CLIP-I). A mask multiplies the
  reference pixels, as the authors' evaluation blacks out the background.
- text score: cosine between a generated image's CLIP embedding and its prompt's, in CLIP's joint space
  (CLIP-T): the projected pooled output of the CLIP text tower that shares the vision model's space.

Only ``ClipVisionModel`` (``model``, ``encode_image``, ``return_all_hidden_states``) and the text
encoders' own ``encode_token_weights`` with the ``projected_pooled`` clip option are used.
"""

from __future__ import annotations

import re

import torch

from . import memory
from .contracts import UnsupportedModelError
from .text import text_encoders

# CLIP text towers and the vision models whose space they share, by projection width.
TEXT_TOWERS = {"clip_l": "CLIP ViT-L/14", "clip_h": "OpenCLIP ViT-H/14", "clip_g": "OpenCLIP ViT-bigG/14"}
# A text projection ComfyUI did not find in the file stays as allocated (SD1.x checkpoints carry none):
# seen 2e-4 at most on 0.33.0's CPU. Trained ones are ~0.8 per sqrt(width) (CLIP-L), random test ones 0.55.
MIN_PROJECTION_RMS = 1e-2


def vision_kind(clip_vision) -> str:
    """``"dinov2"``, ``"clip"`` or ``"siglip"`` for a CLIP_VISION; anything else is refused."""
    name = type(getattr(clip_vision, "model", None)).__name__
    if name == "Dinov2Model":
        return "dinov2"
    if name == "CLIPVisionModelProjection":
        # (SigLIP is built on the same class; ComfyUI reads all its hidden states)
        return "siglip" if getattr(clip_vision, "return_all_hidden_states", False) else "clip"
    raise UnsupportedModelError(f"DTI Evaluate scores with DINOv2 or CLIP vision models (CLIPVisionLoader); this "
                                f"CLIP_VISION is a {name}")


def describe(clip_vision) -> str:
    kind = vision_kind(clip_vision)
    model = clip_vision.model
    if kind == "dinov2":
        layers = len(model.encoder.layer)
        width = model.layernorm.weight.shape[0]
        size = {24: "large", 40: "giant"}.get(layers, f"{layers} layers")
        return f"DINOv2 {size} ({width} wide)"
    width = model.vision_model.post_layernorm.weight.shape[0]
    proj = projection_width(clip_vision)
    name = "SigLIP" if kind == "siglip" else "CLIP vision"
    return f"{name} ({width} wide" + (f", projection {proj})" if proj else ")")


def projection_width(clip_vision) -> int | None:
    proj = getattr(clip_vision.model, "visual_projection", None)
    return getattr(proj, "out_features", None)


def masked(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``images`` (B, H, W, 3) times the subject mask (1 = subject): one mask for all or one per image,
    resized to the images (bilinear)."""
    if mask is None:
        return images
    m = mask.float()
    if m.dim() == 2:
        m = m[None]
    if m.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"reference_mask has {m.shape[0]} masks for {images.shape[0]} reference images: give one "
                         f"mask for all or one per image")
    if m.shape[-2:] != images.shape[1:3]:
        m = torch.nn.functional.interpolate(m[:, None], size=images.shape[1:3], mode="bilinear",
                                            align_corners=False)[:, 0]
    return images * m.clamp(0, 1).to(images.dtype)[..., None]


def image_features(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` float32 features of an IMAGE batch (ComfyUI's own preprocessing: resize the short side
    to the model's size, centre crop, its mean and std)."""
    out = clip_vision.encode_image(images[..., :3], crop=True)
    return out["image_embeds"].float().cpu()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a @ b.T).float()


def image_scores(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generated image: the mean cosine to every reference (``(N,)`` of features ``(N, D)``, ``(M, D)``)."""
    return cosine_matrix(generated, references).mean(dim=1)


def text_tower(clip, clip_vision) -> str:
    """The key of the CLIP's text tower that shares ``clip_vision``'s space (projection widths match and
    the projection was in the file), or a clear refusal."""
    kind = vision_kind(clip_vision)
    if kind != "clip":
        what = "DINOv2 has no text tower" if kind == "dinov2" else "ComfyUI loads no SigLIP text tower"
        raise ValueError(f"the text score needs a CLIP vision model paired with the CLIP's text tower; "
                         f"text_vision is {describe(clip_vision)}: {what}. Load CLIP ViT-L/14 (for clip_l) or "
                         f"ViT-bigG (for SDXL's clip_g) with CLIPVisionLoader")
    width = projection_width(clip_vision)
    have = {}
    for key, (_, _, enc) in text_encoders(clip).items():
        proj = getattr(enc.transformer, "text_projection", None)
        if key in TEXT_TOWERS and proj is not None:
            have[key] = proj
    for key, proj in have.items():
        if proj.out_features == width:
            w = proj.weight
            with torch.inference_mode(False):
                rms = float(w.detach().float().pow(2).mean().sqrt())
            if not (rms == rms and MIN_PROJECTION_RMS <= rms < 1e3):
                raise ValueError(f"this CLIP's {key} has no text projection (its file carried none, as SD1.x "
                                 f"checkpoints): the text score cannot be computed with it. Load the text encoder "
                                 f"file (clip_l.safetensors of SD3 / Flux, or an SDXL checkpoint's clip_g) with "
                                 f"CLIPLoader")
            return key
    towers = ", ".join(f"{k} (projection {p.out_features})" for k, p in have.items()) or "no CLIP text tower"
    raise ValueError(f"the text tower and the vision model do not share a space: text_vision is "
                     f"{describe(clip_vision)}, and this CLIP has {towers}. Pair clip_l with CLIP ViT-L/14, clip_h "
                     f"with ViT-H/14, clip_g with ViT-bigG/14")


_WORD = re.compile(r"embedding:\S+|\{\}")


def without_learned_word(prompt: str) -> str:
    """The prompt the text score reads: every ``embedding:NAME`` (and ``{}``) taken out, as the paper
    scores each image against its prompt without the learned word."""
    return re.sub(r"\s+", " ", _WORD.sub("", prompt)).strip(" ,")


def text_features(clip, key: str, prompts: list[str]) -> torch.Tensor:
    """``(N, P)`` float32: the projected pooled output of text tower ``key`` for each prompt."""
    tkey, _, encoder = text_encoders(clip)[key]
    memory.load_text_encoders(clip)
    rows = []
    device = clip.patcher.load_device
    # (0.3.64's encoders ignore the execution-device option, as in text.encode_tokens)
    encoder.set_clip_options({"projected_pooled": True, "execution_device": device})
    try:
        for prompt in prompts:
            tokens = clip.tokenize(prompt)[tkey]
            with torch.inference_mode(), memory.device_context(device):
                out = encoder.encode_token_weights(tokens)
            rows.append(out[1].float().cpu().reshape(1, -1))
    finally:
        encoder.reset_clip_options()
    return torch.cat(rows)
