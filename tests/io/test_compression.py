"""NIfTI outputs at a chosen gzip level: valid .nii.gz at every level, byte-identical when
written twice, and the registration result's files written in parallel."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from unireg.io import Image, load_displacement_field, load_image, save_image
from unireg.io.files import write_nibabel
from unireg.result import RegistrationResult
from unireg.spatial.transform import AffineTransform, DisplacementFieldTransform


def _image() -> Image:
    g = torch.Generator().manual_seed(0)
    return Image(torch.rand(1, 12, 10, 8, generator=g), np.diag([2.0, 2.0, 3.0, 1.0]))


@pytest.mark.parametrize("level", [0, 1, 9])
def test_every_level_reads_back_exactly(tmp_path, level) -> None:
    img = _image()
    path = save_image(img, tmp_path / "a.nii.gz", compresslevel=level)
    with gzip.open(path) as fh:  # a real gzip stream, stored or compressed
        assert len(fh.read()) > 0
    back = load_image(path)
    assert torch.equal(back.data, img.data)
    np.testing.assert_allclose(back.affine, img.affine)


def test_levels_trade_size_and_files_are_reproducible(tmp_path) -> None:
    labels = Image(torch.zeros(1, 40, 40, 40, dtype=torch.int16), np.eye(4))
    stored = save_image(labels, tmp_path / "l0.nii.gz", compresslevel=0).stat().st_size
    packed = save_image(labels, tmp_path / "l1.nii.gz", compresslevel=1).stat().st_size
    assert packed < stored / 10  # a constant map compresses; level 0 stores it
    again = save_image(labels, tmp_path / "l1b.nii.gz", compresslevel=1)
    assert again.read_bytes() == (tmp_path / "l1.nii.gz").read_bytes()  # no timestamp inside


def test_bad_level_refused_and_nothing_written(tmp_path) -> None:
    nimg = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="0-9"):
        write_nibabel(nimg, tmp_path / "x.nii.gz", 10)
    assert list(tmp_path.iterdir()) == []


def _result() -> RegistrationResult:
    img = _image()
    field = torch.randn(3, *img.shape, generator=torch.Generator().manual_seed(1))
    transform = DisplacementFieldTransform(field, img.geometry)
    return RegistrationResult(
        transform=transform, fixed=img.geometry, moving=img.geometry,
        inverse=AffineTransform(np.eye(4)), warped=img,
    )  # fmt: skip


def test_parallel_save_writes_every_file_once(tmp_path) -> None:
    res = _result()
    written = res.save(tmp_path, compresslevel=0)
    assert set(written) == {"warped", "transform", "inverse_transform"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written.values())
    back = load_displacement_field(written["transform"])
    pts = torch.rand(50, 3, dtype=torch.float64) * 10
    assert torch.allclose(back.map_points(pts), res.transform.map_points(pts), atol=1e-4)


def test_failed_parallel_save_leaves_nothing(tmp_path) -> None:
    res = _result()
    res.warped = Image(torch.full((1, *res.fixed.shape), float("nan")), res.fixed.affine)
    with pytest.raises(Exception, match="NaN"):
        res.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []
