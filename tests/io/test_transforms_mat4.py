"""The MATLAB level-4 writer of ``affine.mat``: the bytes scipy.io writes, read back by
scipy.io and by ANTs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.io

from unireg.io.transforms import load_affine, matlab_v4, save_affine
from unireg.spatial.transform import AffineTransform


def test_matlab_v4_bytes_are_scipys():
    params = np.arange(12.0) * 0.37 - 1
    fixed = np.array([1.5, -2.0, 3.25])
    ours = matlab_v4({"AffineTransform_double_3_3": params, "fixed": fixed})
    ref = io.BytesIO()
    scipy.io.savemat(ref, {"AffineTransform_double_3_3": params.reshape(-1, 1),
                           "fixed": fixed.reshape(-1, 1)}, format="4")  # fmt: skip
    assert ours == ref.getvalue()
    back = scipy.io.loadmat(io.BytesIO(ours))
    assert np.array_equal(back["fixed"].ravel(), fixed)


def test_affine_mat_round_trip_and_ants_reads_it(tmp_path):
    m = np.eye(4)
    m[:3, :3] = [[0.9, -0.2, 0.1], [0.25, 1.1, 0.0], [-0.1, 0.05, 0.95]]
    m[:3, 3] = [4.0, -7.5, 2.25]
    path = save_affine(AffineTransform(m), tmp_path / "a.mat")
    assert np.allclose(load_affine(path).matrix.numpy(), m, atol=1e-12)
    ants = pytest.importorskip("ants")
    tx = ants.read_transform(str(path))
    # ANTs maps LPS points: the RAS map conjugated by diag(-1, -1, 1)
    flip = np.diag([-1.0, -1.0, 1.0])
    p = np.array([10.0, -20.0, 30.0])
    expected = flip @ (m[:3, :3] @ (flip @ p) + m[:3, 3])
    assert np.allclose(tx.apply_to_point(tuple(p)), expected, atol=1e-9)
