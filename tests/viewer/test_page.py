"""The HTML report's volumes and page (unireg.viewer.page), without a browser."""

from __future__ import annotations

import base64
import gzip
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from unireg.io.image import Image, LabelMap
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import AffineTransform, DisplacementFieldTransform
from unireg.viewer.page import (
    LOGJAC_STEP,
    Keypoints,
    build_report,
    fold_mask,
    grid_sheets,
    label_centres,
    label_outline,
    marker_volume,
    nifti_base64,
    report_grid,
    world_axes,
)


def decode(b64: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))


def page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="unireg-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_outline_keeps_boundaries_with_their_label():
    lab = np.zeros((7, 7, 7), np.uint8)
    lab[1:6, 1:6, 1:6] = 3
    lab[3, 3, 3] = 5
    out = label_outline(lab)
    # the cube's shell and the single inner voxel are boundaries; the rest of its inside is not
    assert out[1, 3, 3] == 3 and out[5, 5, 5] == 3 and out[3, 3, 3] == 5
    assert out[2, 3, 3] == 3  # face neighbour of the label-5 voxel
    assert out[2, 2, 2] == 0 and out[0, 0, 0] == 0
    # in-plane: along axes 0 and 1 only, a slab one voxel thick in axis 2 keeps its inside
    slab = np.zeros((6, 6, 3), np.uint8)
    slab[1:5, 1:5, 1] = 2
    assert label_outline(slab)[2, 2, 1] == 2  # 3D: every slab voxel touches axis-2 background
    assert label_outline(slab, (0, 1))[2, 2, 1] == 0
    assert label_outline(slab, (0, 1))[1, 2, 1] == 2


def test_label_centres_lie_inside_their_label():
    lab = np.zeros((20, 20, 3), np.int16)
    lab[2:18, 2:5, 1] = 7  # a C shape: its centroid is outside it
    lab[2:5, 2:18, 1] = 7
    lab[15:18, 2:18, 1] = 7
    lab[8:12, 10:14, 1] = 9
    geom = Geometry(
        (20, 20, 3), np.diag([2.0, 2.0, 2.0, 1.0]) + np.c_[np.zeros((4, 3)), [10, 0, 0, 0]]
    )
    centres = label_centres(lab, geom)
    assert set(centres) == {7, 9}
    for k, mm in centres.items():
        vox = np.round(geom.world_to_voxel[:3, :3] @ mm + geom.world_to_voxel[:3, 3]).astype(int)
        assert lab[tuple(vox)] == k
    assert np.allclose(centres[9], [10 + 2 * 9.5 - 1, 2 * 11.5 - 1, 2.0], atol=1.01)


def test_fold_mask_marks_report_voxels_holding_a_fold():
    geom = Geometry((16, 16, 16), np.eye(4))
    det = torch.ones(16, 16, 16)
    det[5, 9, 2] = -0.1
    coarse = report_grid(geom, 4.0)
    mask = fold_mask(det, geom, coarse)
    assert mask.shape == coarse.shape and mask.sum() >= 1
    world = np.array([5.0, 9.0, 2.0])
    v = np.round(coarse.world_to_voxel[:3, :3] @ world + coarse.world_to_voxel[:3, 3]).astype(int)
    assert mask[tuple(v)] == 1
    assert mask.sum() <= 8  # only around the one fold
    assert fold_mask(torch.ones(16, 16, 16), geom, coarse).sum() == 0


def test_report_grid_never_refines():
    fine = Geometry((200, 100, 50), np.diag([1.0, 1.0, 3.0, 1.0]))
    g = report_grid(fine, 2.0)
    assert np.allclose(g.spacing, (2.0, 2.0, 3.0)) and g.shape == (100, 50, 50)
    assert np.allclose(g.center_world, fine.center_world)
    assert report_grid(fine, 0.5) is fine
    with pytest.raises(ValueError):
        report_grid(fine, 0.0)


def test_grid_sheets_follow_the_map_and_name_the_fixed_axis():
    geom = Geometry((40, 40, 40), np.eye(4))
    world = torch.from_numpy(np.indices(geom.shape).astype(np.float32))
    sheets = grid_sheets(world, geom, spacing_mm=10.0)
    # identity: sheets at x, y or z = 0, 10, 20, 30 with the values of their axes
    assert sheets[10, 3, 7] == 1 and sheets[3, 20, 7] == 2 and sheets[3, 7, 30] == 3
    assert sheets[3, 4, 7] == 0
    # a 90-degree turn about S: moving x is fixed -y, so moving x-sheets lie across fixed y
    turned = torch.stack([-world[1], world[0], world[2]])
    sheets = grid_sheets(turned, geom, spacing_mm=10.0)
    assert sheets[3, 10, 7] == 2 and sheets[20, 3, 7] == 1


def test_marker_volume_puts_spheres_and_segments_where_the_points_are():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20, -20, -20]
    geom = Geometry((21, 21, 21), affine)
    a, b = np.array([[0.0, 0.0, 0.0]]), np.array([[10.0, 0.0, 0.0]])
    vol = marker_volume([(a, 1), (b, 2)], geom, radius_vox=1.0, segments=(a, b, 3))
    assert vol[10, 10, 10] == 1 and vol[15, 10, 10] == 2
    assert vol[12, 10, 10] == 3 and vol[13, 10, 10] == 3  # the line between them
    assert vol[10, 12, 10] == 0
    assert (vol == 1).sum() == 7  # a radius-1 ball: the centre and its 6 face neighbours


def test_nifti_round_trip_keeps_data_geometry_and_scaling():
    geom = Geometry(
        (5, 6, 7), np.array([[0, -2, 0, 3], [1.5, 0, 0, -4], [0, 0, 2.5, 1], [0, 0, 0, 1.0]])
    )
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) - 100
    img = decode(nifti_base64(data, geom, slope=0.25))
    assert np.array_equal(np.asarray(img.dataobj.get_unscaled()), data)
    assert np.allclose(img.affine, geom.affine) and img.header["sform_code"] == 1
    assert np.allclose(img.get_fdata(), data * 0.25)
    # gzip without a time stamp: the same volume gives the same bytes
    assert nifti_base64(data, geom) == nifti_base64(data, geom)


def test_world_axes_of_an_oblique_lia_grid():
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    assert world_axes(Geometry((4, 5, 6), lia)) == [0, 2, 1]


def _pair():
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -30
    g = torch.Generator().manual_seed(0)
    fixed = Image(torch.rand(1, 20, 20, 20, generator=g) * 100, affine)
    moving = Image(torch.rand(1, 18, 20, 22, generator=g) * 50 + 10, affine)
    lab = torch.zeros(1, 20, 20, 20, dtype=torch.int16)
    lab[0, 4:10, 4:16, 4:16] = 2
    lab[0, 10:16, 4:16, 4:16] = 300
    return fixed, moving, LabelMap(lab, affine)


def test_report_page_is_self_contained_and_carries_the_registration():
    fixed, moving, labels = _pair()
    geom = fixed.geometry
    u = torch.zeros(3, *geom.shape)
    u[0, 10, 10, 10] = 9.0  # a spike along R: folds just past it (du/dx = -9 mm / 6 mm)
    transform = DisplacementFieldTransform(u, geom)
    metrics = {"dice_mean": 0.5, "dice_2": 0.9, "dice_300": 0.1, "hd95_2": 1.0, "hd95_300": 7.0,
               "spec": "syn", "method": "syn", "inputs": {"fixed": {"path": "/x/f.nii.gz"}},
               "folding_percent": 0.1}  # fmt: skip
    kp = Keypoints(np.array([[0.0, 0, 0]]), np.array([[-15.0, 0, 0]]), np.array([[12.0, 0, 0]]))
    page = build_report(fixed, moving, transform, metrics=metrics, fixed_labels=labels,
                        keypoints=kp, resolution=2.0, title="a <b> test",
                        label_names={300: "</script> cortex"})  # fmt: skip
    # offline: every script inline, nothing loaded from anywhere, a CSP that forbids it
    assert "default-src 'none'" in page
    assert not re.search(r"<(script|img|link|iframe)[^>]*\s(src|href)=", page)
    assert "<title>a &lt;b&gt; test</title>" in page
    data = page_data(page)
    assert [r["label"] for r in data["labels"]] == [300, 2]  # worst Dice first
    assert data["labels"][0]["hd95"] == 7.0 and data["labels"][0]["centre"] is not None
    # names reach the table; a name cannot end the data's script element
    assert data["labels"][0]["name"] == "</script> cortex" and data["labels"][1]["name"] is None
    assert "</script> cortex" not in page
    assert data["metrics"]["dice_mean"] == 0.5 and "dice_2" not in data["metrics"]
    assert data["settings"]["spec"] == "syn" and "inputs" in data["settings"]
    assert data["folded_voxels"] > 0
    vols = {k: decode(v) for k, v in data["volumes"].items()}
    # the 3 mm inputs are kept at 3 mm (never refined to the 2 mm asked for)
    assert vols["fixed"].shape == (20, 20, 20) and vols["moving"].shape == (18, 20, 22)
    assert np.asarray(vols["folds"].dataobj)[11, 10, 10] == 1
    assert np.asarray(vols["folds"].dataobj).sum() == data["folded_voxels"] == 1
    logjac = vols["logjac"].get_fdata()
    assert abs(logjac[2, 2, 2]) < LOGJAC_STEP and logjac[11, 10, 10] == -2  # folded: the floor
    outline = np.asarray(vols["outline"].dataobj)
    assert set(np.unique(outline)) == {0, 2, 300} and outline.dtype == np.int16
    kpm = np.asarray(vols["kp_moving"].dataobj)
    assert set(np.unique(kpm)) == {0, 1, 2, 3}
    assert data["keypoints"]["residual_mm"] == [27.0]


def test_warped_volume_is_the_moving_image_through_the_transform():
    fixed, moving, _ = _pair()
    shift = np.eye(4)
    shift[0, 3] = 6.0  # fixed world -> moving world: 6 mm along R
    page = build_report(fixed, moving, AffineTransform(shift), resolution=3.0)
    data = page_data(page)
    warped = np.asarray(decode(data["volumes"]["warped"]).dataobj).astype(float)
    moving8 = np.asarray(decode(data["volumes"]["moving"]).dataobj).astype(float)
    # same grid spacing: voxel i of warped shows voxel i + 2 of the moving image
    assert np.array_equal(warped[:10], moving8[2:12, :, :20])
    assert "outline" not in data["volumes"] and data["labels"] == []


def test_the_shipped_niivue_bundle_is_the_recorded_one():
    import hashlib
    from importlib import resources

    static = resources.files("unireg.viewer").joinpath("static")
    record = json.loads(static.joinpath("niivue.json").read_text())
    bundle = static.joinpath("niivue.umd.js").read_bytes()
    assert hashlib.sha256(bundle).hexdigest() == record["sha256"]
    assert record["package"] == "@niivue/niivue" and record["integrity"].startswith("sha512-")
    assert b"</script" not in bundle.lower()  # safe to inline
    assert "BSD 2-Clause" in static.joinpath("NIIVUE-LICENSE.txt").read_text()
