"""Anatomical keypoint targets for label maps of another labelling (SynthSeg's whole-head
maps): where the centroids of the IXI subjects' DLMUSE labels lie in each such subject.

KeyMorph's anatomical-keypoint training (``anatomical_steps``) needs, for every training
subject, the centroid of each keypoint's DLMUSE label. SynthSeg's maps carry FreeSurfer aseg
labels instead. For each of them this script draws a T1-like brain image from the map (a
fixed intensity per aseg class, zero outside the brain), registers every IXI training
subject's brain-extracted T1 onto it with unireg's ``syn`` (LNCC; the IXI subject fixed),
maps that subject's DLMUSE centroids through the result into the SynthSeg subject's world,
and keeps the median over the IXI subjects. The spread (mean distance of the IXI subjects'
estimates to the median, mm) is written beside each target set.

    python tools/keymorph_anatomy_targets.py -o runs/synthseg_targets.npz \
        [--subjects synthseg_01 ...]   # default: every SynthSeg training subject

The output (``.npz``): ``labels`` (L,), and per subject ``points/<subject>`` (L, 3) world mm
and ``spread/<subject>`` (L,) mm. A KeyMorph config names it as ``anatomical_targets``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))

# T1-like intensities of FreeSurfer aseg classes (white matter brightest, CSF darkest); other
# brain classes 0.5, everything else (non-brain, background) 0
T1_LIKE = {
    2: 1.0, 41: 1.0, 7: 0.9, 46: 0.9, 16: 0.85, 28: 0.85, 60: 0.85, 10: 0.8, 49: 0.8,
    13: 0.85, 52: 0.85, 12: 0.7, 51: 0.7, 11: 0.65, 50: 0.65, 26: 0.65, 58: 0.65,
    3: 0.6, 42: 0.6, 8: 0.6, 47: 0.6, 17: 0.6, 53: 0.6, 18: 0.6, 54: 0.6,
    4: 0.15, 43: 0.15, 5: 0.15, 44: 0.15, 14: 0.15, 15: 0.15, 24: 0.15,
}  # fmt: skip


def t1_like(labels, spacing: float = 2.0):  # noqa: ANN001, ANN201
    """A T1-like brain image (intensities in [0, 1], zero outside the brain) of a SynthSeg
    label map, blurred (FWHM ``spacing``) and resampled to ``spacing`` mm voxels on the map's
    own axes and field of view."""
    from unireg.io.image import Image, resample
    from unireg.spatial.filters import gaussian_blur
    from unireg.training.base import _SYNTHSEG_NON_BRAIN

    data = labels.data[0].long()
    lut = torch.zeros(int(data.max()) + 1)
    for value in torch.unique(data).tolist():
        if value and value not in _SYNTHSEG_NON_BRAIN:
            lut[value] = T1_LIKE.get(value, 0.5)
    sigma = [spacing / 2.355 / s for s in labels.geometry.spacing]
    image = gaussian_blur(lut[data][None, None], sigma)[0]
    grid = labels.geometry.regrid((spacing,) * labels.geometry.ndim)
    return resample(Image(image, labels.geometry.affine), grid)


def stripped(image, labels):  # noqa: ANN001, ANN201
    """``image`` brain-extracted by its label map (:func:`unireg.training.base.skull_strip`:
    zero outside the labels dilated by a voxel, the 99.5th percentile inside scaled to 1)."""
    from unireg.training.base import skull_strip

    out = skull_strip(image.data[:1].float()[None], labels.data[:1][None])
    return image.with_data(out[0])


def centroids(labels, values: list[int]) -> np.ndarray:  # noqa: ANN001
    """World mm centroids ``(L, 3)`` of ``values`` in a label map."""
    from unireg.spatial.geometry import apply_matrix_np

    data = labels.data[0].numpy()
    voxels = np.array(ndimage.center_of_mass(np.ones_like(data), data, values))
    return apply_matrix_np(labels.geometry.voxel_to_world, voxels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--subjects", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from unireg.data.manifest import Manifest
    from unireg.io import load_image, load_labels
    from unireg.methods import create, options_for

    manifest = Manifest.read(DATA / "manifest.csv")
    ixi = [e for e in manifest if e.dataset == "ixi" and e.split == "train" and e.modality == "T1"]
    maps = {e.subject: e.labels for e in manifest if e.dataset == "synthseg" and e.split == "train"}
    subjects = args.subjects or sorted(maps)
    unknown = [s for s in subjects if s not in maps]
    if unknown:
        raise SystemExit(f"not SynthSeg training subjects of {DATA / 'manifest.csv'}: {unknown}")
    refs = []
    for e in ixi:
        labels = load_labels(e.labels)
        refs.append((e.subject, stripped(load_image(e.image), labels), labels))
    shared = set.intersection(*(set(torch.unique(r[2].data).tolist()) for r in refs)) - {0}
    values = sorted(shared)
    ref_points = [centroids(r[2], values) for r in refs]
    syn = create("syn", options_for("syn", {}))
    out: dict[str, np.ndarray] = {"labels": np.array(values)}
    for subject in subjects:
        t0 = time.perf_counter()
        target = t1_like(load_labels(maps[subject]))
        estimates = []
        for (_, image, _), points in zip(refs, ref_points, strict=True):
            result = syn.register(image, target)
            mapped = result.transform.map_points(torch.as_tensor(points, dtype=torch.float32))
            estimates.append(mapped.double().numpy())
        stack = np.stack(estimates)
        median = np.median(stack, axis=0)
        out[f"points/{subject}"] = median
        out[f"spread/{subject}"] = np.linalg.norm(stack - median, axis=-1).mean(0)
        print(f"{subject}: {len(values)} labels, spread {out[f'spread/{subject}'].mean():.2f} "
              f"mm (median over labels {np.median(out[f'spread/{subject}']):.2f}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, **out)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
