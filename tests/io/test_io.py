"""Image I/O: formats, world geometry, reorientation, resampling, named errors, atomic writes."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import oblique_affine, shared_file, smooth_image

from unireg.errors import (
    DimensionalityError,
    EmptyFileError,
    GridMismatchError,
    ImageNotFoundError,
    LabelValueError,
    NonFiniteError,
    UniregError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from unireg.io import (
    Image,
    LabelMap,
    crop_or_pad,
    load_image,
    load_image_and_labels,
    load_labels,
    normalize_intensity,
    reorient,
    resample,
    save_image,
    write_atomic,
)
from unireg.spatial import Geometry, transform_points, voxel_grid


def make_image(shape=(12, 10, 8), affine=None, seed=0) -> Image:
    affine = oblique_affine((1.0, 1.5, 2.5), (10, 0, -5), (-5, 3, 7)) if affine is None else affine
    return Image(smooth_image(shape, seed=seed)[0].float(), affine)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz"])
def test_round_trip_keeps_data_and_affine(tmp_path, suffix):
    img = make_image()
    path = save_image(img, tmp_path / f"img{suffix}")
    back = load_image(path)
    assert back.path == path and back.shape == img.shape
    torch.testing.assert_close(back.data, img.data)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    assert back.spacing == pytest.approx((1.0, 1.5, 2.5), abs=1e-5)
    assert leftovers(tmp_path) == [f"img{suffix}"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".mgz"])
def test_label_round_trip_keeps_values_and_integer_type(tmp_path, suffix):
    data = torch.tensor([0, 2, 60, 530]).repeat(60).view(1, 6, 8, 5)
    labels = LabelMap(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    back = load_labels(save_image(labels, tmp_path / f"lab{suffix}"))
    assert isinstance(back, LabelMap) and back.is_label
    assert torch.equal(back.data, data)
    on_disk = nib.load(tmp_path / f"lab{suffix}").get_data_dtype()
    assert np.issubdtype(on_disk, np.integer)


def test_2d_image_round_trip(tmp_path):
    affine = np.array([[0.5, 0.0, -10.0], [0.0, 0.8, 4.0], [0.0, 0.0, 1.0]])
    img = Image(smooth_image((20, 16))[0].float(), affine)
    back = load_image(save_image(img, tmp_path / "slice.nii.gz"), ndim=2)
    assert back.ndim == 2
    np.testing.assert_allclose(back.affine, affine)
    torch.testing.assert_close(back.data, img.data)
    # a 2D slice stored as (X, Y, 1) is read as 2D when asked
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 1), np.float32), np.eye(4)), tmp_path / "s.nii")
    assert load_image(tmp_path / "s.nii", ndim=2).shape == (5, 6)


def test_multichannel_needs_permission(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), tmp_path / "c.nii")
    with pytest.raises(DimensionalityError, match="single-channel"):
        load_image(tmp_path / "c.nii")
    assert load_image(tmp_path / "c.nii", channels=True).data.shape == (3, 4, 5, 6)


# ------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such image file") as info:
        load_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(EmptyFileError, match="empty.nii.gz: image file is empty"):
        load_image(tmp_path / "empty.nii.gz")


def test_zero_voxel_image(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), tmp_path / "z.nii")
    with pytest.raises(EmptyFileError, match="no voxels"):
        load_image(tmp_path / "z.nii")


@pytest.mark.parametrize(
    "content", [b"not an image at all" * 30, gzip.compress(b"garbage" * 100)[:50]]
)
def test_unreadable_file(tmp_path, content):
    (tmp_path / "bad.nii.gz").write_bytes(content)
    with pytest.raises(UnreadableFileError, match="bad.nii.gz: cannot read image"):
        load_image(tmp_path / "bad.nii.gz")


def test_truncated_file(tmp_path):
    path = save_image(make_image(), tmp_path / "t.nii")
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(UnreadableFileError, match="t.nii"):
        load_image(path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(UnsupportedFormatError, match=r"img.png: unsupported image extension"):
        load_image(tmp_path / "img.png")
    with pytest.raises(UnsupportedFormatError):
        save_image(make_image(), tmp_path / "out.jpg")
    assert leftovers(tmp_path) == ["img.png"]


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5, 2, 2), (2, 3, 4, 5, 6, 7)])
def test_wrong_dimensionality(tmp_path, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / "w.nii")
    with pytest.raises(DimensionalityError, match="w.nii"):
        load_image(tmp_path / "w.nii", channels=True)


def test_expected_dimensionality(tmp_path):
    save_image(make_image(), tmp_path / "v.nii.gz")
    with pytest.raises(DimensionalityError, match="expected a 2D image"):
        load_image(tmp_path / "v.nii.gz", ndim=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    arr = np.ones((5, 5, 5), np.float32)
    arr[2, 3, 1] = bad
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "n.nii.gz")
    with pytest.raises(NonFiniteError, match="n.nii.gz: 1 voxels are NaN or infinite"):
        load_image(tmp_path / "n.nii.gz")


def test_non_finite_data_is_not_written(tmp_path):
    img = make_image()
    img.data[0, 1, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        save_image(img, tmp_path / "o.nii.gz")
    assert leftovers(tmp_path) == []


def test_label_grid_mismatch(tmp_path):
    img = make_image()
    save_image(img, tmp_path / "img.nii.gz")
    lab = LabelMap(torch.zeros(1, *img.shape, dtype=torch.long), img.affine + 0.0)
    lab.affine[0, 3] += 2.0  # shifted by 2 mm
    save_image(lab, tmp_path / "shifted.nii.gz")
    with pytest.raises(GridMismatchError, match="shifted.nii.gz: label map affine differs"):
        load_image_and_labels(tmp_path / "img.nii.gz", tmp_path / "shifted.nii.gz")
    save_image(LabelMap(torch.zeros(1, 4, 4, 4, dtype=torch.long), img.affine), tmp_path / "s.nii")
    with pytest.raises(GridMismatchError, match="s.nii: label map shape"):
        load_image_and_labels(tmp_path / "img.nii.gz", tmp_path / "s.nii")


def test_non_integer_label_map(tmp_path):
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 1.5, np.float32), np.eye(4)), tmp_path / "l.nii")
    with pytest.raises(LabelValueError, match="non-integer"):
        load_labels(tmp_path / "l.nii")


def test_all_named_errors_are_unireg_errors():
    for cls in (ImageNotFoundError, EmptyFileError, UnreadableFileError, NonFiniteError):
        assert issubclass(cls, UniregError)


# ------------------------------------------------------------------------------------ atomicity


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous content")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_bytes() == b"previous content"
    assert leftovers(tmp_path) == ["out.nii.gz"]


def test_write_into_missing_folder_is_a_named_error(tmp_path):
    with pytest.raises(ImageNotFoundError, match="output folder does not exist"):
        save_image(make_image(), tmp_path / "missing" / "o.nii.gz")


# ----------------------------------------------------------------------- geometry operations


def _world_of_voxels(img: Image) -> torch.Tensor:
    return transform_points(img.affine, voxel_grid(img.shape, dtype=torch.float64))


def test_reorient_to_ras_keeps_every_voxel_in_place():
    # an LPI-ish oblique image
    affine = np.array([[0, 0, -2.0, 50], [-1.5, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 0, 1]])
    img = Image(torch.arange(4 * 5 * 6, dtype=torch.float32).view(1, 4, 5, 6), affine)
    ras = reorient(img)
    assert "".join(nib.aff2axcodes(ras.affine)) == "RAS"
    assert ras.shape == (6, 4, 5)  # R from axis 2 (L), A from axis 0 (P), S from axis 1
    # the value at each world position is unchanged
    world_src = _world_of_voxels(img).reshape(-1, 3)
    vox_dst = transform_points(np.linalg.inv(ras.affine), world_src).round().long()
    vals = ras.data[0][vox_dst[:, 0], vox_dst[:, 1], vox_dst[:, 2]]
    assert torch.equal(vals, img.data.reshape(-1))
    assert reorient(ras) is ras


def test_resampling_preserves_world_coordinates_across_anisotropic_oblique_grids():
    src = Geometry((40, 36, 24), oblique_affine((1.0, 1.2, 2.0), (0, 0, 0), (-20, -20, -24)))
    # a blob at a known world point in the source image
    p_world = np.array([2.0, -3.0, 1.5])
    # a rotated, flipped, anisotropic target grid whose field of view holds that point off-centre
    dst_affine = oblique_affine((1.5, 0.9, 1.1), (25, -15, 170), (0, 0, 0))
    dst_affine[:3, 3] = p_world - dst_affine[:3, :3] @ np.array([13.0, 20.5, 17.0])
    dst = Geometry((30, 44, 40), dst_affine)
    p_src = transform_points(src.world_to_voxel, torch.from_numpy(p_world))
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in src.shape], indexing="ij")
    spacing = torch.tensor(src.spacing, dtype=torch.float64)
    r2 = sum(((a - c) * s) ** 2 for a, c, s in zip(axes, p_src, spacing, strict=True))
    img = Image(torch.exp(-r2 / (2 * 3.0**2))[None].float(), src.affine)
    out = resample(img, dst)
    w = out.data[0].double()
    grid = voxel_grid(dst.shape, dtype=torch.float64)[0]
    centroid_vox = (grid * w[..., None]).sum((0, 1, 2)) / w.sum()
    centroid_world = transform_points(dst.affine, centroid_vox).numpy()
    # measured 7e-6 mm (voxels are 0.9-2 mm): the blob lands where it was in world space
    assert np.linalg.norm(centroid_world - p_world) < 0.01


def test_resample_picks_nearest_for_label_maps():
    img = make_image()
    labels = LabelMap((img.data > img.data.mean()).long() * 7, img.affine)
    dst = Geometry((9, 13, 10), oblique_affine((1.3, 1.1, 2.0), (5, 5, 5), (-4, 4, 8)))
    out = resample(labels, dst)
    assert isinstance(out, LabelMap)
    assert set(out.data.unique().tolist()) <= {0, 7}
    np.testing.assert_array_equal(out.affine, dst.affine)
    with pytest.raises(ValueError):
        resample(img, dst, mode="onehot")


def test_crop_or_pad_keeps_world_positions():
    img = make_image((12, 10, 8))
    out = crop_or_pad(img, (8, 14, 8))  # crop axis 0, pad axis 1
    assert out.shape == (8, 14, 8)
    # voxel (i, j, k) of the output is voxel (i + 2, j - 2, k) of the input, at the same world point
    np.testing.assert_allclose(out.affine @ [0, 2, 0, 1], img.affine @ [2, 0, 0, 1])
    torch.testing.assert_close(out.data[:, 0:8, 2:12, :], img.data[:, 2:10, 0:10, :])
    assert (out.data[:, :, :2] == 0).all() and (out.data[:, :, 12:] == 0).all()
    # crop then pad back gives the original on the kept region and the original grid
    back = crop_or_pad(out, img.shape)
    np.testing.assert_allclose(back.affine, img.affine)
    torch.testing.assert_close(back.data[:, 2:10], img.data[:, 2:10])


def test_normalize_intensity_is_robust():
    data = torch.linspace(0, 100, 1001).view(1, 7, 11, 13)[..., :13]
    data = torch.cat([data.flatten(), torch.tensor([1e6])])[: 7 * 11 * 13].view(1, 7, 11, 13)
    data.view(-1)[0] = 1e6  # one outlier must not squash the range
    img = Image(data, np.eye(4))
    out = normalize_intensity(img, lower=1, upper=99).data
    assert out.min() == 0 and out.max() == 1
    assert 0.3 < out.median() < 0.7
    const = normalize_intensity(Image(torch.ones(1, 3, 3, 3), np.eye(4))).data
    assert (const == 0).all()


def test_reorient_real_scans_and_resample_back_exactly():
    """IXI is stored PSR and SynthSeg LIA: to RAS and back onto the original grid is lossless."""
    t1 = load_image(shared_file("ixi", "t1", "IXI012-HH-1211-T1_ds.nii.gz"))
    assert "".join(nib.aff2axcodes(t1.affine)) == "PSR"
    ras = reorient(t1)
    assert "".join(nib.aff2axcodes(ras.affine)) == "RAS"
    # grid nodes land on grid nodes: only float32 rounding of the sample points remains
    back = resample(ras, t1).data
    assert (back - t1.data).abs().max() < 1e-5 * t1.data.abs().max()
    seg = load_labels(shared_file("synthseg", "training_seg_01.nii.gz"))
    assert "".join(nib.aff2axcodes(seg.affine)) == "LIA"
    seg_ras = reorient(seg)
    assert isinstance(seg_ras, LabelMap) and seg_ras.labels() == seg.labels()
    assert torch.equal(resample(seg_ras, seg).data, seg.data)
