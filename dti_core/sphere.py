"""Geometry of the unit sphere, on the last dimension of a tensor.

Every function treats ``x[..., :]`` as one vector, so a ``(n, d)`` tensor is
``n`` points on the sphere in ``R^d``. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import math

import torch

# Below this norm a vector has no usable direction.
ZERO_NORM = 1e-12
# Angles closer than this to 0 or pi use the explicit fallbacks in slerp.
PARALLEL_EPS = 1e-6


def normalize(x: torch.Tensor, eps: float = ZERO_NORM) -> torch.Tensor:
    """Return ``x / ||x||`` along the last dimension.

    Raises ``ValueError`` for a zero vector instead of returning NaN, since a
    zero vector has no direction to keep.
    """
    norm = x.norm(dim=-1, keepdim=True)
    if bool((norm <= eps).any()):
        raise ValueError("cannot normalise a zero vector: it has no direction")
    return x / norm


def project_to_tangent(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Project ``g`` onto the tangent space of the sphere at ``v`` (``||v|| = 1``)."""
    return g - (g * v).sum(dim=-1, keepdim=True) * v


def retract(v: torch.Tensor) -> torch.Tensor:
    """Map a point moved off the sphere back onto it (the normalisation retraction)."""
    return v / v.norm(dim=-1, keepdim=True)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in radians between the directions of ``a`` and ``b``.

    Uses ``atan2(||a x b||, a.b)`` in its n-dimensional form, which stays
    accurate near 0 and pi where ``acos`` of a clamped cosine does not.
    """
    a = normalize(a)
    b = normalize(b)
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def _orthogonal_to(a: torch.Tensor) -> torch.Tensor:
    """A deterministic unit vector orthogonal to unit vector ``a`` (last dim)."""
    # Pick the basis axis least aligned with ``a`` so the projection is well conditioned.
    idx = a.abs().argmin(dim=-1, keepdim=True)
    e = torch.zeros_like(a).scatter_(-1, idx, 1.0)
    return normalize(project_to_tangent(a, e))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between the directions of ``a`` and ``b``.

    Returns unit vectors. ``t`` may lie outside ``[0, 1]``: the geodesic is
    extended (t = -0.5 walks away from ``b`` by half the angle). Edge cases:

    - identical (or parallel) directions: returns that direction for every t;
    - antipodal directions: the great circle is not unique, so a deterministic
      one is chosen (through the basis axis least aligned with ``a``);
    - a zero vector or a non-finite ``t``: ``ValueError``.
    """
    if not math.isfinite(float(t)):
        raise ValueError(f"slerp t must be a finite number, got {t!r}")
    a = normalize(a)
    b = normalize(b)
    a, b = torch.broadcast_tensors(a, b)
    cos = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = angle(a, b).unsqueeze(-1)

    # Direction of b seen from a, inside the plane they span.
    perp = b - cos * a
    perp_norm = perp.norm(dim=-1, keepdim=True)
    antipodal = theta > math.pi - PARALLEL_EPS
    if bool(antipodal.any()):
        fallback = _orthogonal_to(a)
        perp = torch.where(antipodal, fallback, perp)
        perp_norm = torch.where(antipodal, torch.ones_like(perp_norm), perp_norm)
    parallel = theta < PARALLEL_EPS
    u = torch.where(parallel, torch.zeros_like(perp), perp / perp_norm.clamp_min(ZERO_NORM))
    out = torch.cos(t * theta) * a + torch.sin(t * theta) * u
    return retract(out)
