"""Transform files: ITK/ANTs affines and displacement fields, without ANTs itself."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
import torch
from conftest import oblique_affine, smooth_field

from unireg.errors import (
    EmptyFileError,
    ImageNotFoundError,
    NonFiniteError,
    TransformFormatError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from unireg.io import (
    load_affine,
    load_displacement_field,
    load_transform,
    load_transforms,
    save_affine,
    save_displacement_field,
    save_transform,
)
from unireg.spatial import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Geometry,
    displacement_to_world,
    random_affine,
)


def world_affine(ndim: int, seed: int = 0) -> AffineTransform:
    m = random_affine(
        ndim,
        rotation=30,
        translation=12,
        scale=(0.8, 1.2),
        shear=0.1,
        seed=seed,
        dtype=torch.float64,
    )[0]
    return AffineTransform(m)


@pytest.mark.parametrize("suffix", [".mat", ".txt", ".tfm"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_round_trip(tmp_path, suffix, ndim):
    t = world_affine(ndim)
    back = load_affine(save_affine(t, tmp_path / f"a{suffix}"))
    np.testing.assert_allclose(back.matrix.numpy(), t.matrix.numpy(), atol=1e-12)
    assert [p.name for p in tmp_path.iterdir()] == [f"a{suffix}"]


def test_itk_text_transform_hand_computed(tmp_path):
    """ITK: p' = A (p - c) + c + t in LPS. With A = [[1,.1,0],[0,1,0],[0,0,1.2]], t = (1,2,3),
    c = (4,5,6): the LPS origin goes to (0.5, 2, 1.8), i.e. RAS (0,0,0) -> (-0.5, -2, 1.8)."""
    (tmp_path / "t.txt").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 1 0.1 0 0 1 0 0 0 1.2 1 2 3\nFixedParameters: 4 5 6\n"
    )
    t = load_affine(tmp_path / "t.txt")
    out = t.map_points(torch.zeros(1, 3, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), [[-0.5, -2.0, 1.8]], atol=1e-12)
    # the same transform as an ANTs MATLAB v4 file
    scipy.io.savemat(
        tmp_path / "t.mat",
        {
            "AffineTransform_float_3_3": np.array([1, 0.1, 0, 0, 1, 0, 0, 0, 1.2, 1, 2, 3.0])[
                :, None
            ],
            "fixed": np.array([[4.0], [5.0], [6.0]]),
        },
        format="4",
    )
    np.testing.assert_allclose(load_affine(tmp_path / "t.mat").matrix, t.matrix, atol=1e-12)


def test_mat_file_layout_is_what_ants_writes(tmp_path):
    save_affine(world_affine(3), tmp_path / "a.mat")
    content = scipy.io.loadmat(tmp_path / "a.mat")
    assert content["AffineTransform_double_3_3"].shape == (12, 1)
    assert content["fixed"].shape == (3, 1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_round_trip_and_layout(tmp_path, ndim):
    shape = (10, 12, 8)[:ndim]
    aff3 = oblique_affine((1.0, 1.5, 2.0), (0, 0, 30 if ndim == 2 else 0), (-5, 4, 3))
    affine = aff3 if ndim == 3 else aff3[np.ix_([0, 1, 3], [0, 1, 3])]
    geom = Geometry(shape, affine)
    field = displacement_to_world(smooth_field(shape, 0.2), geom, geom)[0].float()
    t = DisplacementFieldTransform(field, geom)
    path = save_displacement_field(t, geom, tmp_path / "w.nii.gz")
    img = nib.load(path)
    assert img.shape == ((*shape, 1, 3) if ndim == 3 else (*shape, 1, 1, 2))
    assert img.header.get_intent()[0] == "vector" and img.get_data_dtype() == np.float32
    raw = np.asarray(img.dataobj).reshape(*shape, ndim)
    # components are stored in LPS: first two flipped relative to RAS
    np.testing.assert_allclose(raw[..., 0], -field[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(
        raw[..., ndim - 1], field[ndim - 1].numpy() * (1 if ndim == 3 else -1), atol=1e-6
    )
    back = load_displacement_field(path)
    assert back.geometry.same_grid(geom)
    torch.testing.assert_close(back.field, field, atol=1e-6, rtol=0)


def test_affine_written_as_field_gives_same_mapping(tmp_path):
    geom = Geometry((9, 8, 7), oblique_affine((2.0, 1.0, 1.5), (5, 5, 5), (1, 2, 3)))
    t = world_affine(3, seed=2)
    back = load_transform(save_transform(t, tmp_path / "f.nii.gz", reference=geom))
    a = t.moving_points(geom, geom, dtype=torch.float64)
    b = back.moving_points(geom, geom, dtype=torch.float64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_load_transforms_chains_in_ants_order(tmp_path):
    shift = np.eye(4)
    shift[0, 3] = 5.0
    save_affine(AffineTransform(shift), tmp_path / "shift.mat")
    save_affine(AffineTransform(np.diag([2.0, 1, 1, 1])), tmp_path / "scale.txt")
    chain = load_transforms([tmp_path / "shift.mat", tmp_path / "scale.txt"])
    assert isinstance(chain, CompositeTransform)
    p = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert chain.map_points(p)[0, 0].item() == pytest.approx(12.0)  # scale(shift(p))


def test_transform_file_errors(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such transform file"):
        load_transform(tmp_path / "none.mat")
    (tmp_path / "e.mat").write_bytes(b"")
    with pytest.raises(EmptyFileError, match="e.mat"):
        load_transform(tmp_path / "e.mat")
    (tmp_path / "x.h5").write_bytes(b"abc")
    with pytest.raises(UnsupportedFormatError, match="x.h5"):
        load_transform(tmp_path / "x.h5")
    (tmp_path / "c.mat").write_bytes(b"\x00\x01garbage" * 20)
    with pytest.raises((UnreadableFileError, TransformFormatError), match="c.mat"):
        load_transform(tmp_path / "c.mat")
    (tmp_path / "r.txt").write_text(
        "#Insight Transform File V1.0\nTransform: Euler3DTransform_double_3_3\n"
        "Parameters: 0 0 0 1 2 3\nFixedParameters: 0 0 0\n"
    )
    with pytest.raises(TransformFormatError, match="Euler3DTransform.*not supported"):
        load_transform(tmp_path / "r.txt")
    (tmp_path / "n.txt").write_text(
        "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 nan 0 0\n"
        "FixedParameters: 0 0 0\n"
    )
    with pytest.raises(NonFiniteError, match="n.txt"):
        load_transform(tmp_path / "n.txt")
    (tmp_path / "s.txt").write_text(
        "Transform: AffineTransform_double_3_3\nParameters: 1 0 0\nFixedParameters: 0 0 0\n"
    )
    with pytest.raises(TransformFormatError, match="needs 12 parameters"):
        load_transform(tmp_path / "s.txt")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "f.nii")
    with pytest.raises(TransformFormatError, match="not an ITK displacement field"):
        load_transform(tmp_path / "f.nii")
    with pytest.raises(TransformFormatError, match="only affine"):
        save_transform(
            DisplacementFieldTransform(torch.zeros(3, 2, 2, 2), Geometry((2, 2, 2), np.eye(4))),
            tmp_path / "o.mat",
        )
    bad = AffineTransform(np.eye(4))
    bad.matrix[0, 3] = float("inf")
    with pytest.raises(NonFiniteError):
        save_affine(bad, tmp_path / "inf.mat")
    assert not (tmp_path / "o.mat").exists() and not (tmp_path / "inf.mat").exists()


def test_sheared_reference_grid_warns(tmp_path):
    affine = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    geom = Geometry((4, 4, 4), affine)
    with pytest.warns(UserWarning, match="shear"):
        save_transform(AffineTransform(np.eye(4)), tmp_path / "f.nii.gz", reference=geom)


def test_inverse_specs(tmp_path):
    from unireg.io.transforms import parse_transform_spec

    assert parse_transform_spec("[a/b.mat,1]") == (Path("a/b.mat"), True)
    assert parse_transform_spec("[ a.mat , 0 ]") == (Path("a.mat"), False)
    assert parse_transform_spec(("x.txt", True)) == (Path("x.txt"), True)
    assert parse_transform_spec("w.nii.gz") == (Path("w.nii.gz"), False)
    t = world_affine(3, seed=3)
    save_affine(t, tmp_path / "a.mat")
    chain = load_transforms([tmp_path / "a.mat", f"[{tmp_path / 'a.mat'},1]"])
    p = torch.randn(5, 3, dtype=torch.float64) * 50
    torch.testing.assert_close(chain.map_points(p), p)
    geom = Geometry((3, 3, 3), np.eye(4))
    save_transform(t, tmp_path / "f.nii.gz", reference=geom)
    with pytest.raises(TransformFormatError, match="only affine transforms can be inverted"):
        load_transforms([f"[{tmp_path / 'f.nii.gz'},1]"])
