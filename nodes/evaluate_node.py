"""DTI Evaluate: the paper's image and text scores for images rendered with a learned word."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..comfy_host import images as host_images
from ..comfy_host import scoring
from .common import CATEGORY

log = logging.getLogger("ComfyUI-DTI")

BAR_W, CHART_H, MARGIN = 36, 240, 34
IMAGE_COLOR, TEXT_COLOR = (60, 140, 230), (230, 140, 40)


class DTIEvaluate:
    DESCRIPTION = ("Score images rendered with a learned word as the DTI paper does: the image score (how much "
                   "each image looks like your reference photos: DINOv2 or CLIP features, cosine, averaged over "
                   "the photos) and the text score (how well each image still follows its prompt without the "
                   "word: CLIP image-text cosine). DTI's claim: it keeps the text score where plain TI loses it.")
    SEARCH_ALIASES = ["score", "clip score", "dino score", "evaluate embedding"]
    CATEGORY = CATEGORY
    FUNCTION = "evaluate"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("image_score", "text_score", "image_scores", "text_scores", "report", "chart")
    OUTPUT_IS_LIST = (False, False, True, True, False, False)
    OUTPUT_TOOLTIPS = (
        "Mean image score over the generated images (cosine, -1 to 1).",
        "Mean text score over the generated images (CLIP cosine, -1 to 1); 0 when no text model is connected.",
        "The image score of each generated image, in order.",
        "The text score of each generated image, in order (empty when no text model is connected).",
        "The scores as text, with the models used.",
        "A bar per generated image: image score (blue) and text score (orange).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "generated": ("IMAGE", {"tooltip": "The images rendered with the learned word (one batch; e.g. a prompt set at seeds 0-3)."}),
                "image_vision": ("CLIP_VISION", {"tooltip": "For the image score, from CLIPVisionLoader: DINOv2 (the paper's feature; ComfyUI loads large and giant) or a CLIP vision model (CLIP-I)."}),
            },
            "optional": {
                "references": ("IMAGE", {"tooltip": "Photos of the subject (the training images), as a batch; or name their folder in reference_folder (both may be used)."}),
                "reference_mask": ("MASK", {"tooltip": "Optional: where the subject is in the references batch (1 = subject); the rest is blacked out before scoring, as the paper's masked score. One mask for all or one per reference."}),
                "reference_folder": ("STRING", {"default": "", "tooltip": "Optional: a folder inside ComfyUI's input directory with the subject's photos (as DTI Train's image_folder), each at its own size; a PNG's transparency is its mask (opaque = subject)."}),
                "clip": ("CLIP", {"tooltip": "For the text score: a CLIP whose text tower shares text_vision's space (clip_l with CLIP ViT-L/14, SDXL's clip_g with ViT-bigG/14). SD1.x checkpoints carry no text projection: load clip_l with CLIPLoader."}),
                "text_vision": ("CLIP_VISION", {"tooltip": "For the text score: the CLIP vision model that pairs with clip's text tower."}),
                "prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "The prompts the images were rendered from, in order: one line per generated image, or K lines for K equal groups of consecutive images (e.g. 2 prompts x 4 seeds: 2 lines), or one line for all. embedding:NAME (the learned word) and {} are taken out before scoring, as the paper does."}),
            },
        }

    def evaluate(self, generated, image_vision, references=None, reference_mask=None, reference_folder="", clip=None,
                 text_vision=None, prompts=""):
        n = _count(generated, "generated")
        refs, masked_refs = _references(references, reference_mask, reference_folder)
        m = len(refs)
        image_model = scoring.describe(image_vision)  # (refuses a model it cannot score with)
        want_text = clip is not None or text_vision is not None or bool(prompts.strip())
        key = lines = None
        if want_text:
            if clip is None or text_vision is None:
                raise ValueError("the text score needs both clip and text_vision connected (and the prompts); "
                                 "leave all three out for the image score alone")
            key = scoring.text_tower(clip, text_vision)
            lines = prompt_lines(prompts, n)

        ref_features = torch.cat([scoring.image_features(image_vision, r) for r in refs])
        per_image = scoring.image_scores(scoring.image_features(image_vision, generated.float()), ref_features)
        image_scores = [float(x) for x in per_image]
        text_scores: list[float] = []
        if want_text:
            img = scoring.image_features(text_vision, generated.float())
            txt = scoring.text_features(clip, key, [scoring.without_learned_word(p) for p in lines])
            text_scores = [float(x) for x in torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)]

        image_score = float(np.mean(image_scores))
        text_score = float(np.mean(text_scores)) if text_scores else 0.0
        report = [f"image score {image_score:.4f}: {image_model}, {n} image(s) x {m} reference(s)"
                  + (", references masked" if masked_refs else "")]
        if text_scores:
            report.append(f"text score {text_score:.4f}: CLIP-T, {key} with {scoring.describe(text_vision)}, "
                          f"the prompt without the learned word")
        else:
            report.append("text score: not computed (connect clip, text_vision and the prompts)")
        for i, s in enumerate(image_scores):
            report.append(f"  image {i + 1}: image {s:.4f}" + (f", text {text_scores[i]:.4f}" if text_scores else ""))
        text = "\n".join(report)
        log.info("DTI Evaluate: %s", text.replace("\n", "; "))
        chart = score_chart(image_scores, text_scores)
        return {"ui": {"text": [text]},
                "result": (image_score, text_score, image_scores, text_scores, text, chart)}


def _count(images, what: str) -> int:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"{what} must be an IMAGE batch (B, H, W, 3)")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is empty: connect at least one image")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    return int(images.shape[0])


def _references(images, mask, folder: str):
    """``([(1, H, W, 3) per reference], any masked)``: the batch (masked) first, then the folder's photos
    (each at its own size, its transparency as its mask)."""
    refs, any_mask = [], False
    if mask is not None and images is None:
        raise ValueError("reference_mask belongs to the references batch, which is not connected (the photos of "
                         "reference_folder take their mask from their transparency)")
    if images is not None and not (torch.is_tensor(images) and images.dim() == 4 and images.shape[0] == 0):
        _count(images, "references")
        batch = scoring.masked(images[..., :3].float(), mask)
        refs += [batch[i:i + 1] for i in range(batch.shape[0])]
        any_mask = mask is not None
    if folder and folder.strip():
        for item in host_images.load_training_images(None, None, folder.strip()):
            px = item.pixels.float()
            if item.mask is not None:
                px, any_mask = px * item.mask.float()[..., None], True
            refs.append(px[None])
    if not refs:
        raise ValueError("references is empty: connect a batch of the subject's photos or name their folder in "
                         "reference_folder")
    return refs, any_mask


def prompt_lines(prompts: str, n: int) -> list[str]:
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    if not lines:
        raise ValueError("the text score needs the prompts the images were rendered from (one line per image, "
                         "or one for all)")
    if n % len(lines):
        raise ValueError(f"{n} generated images but {len(lines)} prompt lines: give one line per image, in order, "
                         f"one per equal group of consecutive images, or one line for all")
    return [line for line in lines for _ in range(n // len(lines))]


def score_chart(image_scores: list[float], text_scores: list[float]) -> torch.Tensor:
    """Bars per generated image on a 0..1 axis (negative cosines drawn at 0)."""
    n = len(image_scores)
    width = max(320, MARGIN * 2 + n * (2 * BAR_W + 12))
    img = Image.new("RGB", (width, CHART_H), (24, 24, 24))
    d = ImageDraw.Draw(img)
    top, bottom = 12, CHART_H - 26
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        d.line([(MARGIN - 4, y), (width - 8, y)], fill=(70, 70, 70))
        d.text((2, y - 6), f"{frac:.1f}", fill=(180, 180, 180))
    for i in range(n):
        x0 = MARGIN + i * (2 * BAR_W + 12)
        for j, (scores, color) in enumerate(((image_scores, IMAGE_COLOR), (text_scores, TEXT_COLOR))):
            if i >= len(scores):
                continue
            h = max(0.0, min(1.0, scores[i])) * (bottom - top)
            d.rectangle([x0 + j * BAR_W, bottom - h, x0 + (j + 1) * BAR_W - 3, bottom], fill=color)
        d.text((x0 + 4, bottom + 6), str(i + 1), fill=(200, 200, 200))
    d.text((width - 150, 2), "image", fill=IMAGE_COLOR)
    d.text((width - 90, 2), "text", fill=TEXT_COLOR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
