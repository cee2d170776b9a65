"""Data: manifests, preprocessing in world space, the disk cache, pairs, seeded augmentation
and label-map synthesis."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, oblique_affine, shared_file, smooth_image
from torch.utils.data import DataLoader

from unireg.data import (
    Augmentation,
    LabelSynthesis,
    Manifest,
    PairDataset,
    Preprocessing,
    VolumeDataset,
    apply_affine,
    inter_subject_pairs,
    same_subject_pairs,
)
from unireg.errors import ManifestError
from unireg.io.image import Image, LabelMap, save_image
from unireg.spatial.geometry import Geometry

HEADER = "dataset,subject,modality,image,labels,split\n"


def _volume(tmp_path, name, affine, shape=(30, 26, 22), center_vox=(14.0, 12.0, 9.0)):
    """An image with a Gaussian blob and a label map (sphere) on the same grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r2 = (((idx - np.array(center_vox)) ** 2) * np.array([1.0, 1.0, 1.0])).sum(-1)
    data = np.exp(-r2 / (2 * 3.0**2)).astype(np.float32) * 100
    labels = np.where(r2 < 16, 3, np.where(r2 < 36, 8, 0))
    img_path = tmp_path / f"{name}.nii.gz"
    lab_path = tmp_path / f"{name}_labels.nii.gz"
    save_image(Image(torch.from_numpy(data)[None], affine), img_path)
    save_image(LabelMap(torch.from_numpy(labels)[None], affine), lab_path)
    return img_path, lab_path


def test_manifest_reads_the_shared_example():
    Manifest.read(shared_file("manifest.csv"))
    m = Manifest.read(SHARED_DATA / "manifest.csv")
    ixi_test = m.select(dataset="ixi", split="test")
    assert len(ixi_test) == 3 and all(e.image.is_file() for e in ixi_test)
    synth = m.select(dataset="synthseg")
    assert len(synth) == 20 and all(e.image is None and e.labels is not None for e in synth)
    assert len(m.select(dataset="ixi", split=["train", "test"], with_labels=True)) == 10


def test_manifest_errors_name_file_and_line(tmp_path):
    img, lab = _volume(tmp_path, "s1", np.eye(4))
    good = tmp_path / "good.csv"
    good.write_text(HEADER + f"d,s1,T1,{img.name},{lab.name},train\n")
    m = Manifest.read(good)
    assert m[0].image == img and m[0].labels == lab  # relative to the manifest's folder
    cases = {
        "dataset,subject,image\nd,s,x\n": "missing column",
        HEADER + "d,s1,T1,missing.nii.gz,,train\n": "line 2: image file",
        HEADER + f"d,s1,T1,{img.name},,train\nd,s2,T1,,,test\n": "line 3: neither",
        HEADER + f"d,,T1,{img.name},,train\n": "line 2: empty subject",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(ManifestError, match=message) as info:
            Manifest.read(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(ManifestError, match="no such manifest"):
        Manifest.read(tmp_path / "nope.csv")


def test_preprocessing_keeps_world_positions(tmp_path):
    affine = oblique_affine((1.2, 0.9, 1.6), (15, -10, 25), (-20, 12, 5))
    img_path, lab_path = _volume(tmp_path, "s", affine)
    from unireg.io.image import load_image, load_labels

    image, labels = load_image(img_path), load_labels(lab_path)
    blob_world = affine[:3, :3] @ np.array([14.0, 12.0, 9.0]) + affine[:3, 3]
    for center in ("fov", "mass"):
        pre = Preprocessing(spacing=1.0, shape=(40, 40, 40), center=center, normalize=False)
        out, out_lab = pre(image, labels)
        assert np.allclose(out.affine[:3, :3], np.eye(3))  # RAS-aligned, 1 mm
        w = out.data[0].double()
        idx = torch.meshgrid(
            *[torch.arange(n, dtype=torch.float64) for n in w.shape], indexing="ij"
        )
        com_vox = np.array([float((w * i).sum() / w.sum()) for i in idx])
        com_world = out.affine[:3, :3] @ com_vox + out.affine[:3, 3]
        assert np.linalg.norm(com_world - blob_world) < 0.1
        assert set(out_lab.data.unique().tolist()) <= {0, 3, 8}
        # label centre of mass lands on the blob too
        lab = (out_lab.data[0] > 0).double()
        lab_vox = np.array([float((lab * i).sum() / lab.sum()) for i in idx])
        assert np.linalg.norm(out.affine[:3, :3] @ lab_vox + out.affine[:3, 3] - blob_world) < 0.5
    mass = Preprocessing(spacing=1.0, shape=(40, 40, 40), center="mass")
    geom = mass.target_geometry(image)
    assert np.linalg.norm(geom.center_world - blob_world) < 0.1
    full = Preprocessing(spacing=2.0, shape=None).target_geometry(image)
    assert min(full.shape) >= 10  # covers the rotated field of view


def test_mass_centre_is_the_heads_on_a_dark_bright_or_noisy_background():
    """``center="mass"`` weighs each voxel by its intensity's distance from the background's
    (the median of the grid's faces): the grid lands on the object whether the air around it
    is dark or bright (a contrast that inverts it), and noise in the air pulls it towards the
    middle of the field of view less than weighing by the intensity above the minimum did
    (which on the bright background lands centimetres off)."""
    from conftest import gaussian_blob

    from unireg.io.preprocessing import Preprocessing, face_median

    shape = (40, 36, 32)
    blob = gaussian_blob(shape, (12.0, 24.0, 20.0), 4.0)
    affine = oblique_affine((1.5, 1.2, 2.0), (10, -5, 20), (-30, 12, 5))
    truth = affine[:3, :3] @ np.array([12.0, 24.0, 20.0]) + affine[:3, 3]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    pre = Preprocessing(spacing=2.0, shape=(24, 24, 24), center="mass")
    errors = {}
    for name, data in {
        "dark": blob,
        "bright": 2.0 - blob,
        "noisy": 0.2 + blob + 0.01 * noise,
    }.items():
        centre = pre.target_geometry(Image(data[None].float(), affine)).center_world
        w = data - data.min()  # the former weights
        vox = np.array([float((w * i).sum() / w.sum()) for i in idx])
        former = affine[:3, :3] @ vox + affine[:3, 3]
        errors[name] = (np.linalg.norm(centre - truth), np.linalg.norm(former - truth))  # mm
    assert errors["dark"][0] < 0.2 and errors["bright"][0] < 0.2
    assert errors["bright"][1] > 10.0
    assert errors["noisy"][0] < 0.5 * errors["noisy"][1]
    assert abs(face_median(2.0 - blob) - 2.0) < 1e-6


def test_volume_dataset_cache(tmp_path, monkeypatch):
    affine = oblique_affine((1.0, 1.0, 1.5), (0, 0, 10), (0, 0, 0))
    rows = []
    for s in ("a", "b", "c"):
        img, lab = _volume(tmp_path, s, affine)
        rows.append(f"d,{s},T1,{img.name},{lab.name},train\n")
    (tmp_path / "m.csv").write_text(HEADER + "".join(rows))
    manifest = Manifest.read(tmp_path / "m.csv")
    pre = Preprocessing(spacing=2.0, shape=(16, 16, 12))
    cache = tmp_path / "cache"
    ds = VolumeDataset(manifest, pre, cache_dir=cache)
    first = ds[0]
    assert ds.cache_path(0).is_file()
    assert first["image"].shape == (1, 16, 16, 12) and first["labels"].dtype == torch.int64
    assert 0.0 <= float(first["image"].min()) and float(first["image"].max()) == 1.0

    def boom(index):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(ds, "_compute", boom)
    again = ds[0]
    assert torch.equal(again["image"], first["image"])
    assert torch.equal(again["labels"], first["labels"])
    monkeypatch.undo()
    uncached = VolumeDataset(manifest, pre)[0]
    assert torch.equal(uncached["image"], first["image"])
    # a modified source file or other settings never hit the old cache entry
    old = ds.cache_path(0)
    st = os.stat(manifest[0].image)
    os.utime(manifest[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ds.cache_path(0) != old
    other = VolumeDataset(manifest, Preprocessing(spacing=1.5, shape=(16, 16, 12)), cache)
    assert other.cache_path(1) != ds.cache_path(1)
    # a corrupt cache file is recomputed
    ds[1]
    ds.cache_path(1).write_bytes(b"garbage")
    assert ds[1]["image"].shape == (1, 16, 16, 12)
    # pairs batch with the default collate
    pairs = PairDataset(ds, inter_subject_pairs(manifest))
    assert len(pairs) == 6
    batch = next(iter(DataLoader(pairs, batch_size=4)))
    assert batch["fixed"]["image"].shape == (4, 1, 16, 16, 12)
    assert batch["fixed"]["subject"] != batch["moving"]["subject"]
    assert ds.image(2).geometry.shape == (16, 16, 12) and ds.labels(2).is_label


def test_pair_samplers_on_the_shared_manifest():
    m = Manifest.read(shared_file("manifest.csv"))
    ixi = m.select(dataset="ixi", split="test")
    assert len(inter_subject_pairs(ixi)) == 6
    assert len(inter_subject_pairs(ixi, ordered=False)) == 3
    t1t2 = m.select(dataset="ixi002")
    pairs = same_subject_pairs(t1t2)
    assert sorted(pairs) == [(0, 1), (1, 0)]
    assert inter_subject_pairs(t1t2) == []


def test_ixi_at_2mm_from_cache(tmp_path):
    m = Manifest.read(shared_file("manifest.csv")).select(dataset="ixi", split="test")
    ds = VolumeDataset(m, Preprocessing(spacing=2.0, shape=(96, 112, 96)), cache_dir=tmp_path)
    item = ds[0]
    assert item["image"].shape == (1, 96, 112, 96)
    assert item["labels"].shape == (1, 96, 112, 96)
    assert len(item["labels"].unique()) > 100  # the DLMUSE regions survive the resampling
    # the brain is inside the crop: labels do not touch the border
    lab = item["labels"][0] > 0
    assert not lab[0].any() and not lab[-1].any() and not lab[:, 0].any()


def test_augmentation_same_seed_same_sample():
    img = smooth_image((20, 18, 16), seed=1).float()
    lab = (img > 0.5).long() * 5
    aug = Augmentation(
        rotation=180,
        translation=5,
        scale=(0.9, 1.1),
        shear=0.05,
        bias_field=0.3,
        noise=0.05,
        gamma=0.3,
    )
    a = aug(img, lab, seed=7, spacing=(1.0, 1.2, 2.0))
    b = aug(img, lab, seed=7, spacing=(1.0, 1.2, 2.0))
    c = aug(img, lab, seed=8, spacing=(1.0, 1.2, 2.0))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["image"], c["image"])
    assert set(a["labels"].unique().tolist()) <= {0, 5}
    torch.manual_seed(3)
    d = aug(img, lab)
    torch.manual_seed(3)
    e = aug(img, lab)
    assert torch.equal(d["image"], e["image"])  # unseeded calls follow torch.manual_seed


def test_augmentation_rotation_is_rigid_in_mm_and_matrix_is_the_one_used():
    shape, spacing = (20, 16, 12), (1.0, 1.5, 2.5)
    img = smooth_image(shape, seed=2).float()
    lab = (img > 0.4).long() * 2
    out = Augmentation(rotation=90)(img, lab, seed=1, spacing=spacing)
    m = out["matrix"][0].numpy()
    geom = Geometry(shape, np.diag([*spacing, 1.0]))
    world = geom.normalized_to_world @ m @ geom.world_to_normalized
    lin = world[:3, :3]
    assert np.allclose(lin @ lin.T, np.eye(3), atol=1e-9) and np.linalg.det(lin) > 0
    assert np.allclose(world[:3, :3] @ geom.center_world + world[:3, 3], geom.center_world)
    again_img, again_lab = apply_affine(img, lab, out["matrix"])
    assert torch.equal(again_img, out["image"]) and torch.equal(again_lab, out["labels"])


def test_intensity_augmentations():
    img = smooth_image((16, 16, 16), seed=3).float() + 0.1
    biased = Augmentation(bias_field=0.5)(img, seed=1)["image"]
    ratio = biased / img
    assert float(ratio.min()) > 0 and float(ratio.std()) > 0.01
    # the bias field is smooth: neighbouring ratios differ by a fraction of its whole range
    step = float((ratio[..., 1:] - ratio[..., :-1]).abs().max())
    assert step < 0.25 * float(ratio.max() - ratio.min())
    gam = Augmentation(gamma=0.5)(img, seed=2)["image"]
    assert float(gam.min()) == pytest.approx(float(img.min()))
    assert float(gam.max()) == pytest.approx(float(img.max()))
    noisy = Augmentation(noise=0.2)(img, seed=3)["image"]
    assert 0 < float((noisy - img).std()) < 0.2


def test_synthesis_regions_have_the_drawn_intensities():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 1, 4, 5, 6), generator=g) * 10
    labels = labels.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    # the Gaussian-mixture stage alone: no deformation and no acquisition corruption
    mixture_only = dict(
        deformation=0, blur=0, resolution=1, bias_field=0, noise=0, gamma=0, normalize=False
    )
    exact = LabelSynthesis(std_range=(0.0, 0.0), **mixture_only)
    out = exact(labels, seed=3)
    assert out["label_values"].tolist() == [0, 10, 20, 30, 40]
    for bi in range(2):
        for k, v in enumerate(out["label_values"].tolist()):
            region = out["image"][bi, 0][labels[bi, 0] == v]
            assert torch.allclose(region, torch.full_like(region, float(out["means"][bi, k])))
    noisy = LabelSynthesis(std_range=(0.05, 0.1), **mixture_only)
    out = noisy(labels, seed=4)
    for k, v in enumerate(out["label_values"].tolist()):
        region = out["image"][0, 0][labels[0, 0] == v].double()
        n = region.numel()
        mean, std = float(out["means"][0, k]), float(out["stds"][0, k])
        assert abs(float(region.mean()) - mean) < 5 * std / n**0.5
        assert float(region.std()) == pytest.approx(std, rel=0.25)
    a = LabelSynthesis()(labels, seed=5)
    b = LabelSynthesis()(labels, seed=5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], labels)  # the default deforms the anatomy
    assert set(a["labels"].unique().tolist()) <= {0, 10, 20, 30, 40}
    with pytest.raises(TypeError, match="integer"):
        exact(labels.float())


def test_degrade_resolution_blurs_only_the_drawn_axes():
    """A lower acquisition resolution along one axis removes detail along that axis alone:
    an image varying along the other axes only is unchanged, a fine pattern along it is
    smoothed away, and a probability of 0 leaves the image as it is."""
    from unireg.data.synthesis import degrade_resolution

    n = 24
    fine = (torch.arange(n) % 2).float()  # one-voxel stripes
    along_x = fine.view(1, 1, n, 1, 1).expand(1, 1, n, n, n).contiguous()
    along_z = fine.view(1, 1, 1, 1, n).expand(1, 1, n, n, n).contiguous()
    g = torch.Generator().manual_seed(0)
    assert degrade_resolution(along_x, g, 3.0, probability=0.0) is along_x
    for seed in range(5):
        # draw order: (use, factor) per axis; find a seed degrading x alone
        g = torch.Generator().manual_seed(seed)
        draws = torch.rand(6, generator=g, dtype=torch.float64)
        if not (draws[0] < 0.5 and draws[2] >= 0.5 and draws[4] >= 0.5):
            continue
        out_x = degrade_resolution(along_x, torch.Generator().manual_seed(seed), 4.0)
        out_z = degrade_resolution(along_z, torch.Generator().manual_seed(seed), 4.0)
        assert torch.allclose(out_z, along_z, atol=1e-6)  # z untouched
        assert float(out_x.std()) < 0.25 * float(along_x.std())  # the stripes smoothed away
        assert float(out_x.mean()) == pytest.approx(float(along_x.mean()), abs=0.05)
        break
    else:
        pytest.fail("no seed in 0-4 degrades the first axis alone")


def test_synthesis_on_a_real_label_map():
    m = Manifest.read(shared_file("manifest.csv")).select(dataset="synthseg", subject="synthseg_03")
    labels = VolumeDataset(m, Preprocessing(spacing=2.0, shape=(80, 96, 80)))[0]["labels"][None]
    out = LabelSynthesis()(labels, seed=11)
    image, deformed = out["image"][0, 0], out["labels"][0, 0]
    assert image.shape == (80, 96, 80) and 0 <= float(image.min()) and float(image.max()) <= 1
    # the drawn means order the regions: rank correlation of per-region medians (eroded
    # interiors of regions larger than 200 voxels) with the drawn means, despite blur, bias
    # field, resolution loss, noise and gamma
    from scipy import ndimage, stats

    medians, drawn = [], []
    for k, v in enumerate(out["label_values"].tolist()):
        region = ndimage.binary_erosion((deformed == v).numpy(), iterations=1)
        if region.sum() > 200:
            medians.append(float(image.numpy()[region].mean()))
            drawn.append(float(out["means"][0, k]))
    assert len(medians) > 15
    rho = stats.spearmanr(medians, drawn).statistic
    assert rho > 0.9, rho


def test_cli_synthesize(tmp_path, capsys):
    import pickle

    from unireg.cli import main
    from unireg.io.image import load_image, load_labels

    affine = oblique_affine((1.0, 1.2, 1.5), (5, 0, -5), (3, 2, 1))
    _, lab = _volume(tmp_path, "s", affine)
    out, out_lab = tmp_path / "synth.nii.gz", tmp_path / "synth_labels.nii.gz"
    args = ["synthesize", str(lab), "-o", str(out), "--labels-output", str(out_lab), "--seed", "3"]
    assert main(args) == 0
    image, labels = load_image(out), load_labels(out_lab)
    assert np.allclose(image.affine, affine, atol=1e-5) and image.shape == (30, 26, 22)
    assert set(labels.data.unique().tolist()) <= {0, 3, 8}
    assert main([*args[:3], str(tmp_path / "again.nii.gz"), "--seed", "3", "-q"]) == 0
    assert torch.equal(load_image(tmp_path / "again.nii.gz").data, image.data)
    assert main(["synthesize", str(tmp_path / "none.nii.gz"), "-o", str(out)]) == 1
    assert "none.nii.gz" in capsys.readouterr().err
    # datasets pickle (DataLoader workers)
    (tmp_path / "m.csv").write_text(HEADER + f"d,s,T1,,{lab.name},train\n")
    ds = VolumeDataset(Manifest.read(tmp_path / "m.csv"), Preprocessing(shape=(8, 8, 8)))
    assert pickle.loads(pickle.dumps(ds))[0]["labels"].shape == (1, 8, 8, 8)
