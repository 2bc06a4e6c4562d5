"""DTI Inspect: what an embedding is, as text and as a chart of its norms against the vocabulary."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..dti_core.embedding_file import check_fits
from ..dti_core.inspect import inspect_vectors
from ..dti_core.magnitude import vocabulary_norms
from ..dti_core.sphere import normalize
from ..comfy_host import text as host_text
from .common import CATEGORY, EMBEDDING_TYPE

CHART_W, CHART_H, BINS = 640, 220, 64
COLORS = [(230, 80, 60), (60, 140, 230), (60, 180, 90), (200, 150, 30)]


class DTIInspect:
    DESCRIPTION = ("Show what an embedding is: each vector's length against the vocabulary's (percentile, m*), "
                   "its angle to the initializer word and its nearest vocabulary tokens; plus a chart of the norms.")
    SEARCH_ALIASES = ["embedding info", "inspect embedding"]
    CATEGORY = CATEGORY
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "norm_chart")
    OUTPUT_TOOLTIPS = ("The report as text.", "Vocabulary norm histogram per encoder, with the vectors marked.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding": (EMBEDDING_TYPE, {"tooltip": "From DTI Train, DTI Load Embedding or DTI Slerp Concepts."}),
                "clip": ("CLIP", {"tooltip": "The CLIP whose vocabulary the vectors are compared with."}),
                "top_k": ("INT", {"default": 5, "min": 1, "max": 50, "tooltip": "How many nearest vocabulary tokens to list per vector."}),
            },
            "optional": {
                "initializer": ("STRING", {"default": "", "tooltip": "Word to measure the angle to; empty = the initializer recorded in the file (if any)."}),
            },
        }

    def inspect(self, embedding, clip, top_k, initializer=""):
        encoders = host_text.text_encoders(clip)
        check_fits(embedding, host_text.clip_widths(clip))
        word = initializer.strip() or embedding.metadata.get("dti.initializer", "")
        lines, charts = [], []
        # the file name, not its absolute path: the report's first line must fit a node's width
        name = embedding.metadata.get("dti.name") or (os.path.basename(embedding.path) if embedding.path else "embedding")
        lines.append(f"{name}  [{embedding.source_format}]")
        if embedding.is_plain_ti:
            lines.append("plain TI (method ti): the vectors' lengths were free to grow; compare each norm with "
                         "the vocabulary's below (a DTI word keeps m*)")
        for ci, (key, (_, tok, encoder)) in enumerate(sorted(encoders.items())):
            with torch.inference_mode(False):
                vocab = host_text.vocabulary(encoder).detach().float().cpu().clone()
                scale = host_text.lookup_scale(encoder)
                if scale != 1.0:
                    vocab.mul_(scale)  # the norms tokens have where learned rows enter
            init_dir = None
            if word:
                ids = host_text.initializer_ids(tok, word)
                if ids:
                    init_dir = normalize(vocab[ids].mean(0, keepdim=True)) if len(ids) != embedding.vectors[key].shape[0] else normalize(vocab[ids])
            reports, summary = inspect_vectors(vocab, embedding.vectors[key], init_dir, int(top_k))
            m_star = embedding.m_star(key)
            lines.append(f"{key}: vocabulary norms mean {summary['mean']:.4f} (median {summary['median']:.4f}, "
                         f"min {summary['min']:.4f}, max {summary['max']:.4f})"
                         + (f"; m* in file {m_star:.4f}" if m_star is not None else ""))
            for r in reports:
                near = ", ".join(f"{_token_text(tok, i)} ({c:.2f})" for i, c in r.nearest)
                ang = f", {r.angle_to_init_deg:.1f} deg from '{word}'" if r.angle_to_init_deg is not None else ""
                lines.append(f"  vector {r.index}: norm {r.norm:.4f} ({r.percentile:.1f}th percentile){ang}; nearest: {near}")
            charts.append(_chart(key, vocabulary_norms(vocab), [r.norm for r in reports], summary["mean"]))
        image = np.concatenate(charts, axis=0)
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (report, torch.from_numpy(image)[None].float() / 255.0)}


def _token_text(tok, token_id: int) -> str:
    text = tok.inv_vocab.get(token_id, f"#{token_id}")
    return text.replace("</w>", "")


def _chart(title: str, norms: torch.Tensor, marks: list[float], mean: float) -> np.ndarray:
    """A histogram of vocabulary norms with vertical lines at the given norms (Pillow only)."""
    img = Image.new("RGB", (CHART_W, CHART_H), (24, 24, 28))
    d = ImageDraw.Draw(img)
    lo = 0.0
    hi = max(float(norms.max()), max(marks) if marks else 0.0) * 1.05 or 1.0
    counts = torch.histc(norms, bins=BINS, min=lo, max=hi)
    left, right, top, bottom = 10, CHART_W - 10, 24, CHART_H - 22
    peak = float(counts.max()) or 1.0
    bw = (right - left) / BINS
    for i, c in enumerate(counts.tolist()):
        h = (bottom - top) * c / peak
        d.rectangle([left + i * bw, bottom - h, left + (i + 1) * bw - 1, bottom], fill=(150, 150, 160))

    def x_of(v):
        return left + (right - left) * (v - lo) / (hi - lo)

    d.line([x_of(mean), top, x_of(mean), bottom], fill=(240, 240, 240), width=1)
    for i, m in enumerate(marks):
        d.line([x_of(m), top, x_of(m), bottom], fill=COLORS[i % len(COLORS)], width=3)
    d.text((left, 4), f"{title}: vocabulary norms (grey), mean (white), vectors (colour)", fill=(230, 230, 230))
    d.text((left, bottom + 4), f"{lo:.2f}", fill=(200, 200, 200))
    d.text((right - 40, bottom + 4), f"{hi:.2f}", fill=(200, 200, 200))
    return np.asarray(img)
