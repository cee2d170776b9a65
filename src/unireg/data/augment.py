"""Seeded, batched augmentation on ``(B, C, *spatial)`` tensors (2D and 3D), on their device.

Every random draw comes from one CPU ``torch.Generator``, so the same seed gives the same
sample on any device. Geometric augmentation warps image and label map together (labels by
nearest neighbour) and returns the matrix it used, for methods that need the known transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unireg.spatial.affine import random_affine
from unireg.spatial.geometry import Geometry
from unireg.spatial.grid import affine_grid
from unireg.spatial.warp import sample


def make_generator(
    seed: int | None = None, generator: torch.Generator | None = None
) -> torch.Generator:
    """A CPU generator: ``generator`` if given, else one seeded with ``seed`` (or from torch's
    global RNG when ``seed`` is None, so ``torch.manual_seed`` makes runs repeatable)."""
    if generator is not None:
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator().manual_seed(int(seed))


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, dtype=torch.float64)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def random_affine_matrix(
    shape: Sequence[int],
    batch: int,
    generator: torch.Generator,
    *,
    spacing: Sequence[float] | None = None,
    rotation: float = 0.0,
    translation: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    shear: float = 0.0,
) -> torch.Tensor:
    """Random affines as normalised-grid maps ``(B, d+1, d+1)`` (float64), drawn in mm.

    The transform is drawn in physical space about the grid centre (so a rotation stays rigid
    on anisotropic voxels): rotation up to ``rotation`` degrees per axis, translation up to
    ``translation`` mm per axis, log-uniform scale, shear; then expressed on the grid.
    """
    d = len(shape)
    sp = np.ones(d) if spacing is None else np.asarray(spacing, np.float64)
    geom = Geometry(tuple(shape), np.diag([*sp, 1.0]))
    world = random_affine(
        d,
        batch,
        rotation=rotation,
        translation=translation,
        scale=scale,
        shear=shear,
        center=torch.from_numpy(geom.center_world),
        generator=generator,
        dtype=torch.float64,
    )
    to_world = torch.from_numpy(geom.normalized_to_world)
    from_world = torch.from_numpy(geom.world_to_normalized)
    return from_world @ world @ to_world


def apply_affine(
    image: torch.Tensor | None,
    labels: torch.Tensor | None,
    matrix: torch.Tensor,
    *,
    padding: str = "zeros",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Warp ``image`` (linear) and ``labels`` (nearest, values kept) by normalised matrices."""
    ref = image if image is not None else labels
    assert ref is not None
    m = matrix.to(device=ref.device, dtype=torch.float32)
    points = affine_grid(m, tuple(ref.shape[2:]))
    out_img = None if image is None else sample(image, points, mode="linear", padding=padding)
    out_lab = None
    if labels is not None:
        out_lab = sample(labels.float(), points, mode="nearest", padding="zeros")
        out_lab = out_lab.round().to(labels.dtype)
    return out_img, out_lab


def smooth_random_field(
    shape: Sequence[int],
    batch: int,
    channels: int,
    generator: torch.Generator,
    *,
    resolution: int = 4,
    std: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A smooth random field ``(B, C, *shape)``: Gaussian values on a ``resolution``-per-axis
    control grid with standard deviation ``std``, upsampled (bi/tri)linearly."""
    d = len(shape)
    coarse = _randn(generator, batch, channels, *[resolution] * d) * std
    mode = "bilinear" if d == 2 else "trilinear"
    coarse = coarse.to(device=device, dtype=torch.float32)
    return F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


def smooth_displacement(
    shape: Sequence[int],
    generator: torch.Generator,
    largest: tuple[float, float],
    *,
    resolution: int = 5,
) -> torch.Tensor:
    """A smooth random displacement ``(d, *shape)`` (float64; channel ``i`` along axis ``i``):
    :func:`smooth_random_field` on a ``resolution``-per-axis control grid, scaled so that its
    longest vector is drawn uniformly from ``largest`` = ``(lo, hi)`` (the caller's units, e.g.
    mm or voxels). The field is drawn first, then the length."""
    field = smooth_random_field(shape, 1, len(shape), generator, resolution=resolution)[0]
    field = field.double()
    longest = float(torch.linalg.vector_norm(field, dim=0).max())
    length = largest[0] + (largest[1] - largest[0]) * float(torch.rand(1, generator=generator))
    return field * (length / max(longest, 1e-12))


def random_bias_field(
    image: torch.Tensor, generator: torch.Generator, *, strength: float = 0.3, resolution: int = 4
) -> torch.Tensor:
    """Multiply by ``exp(b)``, ``b`` a smooth random field of standard deviation up to
    ``strength`` (drawn per sample)."""
    b = image.shape[0]
    scale = _rand(generator, b).to(image.device, torch.float32) * strength
    field = smooth_random_field(
        image.shape[2:], b, 1, generator, resolution=resolution, device=image.device
    )
    return image * torch.exp(field * scale.view(b, *[1] * (image.ndim - 1)))


def random_noise(
    image: torch.Tensor, generator: torch.Generator, *, std: float = 0.05
) -> torch.Tensor:
    """Add Gaussian noise with a standard deviation drawn uniformly in ``[0, std]`` per sample."""
    b = image.shape[0]
    sigma = (_rand(generator, b) * std).view(b, *[1] * (image.ndim - 1))
    noise = _randn(generator, *image.shape) * sigma
    return image + noise.to(image.device, image.dtype)


def random_gamma(
    image: torch.Tensor, generator: torch.Generator, *, log_std: float = 0.3
) -> torch.Tensor:
    """Gamma ``exp(N(0, log_std))`` per sample, applied to the per-sample [0, 1] rescaled image
    and mapped back to its original range."""
    b = image.shape[0]
    flat = image.reshape(b, -1)
    lo = flat.min(1).values.view(b, *[1] * (image.ndim - 1))
    hi = flat.max(1).values.view(b, *[1] * (image.ndim - 1))
    gamma = torch.exp(_randn(generator, b) * log_std).to(image.device, image.dtype)
    span = (hi - lo).clamp_min(1e-12)
    unit = ((image - lo) / span).clamp(0, 1)
    return lo + span * unit ** gamma.view(b, *[1] * (image.ndim - 1))


@dataclass
class Augmentation:
    """On-the-fly augmentation; every part is off at its default.

    Attributes:
        rotation: maximum angle in degrees per rotation axis (up to 180).
        translation: maximum shift in mm per axis.
        scale: (low, high) per-axis scale range, log-uniform.
        shear: maximum shear coefficient.
        bias_field: maximum standard deviation of the log bias field.
        noise: maximum standard deviation of additive Gaussian noise (image units).
        gamma: standard deviation of log gamma.
        probability: chance that each intensity augmentation is applied to a batch.
    """

    rotation: float = 0.0
    translation: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0
    bias_field: float = 0.0
    noise: float = 0.0
    gamma: float = 0.0
    probability: float = 1.0

    @property
    def geometric(self) -> bool:
        return bool(self.rotation or self.translation or self.shear or self.scale != (1.0, 1.0))

    def __call__(
        self,
        image: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        *,
        spacing: Sequence[float] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Augment a batch. Returns ``image``, ``labels`` and ``matrix`` (the normalised-grid
        map from output to input points, identity when no geometric augmentation ran)."""
        g = make_generator(seed, generator)
        ref = image if image is not None else labels
        if ref is None:
            raise ValueError("nothing to augment")
        b, d = ref.shape[0], ref.ndim - 2
        matrix = torch.eye(d + 1, dtype=torch.float64).expand(b, d + 1, d + 1).clone()
        if self.geometric:
            matrix = random_affine_matrix(
                ref.shape[2:],
                b,
                g,
                spacing=spacing,
                rotation=self.rotation,
                translation=self.translation,
                scale=self.scale,
                shear=self.shear,
            )
            image, labels = apply_affine(image, labels, matrix)
        if image is not None:
            if self.bias_field and float(_rand(g, 1)) < self.probability:
                image = random_bias_field(image, g, strength=self.bias_field)
            if self.gamma and float(_rand(g, 1)) < self.probability:
                image = random_gamma(image, g, log_std=self.gamma)
            if self.noise and float(_rand(g, 1)) < self.probability:
                image = random_noise(image, g, std=self.noise)
        return {"image": image, "labels": labels, "matrix": matrix}
