import math

import pytest
import torch

from dti_core.sphere import angle, normalize, project_to_tangent, retract, slerp


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randn(*shape, generator=g, dtype=torch.float64))


def test_normalize_gives_unit_rows_and_refuses_zero():
    x = torch.randn(5, 7, dtype=torch.float64) * 3
    assert torch.allclose(normalize(x).norm(dim=-1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero vector"):
        normalize(torch.zeros(3, 4))


def test_tangent_projection_is_orthogonal_to_the_point():
    v = unit(10, 768)
    g = torch.randn(10, 768, dtype=torch.float64)
    t = project_to_tangent(v, g)
    assert (t * v).sum(-1).abs().max() < 1e-12
    # idempotent
    assert torch.allclose(project_to_tangent(v, t), t)


def test_retract_lands_on_sphere():
    v = unit(4, 16) + 0.3 * torch.randn(4, 16, dtype=torch.float64)
    assert torch.allclose(retract(v).norm(dim=-1), torch.ones(4, dtype=torch.float64))


def test_angle_matches_acos_and_is_accurate_at_extremes():
    a, b = unit(6, 32, seed=1), unit(6, 32, seed=2)
    expected = torch.acos((a * b).sum(-1))
    assert torch.allclose(angle(a, b), expected, atol=1e-10)
    assert angle(a, a).abs().max() < 1e-7
    assert torch.allclose(angle(a, -a), torch.full((6,), math.pi, dtype=torch.float64), atol=1e-7)


def test_slerp_endpoints_and_constant_speed():
    a, b = unit(3, 64, seed=3), unit(3, 64, seed=4)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-12)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-12)
    theta = angle(a, b)
    for t in (0.1, 0.25, 0.5, 0.9):
        s = slerp(a, b, t)
        assert torch.allclose(s.norm(dim=-1), torch.ones(3, dtype=torch.float64))
        assert torch.allclose(angle(a, s), t * theta, atol=1e-9)
        assert torch.allclose(angle(s, b), (1 - t) * theta, atol=1e-9)


def test_slerp_extrapolates_outside_unit_interval():
    a, b = unit(1, 16, seed=5), unit(1, 16, seed=6)
    theta = angle(a, b)
    s = slerp(a, b, -0.5)
    assert torch.allclose(angle(s, b), 1.5 * theta, atol=1e-9)
    s = slerp(a, b, 1.5)
    assert torch.allclose(angle(a, s), 1.5 * theta, atol=1e-9)


def test_slerp_identical_vectors_stay_put():
    a = unit(2, 16, seed=7)
    for t in (0.0, 0.3, 1.0, 2.0):
        assert torch.allclose(slerp(a, a.clone() * 5, t), a, atol=1e-12)


def test_slerp_antipodal_follows_the_documented_great_circle():
    a = unit(2, 16, seed=8)
    # Documented choice: the circle through the basis axis least aligned with a.
    axis = torch.zeros_like(a).scatter_(-1, a.abs().argmin(dim=-1, keepdim=True), 1.0)
    u = axis - (axis * a).sum(-1, keepdim=True) * a
    u = u / u.norm(dim=-1, keepdim=True)
    for t in (0.25, 0.5, 0.8):
        s = slerp(a, -a, t)
        expected = math.cos(t * math.pi) * a + math.sin(t * math.pi) * u
        assert torch.allclose(s, expected, atol=1e-9)
    assert torch.allclose(slerp(a, -a, 1.0), -a, atol=1e-9)
    # the same result for a scaled copy: the choice depends on the direction only
    assert torch.allclose(slerp(3 * a, -a, 0.5), u, atol=1e-9)


def test_slerp_refuses_zero_vectors_and_bad_t():
    a = unit(1, 8)
    with pytest.raises(ValueError, match="zero vector"):
        slerp(a, torch.zeros(1, 8, dtype=torch.float64), 0.5)
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            slerp(a, unit(1, 8, seed=1), t)
