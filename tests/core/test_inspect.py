"""DTI Inspect's numbers on a vocabulary small enough to work out by hand."""

import math

import pytest
import torch

from dti_core.inspect import inspect_vectors


def vocab():
    # 6 rows in R^3; row 5 is zero (unused) and does not count.
    return torch.tensor([
        [1.0, 0.0, 0.0],   # 0: norm 1, along x
        [0.0, 2.0, 0.0],   # 1: norm 2, along y
        [0.0, 0.0, 3.0],   # 2: norm 3, along z
        [4.0, 4.0, 0.0],   # 3: norm 5.657, 45 deg between x and y
        [0.0, -0.5, 0.0],  # 4: norm 0.5, along -y
        [0.0, 0.0, 0.0],
    ])


def test_percentile_angle_in_degrees_and_nearest_ids():
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    vectors = torch.tensor([
        [2.5 * c, 2.5 * s, 0.0],  # norm 2.5: 3 of 5 non-zero rows are shorter (0.5, 1, 2) -> 60 %
        [0.0, 0.0, 0.1],          # norm 0.1: shorter than every row -> 0 %
    ])
    init = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    reports, summary = inspect_vectors(vocab(), vectors, init, top_k=3)
    assert [r.index for r in reports] == [0, 1]
    assert reports[0].norm == pytest.approx(2.5) and reports[1].norm == pytest.approx(0.1)
    assert reports[0].percentile == pytest.approx(60.0) and reports[1].percentile == pytest.approx(0.0)
    assert reports[0].angle_to_init_deg == pytest.approx(30.0, abs=1e-4)  # degrees, against init row 0
    assert reports[1].angle_to_init_deg == pytest.approx(90.0, abs=1e-4)  # against init row 1
    # vector 0 at 30 deg from x: x (cos 0.866), then the 45-deg row (cos 0.966) ranks first, then y (0.5)
    assert [i for i, _ in reports[0].nearest] == [3, 0, 1]
    assert [c for _, c in reports[0].nearest] == pytest.approx([math.cos(math.radians(15)), c, s], abs=1e-6)
    assert reports[1].nearest[0] == (2, pytest.approx(1.0))
    assert summary == pytest.approx({"mean": (1 + 2 + 3 + 32 ** 0.5 + 0.5) / 5, "min": 0.5,
                                     "max": 32 ** 0.5, "median": 2.0})


def test_single_init_direction_serves_every_vector_and_none_gives_no_angle():
    vectors = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    reports, _ = inspect_vectors(vocab(), vectors, torch.tensor([1.0, 0.0, 0.0]), top_k=1)
    assert [r.angle_to_init_deg for r in reports] == pytest.approx([90.0, 45.0], abs=1e-4)
    assert [r.nearest[0][0] for r in reports] == [1, 3]
    reports, _ = inspect_vectors(vocab(), vectors, None, top_k=1)
    assert all(r.angle_to_init_deg is None for r in reports)
