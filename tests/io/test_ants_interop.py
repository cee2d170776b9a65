"""Interoperability with the real ANTsPy (``antspyx``) on real brains from ../shared/data.

unireg -> ANTs: transforms written by unireg, applied by ``ants.apply_transforms``, reproduce
unireg's own warp. ANTs -> unireg: transforms written by ``ants.registration`` are read and
applied by unireg with the same result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import smooth_field
from scipy.ndimage import binary_erosion

from unireg.io import (
    Image,
    load_affine,
    load_image,
    load_labels,
    load_transforms,
    resample,
    save_affine,
    save_image,
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

ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install -e '.[test]')")


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def interior_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest |ours - theirs| away from the field-of-view rim (where ITK cuts off at the last
    voxel and unireg blends with the zero padding), relative to the image range."""
    inside = binary_erosion((ours != 0) & (theirs != 0), iterations=2)
    assert inside.sum() > 1000  # a substantial region is compared
    return float(np.abs(ours - theirs)[inside].max() / np.abs(theirs).max())


def nonlinear_transform(geom: Geometry, seed: int = 0) -> CompositeTransform:
    """A random affine about the image centre followed by a smooth field of up to ~6 mm."""
    affine = random_affine(
        geom.ndim,
        rotation=20,
        translation=8,
        scale=(0.9, 1.1),
        shear=0.05,
        seed=seed,
        center=torch.tensor(geom.center_world),
        dtype=torch.float64,
    )[0]
    field = displacement_to_world(smooth_field(geom.shape, 0.05, seed=seed), geom, geom)[0]
    return CompositeTransform(
        [DisplacementFieldTransform(field.float(), geom), AffineTransform(affine)]
    )


def test_unireg_transforms_applied_by_ants_match_unireg(tmp_path, ixi_pair, ixi_labels):
    fixed_path, moving_path = ixi_pair
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    fa, ma = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    t = nonlinear_transform(fixed.geometry)

    # dense transform as an ITK displacement field
    save_transform(t, tmp_path / "transform.nii.gz", reference=fixed.geometry)
    ours = resample(moving, fixed, t).data[0].numpy()
    theirs = ants.apply_transforms(fa, ma, [str(tmp_path / "transform.nii.gz")]).numpy()
    assert corr(ours, theirs) > 0.999
    assert interior_difference(ours, theirs) < 1e-4

    # the affine part alone as .mat and .txt
    affine = t.transforms[1]
    for name in ("affine.mat", "affine.txt"):
        save_affine(affine, tmp_path / name)
        ours = resample(moving, fixed, affine).data[0].numpy()
        theirs = ants.apply_transforms(fa, ma, [str(tmp_path / name)]).numpy()
        assert corr(ours, theirs) > 0.999, name
        assert interior_difference(ours, theirs) < 1e-4, name

    # label maps: nearest neighbour in both tools
    labels = load_labels(ixi_labels)
    warped = resample(labels, fixed, t).data[0].numpy()
    theirs = ants.apply_transforms(
        fa,
        ants.image_read(str(ixi_labels)),
        [str(tmp_path / "transform.nii.gz")],
        interpolator="nearestNeighbor",
    ).numpy()
    assert set(np.unique(warped)) <= set(labels.labels())
    assert np.mean(warped == theirs) > 0.999  # measured: every voxel agrees


@pytest.fixture(scope="module")
def ants_registration(tmp_path_factory, request):
    from conftest import shared_file

    fixed_path = shared_file("ixi", "t1", "IXI012-HH-1211-T1_ds.nii.gz")
    moving_path = shared_file("ixi", "t1", "IXI013-HH-1212-T1_ds.nii.gz")
    out = tmp_path_factory.mktemp("ants")
    fa, ma = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    reg = ants.registration(
        fa, ma, "SyN", reg_iterations=(20, 10, 0), outprefix=str(out / "reg_"), random_seed=1
    )
    return fixed_path, moving_path, fa, ma, reg


@pytest.mark.slow
def test_ants_registration_read_and_applied_by_unireg(ants_registration):
    fixed_path, moving_path, fa, ma, reg = ants_registration
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    theirs = ants.apply_transforms(fa, ma, reg["fwdtransforms"]).numpy()
    ours = resample(moving, fixed, load_transforms(reg["fwdtransforms"])).data[0].numpy()
    assert corr(ours, theirs) > 0.999
    assert interior_difference(ours, theirs) < 1e-4
    # the order matters: the reversed chain is a different (wrong) transform
    wrong = resample(moving, fixed, load_transforms(reg["fwdtransforms"][::-1])).data[0].numpy()
    assert corr(wrong, theirs) < corr(ours, theirs) - 0.02


def test_ants_inverse_transforms_read_by_unireg(ants_registration):
    fixed_path, moving_path, fa, ma, reg = ants_registration
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    affine_path, inverse_warp = reg["invtransforms"]
    theirs = ants.apply_transforms(
        ma, fa, reg["invtransforms"], whichtoinvert=[True, False]
    ).numpy()
    chain = CompositeTransform(
        [load_affine(affine_path).inverse(), load_transforms([inverse_warp])]
    )
    ours = resample(fixed, moving, chain).data[0].numpy()
    assert corr(ours, theirs) > 0.999
    assert interior_difference(ours, theirs) < 1e-4


def test_2d_transforms_match_ants(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.nn.functional.interpolate(
        torch.rand(1, 1, 8, 8, generator=g), size=(64, 56), mode="bicubic", align_corners=True
    )[0]
    # rotated, flipped, anisotropic (no shear: ITK cannot represent a sheared grid)
    affine = np.array([[1.0, 0.0, 20.0], [0.0, 1.0, -15.0], [0.0, 0.0, 1.0]])
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    affine[:2, :2] = rot @ np.diag([-0.9, 1.1])
    img = Image(data, affine)
    save_image(img, tmp_path / "img.nii.gz")
    t = nonlinear_transform(img.geometry, seed=3)
    save_transform(t, tmp_path / "t.nii.gz", reference=img.geometry)
    save_affine(t.transforms[1], tmp_path / "a.mat")
    ai = ants.image_read(str(tmp_path / "img.nii.gz"))
    assert ai.dimension == 2
    for name, tr in (("t.nii.gz", t), ("a.mat", t.transforms[1])):
        ours = resample(img, img, tr).data[0].numpy()
        theirs = ants.apply_transforms(ai, ai, [str(tmp_path / name)]).numpy()
        assert corr(ours, theirs) > 0.99, name  # small image: the FOV rim weighs more
        assert interior_difference(ours, theirs) < 1e-4, name


@pytest.mark.slow
def test_different_oblique_anisotropic_grids_match_ants(tmp_path):
    """IXI002: T2 (256x256x130, 0.94x0.94x1.25 mm, oblique) onto T1 (150x256x256, 1.2x0.94x0.94,
    another oblique grid): plain resampling and a transform, unireg against ANTs."""
    from conftest import shared_file

    t1_path = shared_file("ixi002-t1t2", "hd_bet_IXI002-Guys-0828-T1.nii.gz")
    t2_path = shared_file("ixi002-t1t2", "hd_bet_IXI002-Guys-0828-T2.nii.gz")
    t1, t2 = load_image(t1_path), load_image(t2_path)
    assert t1.shape != t2.shape and t1.spacing != t2.spacing
    a1, a2 = ants.image_read(str(t1_path)), ants.image_read(str(t2_path))
    # a change of grid alone
    ours = resample(t2, t1).data[0].numpy()
    theirs = ants.resample_image_to_target(a2, a1, interp_type="linear").numpy()
    assert corr(ours, theirs) > 0.999
    assert interior_difference(ours, theirs) < 1e-4
    # a nonlinear transform written on the T1 grid, applied to the T2 image
    t = nonlinear_transform(t1.geometry, seed=5)
    save_transform(t, tmp_path / "t.nii.gz", reference=t1.geometry)
    ours = resample(t2, t1, t).data[0].numpy()
    theirs = ants.apply_transforms(a1, a2, [str(tmp_path / "t.nii.gz")]).numpy()
    assert corr(ours, theirs) > 0.999
    assert interior_difference(ours, theirs) < 1e-4


def test_2d_ants_registration_read_by_unireg(tmp_path):
    """ANTs' own 2D SyN output on two real T1 slices, applied by unireg."""
    from conftest import shared_file

    fa = ants.image_read(str(shared_file("antspy", "r16slice.jpg")))
    ma = ants.image_read(str(shared_file("antspy", "r64slice.jpg")))
    ants.image_write(fa, str(tmp_path / "fixed.nii.gz"))
    ants.image_write(ma, str(tmp_path / "moving.nii.gz"))
    reg = ants.registration(
        fa, ma, "SyN", reg_iterations=(20, 10, 0), outprefix=str(tmp_path / "r_"), random_seed=1
    )
    fixed = load_image(tmp_path / "fixed.nii.gz", ndim=2)
    moving = load_image(tmp_path / "moving.nii.gz", ndim=2)
    theirs = ants.apply_transforms(fa, ma, reg["fwdtransforms"]).numpy()
    ours = resample(moving, fixed, load_transforms(reg["fwdtransforms"])).data[0].numpy()
    assert corr(ours, theirs) > 0.999
    assert interior_difference(ours, theirs) < 1e-4


def test_cli_inverse_syntax_matches_ants_whichtoinvert(tmp_path, ants_registration):
    from unireg.cli import main

    fixed_path, moving_path, fa, ma, reg = ants_registration
    affine_path, inverse_warp = reg["invtransforms"]
    out = tmp_path / "inv.nii.gz"
    args = [f"[{affine_path},1]", inverse_warp, str(fixed_path), "-r", str(moving_path)]
    assert main(["apply", *args, "-o", str(out), "-q"]) == 0
    theirs = ants.apply_transforms(ma, fa, reg["invtransforms"], whichtoinvert=[True, False])
    ours = load_image(out).data[0].numpy()
    assert corr(ours, theirs.numpy()) > 0.999
    assert interior_difference(ours, theirs.numpy()) < 1e-4


def test_jacobian_and_inverse_consistency_of_ants_syn(ants_registration):
    """unireg's world Jacobian of ANTs' SyN warp against ANTs' own Jacobian determinant, and
    the consistency of ANTs' forward and inverse warps measured by unireg."""
    from unireg.metrics import consistency_error, jacobian_stats, transform_jacobian

    fixed_path, _, fa, _, reg = ants_registration
    fixed = load_image(fixed_path)
    warp = load_transforms([reg["fwdtransforms"][0]])
    theirs = ants.create_jacobian_determinant_image(fa, reg["fwdtransforms"][0]).numpy()
    ours = transform_jacobian(warp, fixed.geometry).numpy()
    inner = (slice(2, -2),) * 3  # one-sided differences at the border differ by scheme
    diff = np.abs(ours - theirs)[inner]
    assert corr(ours[inner], theirs[inner]) > 0.999  # measured 0.99987
    assert diff.mean() < 0.005  # measured 0.0018
    assert jacobian_stats(torch.from_numpy(ours))["folding_percent"] == 0.0
    # SyN's forward and inverse warps (both on the fixed side of the affine) compose to the
    # identity to a small fraction of a voxel (2 mm)
    inverse_warp = load_transforms([reg["invtransforms"][1]])
    err = consistency_error([warp, inverse_warp], fixed.geometry)
    assert err["mean_mm"] < 0.1  # measured 0.015
