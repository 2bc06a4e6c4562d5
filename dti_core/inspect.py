"""What an embedding is: norms against the vocabulary, angle to the initializer, nearest tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .magnitude import vocabulary_norms
from .sphere import angle, normalize


@dataclass
class VectorReport:
    index: int
    norm: float
    percentile: float  # share of vocabulary rows with a smaller norm, in %
    angle_to_init_deg: float | None
    nearest: list[tuple[int, float]]  # (token id, cosine)


def inspect_vectors(vocab: torch.Tensor, vectors: torch.Tensor, init_direction: torch.Tensor | None = None,
                    top_k: int = 5) -> tuple[list[VectorReport], dict[str, float]]:
    """Per-vector report and the vocabulary's norm summary (mean, min, max, median)."""
    vocab = vocab.detach().float().cpu()
    vectors = vectors.detach().float().cpu()
    norms = vocabulary_norms(vocab)
    sorted_norms = norms.sort().values
    unit_vocab = vocab / vocab.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    reports = []
    for i, v in enumerate(vectors):
        n = float(v.norm())
        below = int(torch.searchsorted(sorted_norms, torch.tensor(n)))
        ang = None
        if init_direction is not None:
            d = init_direction[min(i, init_direction.shape[0] - 1)] if init_direction.dim() == 2 else init_direction
            ang = math.degrees(float(angle(v, d)))
        cos = unit_vocab @ normalize(v)
        top = torch.topk(cos, min(top_k, cos.numel()))
        reports.append(VectorReport(i, n, 100.0 * below / sorted_norms.numel(), ang,
                                    [(int(j), float(c)) for c, j in zip(top.values, top.indices)]))
    summary = {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max()),
               "median": float(norms.median())}
    return reports, summary
