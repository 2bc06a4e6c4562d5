import math

import pytest
import torch

from dti_core.interpolate import InterpolationError, slerp_embeddings, slerp_vectors
from dti_core.sphere import angle, normalize


def dti(n, width, m, seed):
    return m * normalize(torch.randn(n, width, generator=torch.Generator().manual_seed(seed)))


def test_endpoints_are_exact_copies():
    a, b = dti(2, 768, 0.39, 1), dti(2, 768, 0.39, 2)
    assert torch.equal(slerp_vectors(a, b, 0.0), a)
    assert torch.equal(slerp_vectors(a, b, 1.0), b)


def test_norm_stays_m_star_and_angle_grows_monotonically():
    a, b = dti(3, 768, 0.39, 1), dti(3, 768, 0.39, 2)
    prev = torch.zeros(3)
    for t in [i / 10 for i in range(1, 11)]:
        s = slerp_vectors(a, b, t)
        assert torch.allclose(s.norm(dim=-1), torch.full((3,), 0.39), atol=1e-6)
        ang = angle(a, s)
        assert (ang > prev).all()
        prev = ang


def test_norms_interpolate_linearly_for_different_lengths():
    a, b = dti(1, 16, 1.0, 1), dti(1, 16, 3.0, 2)
    assert slerp_vectors(a, b, 0.25).norm().item() == pytest.approx(1.5, rel=1e-6)


def test_single_vector_pairs_with_every_row_of_the_other_mismatch_refused():
    one, three = dti(1, 16, 1.0, 1), dti(3, 16, 2.0, 2)
    for a, b in ((one, three), (three, one)):
        out = slerp_vectors(a, b, 0.3)
        assert out.shape == (3, 16)
        for k in range(3):
            pair = slerp_vectors(a[k:k + 1] if a.shape[0] == 3 else a, b[k:k + 1] if b.shape[0] == 3 else b, 0.3)
            assert torch.allclose(out[k:k + 1], pair, atol=1e-6, rtol=0), f"row {k} was not paired with its own row"
        # each row is its own blend, not three copies of the first
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    with pytest.raises(InterpolationError, match="2 vectors and B has 3"):
        slerp_vectors(dti(2, 16, 1.0, 1), three, 0.5)


def test_equal_counts_pair_row_by_row():
    a, b = dti(3, 16, 1.0, 3), dti(3, 16, 1.0, 4)
    out = slerp_vectors(a, b, 0.5)
    for k in range(3):
        assert torch.allclose(angle(a[k], out[k]), angle(a[k], b[k]) / 2, atol=1e-5)


def test_identical_antipodal_and_zero():
    a = dti(2, 16, 0.5, 1)
    assert torch.allclose(slerp_vectors(a, a.clone(), 0.3), a, atol=1e-6)
    mid = slerp_vectors(a, -a, 0.5)
    assert torch.isfinite(mid).all()
    assert torch.allclose(angle(a, mid), torch.full((2,), math.pi / 2, dtype=mid.dtype), atol=1e-5)
    with pytest.raises(InterpolationError, match="zero"):
        slerp_vectors(a, torch.zeros(2, 16), 0.5)


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -1.5, 2.5, "x"])
def test_bad_t_refused(t):
    with pytest.raises(InterpolationError, match="t must"):
        slerp_vectors(dti(1, 8, 1, 1), dti(1, 8, 1, 2), t)


def test_extrapolation_inside_the_allowed_range():
    a, b = dti(1, 32, 1.0, 1), dti(1, 32, 1.0, 2)
    s = slerp_vectors(a, b, 1.5)
    assert torch.allclose(angle(a, s), 1.5 * angle(a, b), atol=1e-5)


def test_embedding_level_encoders_must_match_and_norm_gap_warns():
    a = {"clip_l": dti(1, 768, 0.39, 1), "clip_g": dti(1, 1280, 0.6, 2)}
    with pytest.raises(InterpolationError, match="different text encoders"):
        slerp_embeddings(a, {"clip_l": dti(1, 768, 0.39, 3)}, 0.5)
    b = {"clip_l": dti(1, 768, 0.39, 3), "clip_g": dti(1, 1280, 0.6, 4)}
    out, warnings = slerp_embeddings(a, b, 0.5)
    assert set(out) == {"clip_l", "clip_g"} and warnings == []
    ti = {"clip_l": dti(1, 768, 22.0, 5), "clip_g": dti(1, 1280, 0.6, 6)}
    _, warnings = slerp_embeddings(a, ti, 0.5)
    assert len(warnings) == 1 and "clip_l" in warnings[0] and "plain TI" in warnings[0]
