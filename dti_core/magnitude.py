"""The fixed norm ``m*`` of the learned vectors, read off the vocabulary."""

from __future__ import annotations

import math

import torch

MODES = ("mean", "max", "min")
_NORM_ROWS = 16384


def vocabulary_norms(vocab: torch.Tensor) -> torch.Tensor:
    """Norms of the non-zero rows of a ``(vocab, width)`` token-embedding matrix.

    Zero rows are unused or padding slots; counting them would drag the mean down.
    """
    if vocab.dim() != 2:
        raise ValueError(f"vocabulary matrix must be 2-D (tokens, width), got shape {tuple(vocab.shape)}")
    # Row blocks: a float32 copy of a 256000 x 2304 table (Gemma-2) would cost 2.4 GB at once.
    norms = torch.cat([rows.float().norm(dim=-1) for rows in vocab.detach().split(_NORM_ROWS)])
    norms = norms[norms > 0]
    if norms.numel() == 0:
        raise ValueError("vocabulary matrix has no non-zero rows")
    return norms


def target_norm(vocab: torch.Tensor | None, mode: str | float) -> float:
    """``m*`` as the mean, max or min non-zero row norm of ``vocab``, or a given number."""
    if isinstance(mode, (int, float)) and not isinstance(mode, bool):
        value = float(mode)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"a fixed magnitude must be a positive finite number, got {mode!r}")
        return value
    if mode not in MODES:
        raise ValueError(f"magnitude must be one of {', '.join(MODES)} or a positive number, got {mode!r}")
    if vocab is None:
        raise ValueError(f"magnitude '{mode}' needs the vocabulary embedding matrix")
    norms = vocabulary_norms(vocab)
    return float(getattr(norms, mode)())
