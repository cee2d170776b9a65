"""Domain shifts for ``unireg evaluate --shift``: the same pairs, altered the way real data
differs from the training data, each seeded and reproducible.

A shift turns a loaded pair into another pair (and, for ``selfwarp``, the true fixed -> moving
map, so the end-point error in mm is known, not only Dice). Shifts chain with ``+``
(``skullstrip+synth``) and combine with the harness's rotation angles, which move the shifted
moving image afterwards.

Shifts (``SHIFTS``):

- ``none``: nothing.
- ``skullstrip``: both images brain-extracted by their label maps (labels > 0, dilated by one
  voxel), as brain-extraction tools leave them.
- ``synth``: the moving image replaced by a synthetic contrast drawn from its label map
  (SynthSeg-style: random intensity per label, blur, bias, noise, gamma; no deformation),
  dark outside the labels (so, with brain-only label maps, also brain-extracted).
- ``aniso``: the moving image on 5 mm slices along its last voxel axis (in-plane spacing kept;
  a Gaussian slice profile first).
- ``iso1``, ``iso3``: both images and label maps on isotropic 1 mm / 3 mm grids of the same
  field of view.
- ``bias``: the moving image times a smooth bias field (log std 0.4) plus Gaussian noise (3 %
  of its 99th percentile).
- ``rescale``: the moving intensities rescaled to [0, 4096] through a gamma of 0.7.
- ``selfwarp``: the moving subject against a copy of itself moved by a known 10-degree
  rotation about a random axis and a smooth random deformation of 4 to 8 mm at most; the copy
  is the fixed image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from unireg.errors import UniregError
from unireg.io.image import Image, LabelMap, percentile_range, resample
from unireg.spatial.filters import gaussian_blur
from unireg.spatial.geometry import Geometry, linear_about, rotation_about_axes
from unireg.spatial.transform import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Transform,
)


@dataclass(frozen=True)
class Shifted:
    """A pair after a shift; ``truth`` is the true fixed -> moving world map when known."""

    fixed: Image
    moving: Image
    fixed_labels: LabelMap | None
    moving_labels: LabelMap | None
    truth: Transform | None = None


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _need_labels(s: Shifted, name: str, both: bool = True) -> None:
    if s.moving_labels is None or (both and s.fixed_labels is None):
        raise UniregError(f"--shift {name} needs the pairs' label maps")


def skullstrip(s: Shifted, seed: int) -> Shifted:
    """Both images zero outside their label map's foreground dilated by one voxel."""
    _need_labels(s, "skullstrip")

    def strip(image: Image, labels: LabelMap) -> Image:
        fg = (labels.data > 0).float()[None]
        pool = torch.nn.functional.max_pool3d if fg.ndim == 5 else torch.nn.functional.max_pool2d
        mask = pool(fg, 3, stride=1, padding=1)[0]
        return image.with_data(image.data * mask.to(image.data))

    assert s.fixed_labels is not None and s.moving_labels is not None
    return replace(s, fixed=strip(s.fixed, s.fixed_labels), moving=strip(s.moving, s.moving_labels))


def synth(s: Shifted, seed: int) -> Shifted:
    """The moving image drawn anew from its label map (random contrast, no deformation), zero
    outside the labels."""
    from unireg.data.synthesis import LabelSynthesis

    _need_labels(s, "synth", both=False)
    assert s.moving_labels is not None
    draw = LabelSynthesis(deformation=0.0, resolution=1.0)
    out = draw(s.moving_labels.data[None], spacing=s.moving.spacing, seed=seed)
    dark = (s.moving_labels.data > 0).to(out["image"].dtype)  # air is dark in every contrast
    return replace(s, moving=s.moving.with_data(out["image"][0].float() * dark))


def _onto(image: Image | None, grid: Geometry) -> Image | None:
    return None if image is None else resample(image, grid)


def aniso(s: Shifted, seed: int, thickness: float = 5.0) -> Shifted:
    """The moving image (and labels) on 5 mm slices along its last axis."""
    spacing = s.moving.spacing
    if spacing[-1] >= thickness:
        return s
    sigma_mm = math.sqrt(thickness**2 - spacing[-1] ** 2) / 2.355
    sigmas = [0.0] * (s.moving.ndim - 1) + [sigma_mm / spacing[-1]]
    blurred = s.moving.with_data(gaussian_blur(s.moving.batch(), sigmas)[0])
    grid = s.moving.geometry.regrid((*spacing[:-1], thickness))
    return replace(s, moving=resample(blurred, grid), moving_labels=_onto(s.moving_labels, grid))


def isotropic(mm: float) -> Callable[[Shifted, int], Shifted]:
    """Both images and label maps on isotropic ``mm`` grids of their own field of view."""

    def shift(s: Shifted, seed: int) -> Shifted:
        fgrid = s.fixed.geometry.regrid((mm,) * s.fixed.ndim)
        mgrid = s.moving.geometry.regrid((mm,) * s.moving.ndim)
        return replace(
            s, fixed=resample(s.fixed, fgrid), moving=resample(s.moving, mgrid),
            fixed_labels=_onto(s.fixed_labels, fgrid), moving_labels=_onto(s.moving_labels, mgrid),
        )  # fmt: skip

    return shift


def bias(s: Shifted, seed: int) -> Shifted:
    """A smooth multiplicative bias field and additive Gaussian noise on the moving image."""
    from unireg.data.augment import smooth_random_field

    g = _generator(seed)
    data = s.moving.data
    field = smooth_random_field(data.shape[1:], 1, 1, g, resolution=4, std=0.4)[0]
    _, top = percentile_range(data, 0.5, 99.0)
    noise = torch.randn(data.shape, generator=g, dtype=torch.float64).float() * 0.03 * top
    return replace(s, moving=s.moving.with_data(data * torch.exp(field) + noise))


def rescale(s: Shifted, seed: int) -> Shifted:
    """Moving intensities rescaled to [0, 4096] through a gamma of 0.7."""
    data = s.moving.data
    lo, hi = float(data.min()), float(data.max())
    unit = (data - lo) / max(hi - lo, 1e-12)
    return replace(s, moving=s.moving.with_data(4096.0 * unit.clamp(0, 1) ** 0.7))


def selfwarp(s: Shifted, seed: int, angle: float = 10.0, max_mm: tuple = (4.0, 8.0)) -> Shifted:
    """The moving subject against a copy of itself moved by a known map ``T`` (fixed ->
    moving: ``T(x) = R(x + u(x))``, a 10-degree rotation ``R`` about the grid centre about a
    random axis and a smooth displacement ``u`` of 4 to 8 mm at most); the copy, the subject
    pulled back through ``T`` onto its own grid, is the fixed image."""
    from unireg.data.augment import smooth_displacement

    g = _generator(seed)
    subject, labels = s.moving, s.moving_labels
    geom = subject.geometry
    d = geom.ndim
    field = smooth_displacement(geom.shape, g, max_mm)  # world mm, a random direction each
    axis = [int(torch.randint(0, 3, (1,), generator=g))] if d == 3 else []
    rotation = linear_about(rotation_about_axes(angle, axis, d), geom.center_world)
    truth = CompositeTransform(
        [DisplacementFieldTransform(field.float(), geom), AffineTransform(rotation)]
    )
    fixed = resample(subject, geom, truth)
    fixed_labels = None if labels is None else resample(labels, geom, truth)
    return Shifted(fixed, subject, fixed_labels, labels, truth)


SHIFTS: dict[str, Callable[[Shifted, int], Shifted]] = {
    "none": lambda s, seed: s,
    "skullstrip": skullstrip,
    "synth": synth,
    "aniso": aniso,
    "iso1": isotropic(1.0),
    "iso3": isotropic(3.0),
    "bias": bias,
    "rescale": rescale,
    "selfwarp": selfwarp,
}


def check_shift(name: str) -> None:
    """Refuse an unknown shift name (each part of an ``a+b`` chain) before any work."""
    unknown = [part for part in name.split("+") if part not in SHIFTS]
    if unknown:
        raise UniregError(f"unknown --shift {', '.join(unknown)}; shifts: {', '.join(SHIFTS)}")


def apply_shift(
    name: str,
    fixed: Image,
    moving: Image,
    fixed_labels: LabelMap | None,
    moving_labels: LabelMap | None,
    *,
    seed: int = 0,
) -> Shifted:
    """A pair after the shift ``name`` (parts of ``a+b`` applied in order, each seeded from
    ``seed`` and its position): the same seed gives the same pair."""
    check_shift(name)
    out = Shifted(fixed, moving, fixed_labels, moving_labels)
    for i, part in enumerate(name.split("+")):
        out = SHIFTS[part](out, seed * 7919 + i)
    return out


def misaligned_truth(truth: Transform | None, matrix: np.ndarray) -> Transform | None:
    """The true fixed -> moving map after the moving image was moved by ``matrix`` (points
    move by it, world mm)."""
    if truth is None:
        return None
    return CompositeTransform([truth, AffineTransform(matrix)])
