"""The explicit small determinant against LU, and the displacement Jacobian against the point
map's."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unireg.spatial.field import (
    displacement_jacobian_determinant,
    point_map_jacobian_determinant,
    small_determinant,
    world_points,
)
from unireg.spatial.geometry import Geometry


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3]))
def test_small_determinant_is_the_determinant(seed, d) -> None:
    m = torch.randn(64, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(small_determinant(m), torch.linalg.det(m), atol=1e-12)


def test_displacement_jacobian_matches_the_point_map() -> None:
    g = torch.Generator().manual_seed(0)
    affine = np.array([[0.0, -1.5, 0.2, 10.0], [1.2, 0.0, 0.0, -5.0], [0.0, 0.1, 2.0, 3.0],
                       [0.0, 0.0, 0.0, 1.0]])  # fmt: skip
    geom = Geometry((9, 8, 7), affine)
    u = torch.randn(3, 9, 8, 7, dtype=torch.float64, generator=g)
    x = world_points(geom, dtype=torch.float64)
    points = x + u.movedim(0, -1)[None]
    expected = point_map_jacobian_determinant(points)[0] / np.linalg.det(affine[:3, :3])
    got = displacement_jacobian_determinant(u, geom)
    assert torch.allclose(got, expected, atol=1e-10)
    assert torch.allclose(displacement_jacobian_determinant(0 * u, geom), torch.ones(9, 8, 7,
                          dtype=torch.float64))  # fmt: skip
