"""Interpolating two embeddings: slerp the directions, interpolate the norms.

Defined behaviour (tested in tests/core/test_interpolate.py):

- per encoder and per vector: direction = ``sphere.slerp(a, b, t)``, norm = ``(1-t)|a| + t|b|``;
- ``t = 0`` / ``t = 1`` return exact copies of A / B;
- ``t`` may extrapolate within ``[T_MIN, T_MAX]``; outside it, or NaN/inf, is an error;
- both embeddings must cover the same encoders (an error names what each has);
- equal vector counts pair up row by row; a single vector pairs with every row of
  the other; any other mismatch is an error;
- identical directions stay put, antipodal ones take a fixed great circle, a zero
  vector is an error;
- norms that differ by more than ``NORM_GAP`` (a plain-TI vector next to a DTI one)
  give a warning: the blend then moves mostly in length, not meaning.
"""

from __future__ import annotations

import math

import torch

from .sphere import ZERO_NORM, slerp

T_MIN, T_MAX = -1.0, 2.0
NORM_GAP = 2.0


class InterpolationError(ValueError):
    pass


def check_t(t: float) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise InterpolationError(f"t must be a number, got {t!r}") from None
    if not math.isfinite(t):
        raise InterpolationError(f"t must be finite, got {t}")
    if not T_MIN <= t <= T_MAX:
        raise InterpolationError(f"t must be between {T_MIN} and {T_MAX} (0 = A, 1 = B), got {t}")
    return t


def slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp directions and interpolate norms of ``(n, d)`` rows; see the module docs."""
    t = check_t(t)
    if a.shape[-1] != b.shape[-1]:
        raise InterpolationError(f"widths differ: {a.shape[-1]} vs {b.shape[-1]}")
    if a.shape[0] != b.shape[0]:
        if a.shape[0] == 1:
            a = a.expand_as(b)
        elif b.shape[0] == 1:
            b = b.expand_as(a)
        else:
            raise InterpolationError(
                f"A has {a.shape[0]} vectors and B has {b.shape[0]}: they must match (or one must have 1)"
            )
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    if bool((na <= ZERO_NORM).any() or (nb <= ZERO_NORM).any()):
        raise InterpolationError("a vector is zero, so it has no direction to interpolate")
    direction = slerp(a.double(), b.double(), t)
    norm = ((1 - t) * na.double() + t * nb.double()).clamp_min(ZERO_NORM)
    return (direction * norm).to(a.dtype)


def slerp_embeddings(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Interpolate two ``{encoder: (n, width)}`` embeddings; returns the result and warnings."""
    if set(a) != set(b):
        raise InterpolationError(
            f"the embeddings cover different text encoders: A has {', '.join(sorted(a))}; "
            f"B has {', '.join(sorted(b))}. Interpolate embeddings made for the same model family."
        )
    out, warnings = {}, []
    for key in sorted(a):
        out[key] = slerp_vectors(a[key], b[key], t)
        na, nb = a[key].norm(dim=-1).mean().item(), b[key].norm(dim=-1).mean().item()
        if max(na, nb) > NORM_GAP * min(na, nb):
            warnings.append(
                f"{key}: the vector norms differ a lot (A {na:.3f}, B {nb:.3f}). One is likely a plain TI "
                f"embedding with an inflated norm; the blend will change mostly in length, not meaning."
            )
    return out, warnings
