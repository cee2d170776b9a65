"""Images of any contrast from label maps, as SynthSeg and SynthMorph draw them.

From a label map: an optional random smooth deformation (a stationary velocity field integrated
by scaling and squaring, with an optional random affine) moves the anatomy; each label gets a
random mean and standard deviation (a Gaussian mixture); the image is blurred, degraded to a
random lower resolution along random axes and brought back, multiplied by a smooth bias field,
given noise and a gamma curve, and rescaled to [0, 1]. Real anatomy thus yields unlimited
training images of unlimited contrasts, each with its exact label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from unireg.data.augment import (
    _rand,
    _randn,
    apply_affine,
    make_generator,
    random_affine_matrix,
    random_bias_field,
    random_gamma,
    random_noise,
    smooth_random_field,
)
from unireg.losses import label_indices
from unireg.spatial.field import resize_displacement, scaling_and_squaring
from unireg.spatial.filters import gaussian_blur
from unireg.spatial.warp import warp


@dataclass
class LabelSynthesis:
    """Settings of the synthesis (defaults follow SynthSeg's ranges, intensities in [0, 1]).

    Attributes:
        mean_range: per-label means drawn uniformly in this range.
        std_range: per-label standard deviations drawn uniformly in this range.
        deformation: maximum standard deviation (voxels) of the random velocity field on its
            control grid; 0 turns the deformation off.
        deformation_resolution: control-grid points per axis of the velocity field.
        rotation, translation, scale: random affine (degrees, mm, scale range), about the centre.
        blur: maximum Gaussian sigma (voxels) per axis.
        resolution: maximum downsampling factor per axis (1 disables the resolution change);
            each axis is degraded with probability ``resolution_probability``.
        bias_field: maximum standard deviation of the log bias field.
        noise: maximum standard deviation of extra Gaussian noise.
        gamma: standard deviation of log gamma.
        normalize: rescale the output to [0, 1] (min-max).
    """

    mean_range: tuple[float, float] = (0.0, 1.0)
    std_range: tuple[float, float] = (0.0, 0.1)
    deformation: float = 3.0
    deformation_resolution: int = 8
    rotation: float = 0.0
    translation: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    blur: float = 1.0
    resolution: float = 3.0
    resolution_probability: float = 0.5
    bias_field: float = 0.3
    noise: float = 0.02
    gamma: float = 0.25
    normalize: bool = True

    def __call__(
        self,
        labels: torch.Tensor,
        *,
        label_values: Sequence[int] | torch.Tensor | None = None,
        spacing: Sequence[float] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Draw one image per label map of the batch ``labels`` ``(B, 1, *spatial)`` (int).

        Returns ``image`` ``(B, 1, *spatial)`` float32, ``labels`` (the deformed label maps),
        ``label_values`` ``(K,)`` and the drawn ``means`` and ``stds`` ``(B, K)`` (before
        blurring and the later corruptions; ``means`` is in the intensity scale of the
        Gaussian-mixture stage, i.e. ``mean_range``).
        """
        g = make_generator(seed, generator)
        if labels.ndim not in (4, 5) or labels.shape[1] != 1:
            raise ValueError(f"labels must be (B, 1, *spatial), got {tuple(labels.shape)}")
        if labels.is_floating_point():
            raise TypeError("labels must be an integer tensor")
        b, shape, device = labels.shape[0], tuple(labels.shape[2:]), labels.device
        d = len(shape)
        labels = self._deform(labels, g, spacing)
        values = (
            torch.unique(labels)
            if label_values is None
            else torch.as_tensor(label_values, device=device).long()
        )
        values = values.to(device)
        k = values.numel()
        # Gaussian mixture: a mean and std per label and sample
        lo, hi = self.mean_range
        means = lo + (hi - lo) * _rand(g, b, k)
        slo, shi = self.std_range
        stds = slo + (shi - slo) * _rand(g, b, k)
        index = label_indices(labels[:, 0], values)  # (B, *S); k for unlisted values
        known = index < k
        index = index.clamp_max(k - 1)
        m = means.to(device, torch.float32)
        s = stds.to(device, torch.float32)
        batch_idx = torch.arange(b, device=device).view(b, *[1] * d)
        mu = m[batch_idx, index]
        sigma = s[batch_idx, index]
        noise = _randn(g, b, *shape).to(device, torch.float32)
        image = torch.where(known, mu + sigma * noise, torch.zeros_like(mu)).unsqueeze(1)
        # acquisition: blur, resolution change, bias field, noise, gamma
        if self.blur > 0:
            image = torch.cat(
                [
                    gaussian_blur(image[i : i + 1], (_rand(g, d) * self.blur).tolist())
                    for i in range(b)
                ]
            )
        if self.resolution > 1:
            res, prob = self.resolution, self.resolution_probability
            image = torch.cat(
                [degrade_resolution(image[i : i + 1], g, res, prob) for i in range(b)]
            )
        if self.bias_field > 0:
            image = random_bias_field(image, g, strength=self.bias_field)
        if self.noise > 0:
            image = random_noise(image, g, std=self.noise)
        if self.normalize:
            flat = image.reshape(b, -1)
            lo_i = flat.min(1).values.view(b, *[1] * (d + 1))
            hi_i = flat.max(1).values.view(b, *[1] * (d + 1))
            image = (image - lo_i) / (hi_i - lo_i).clamp_min(1e-12)
        if self.gamma > 0:
            image = random_gamma(image, g, log_std=self.gamma)
        return {
            "image": image,
            "labels": labels,
            "label_values": values,
            "means": means,
            "stds": stds,
        }

    def _deform(
        self, labels: torch.Tensor, g: torch.Generator, spacing: Sequence[float] | None
    ) -> torch.Tensor:
        b, shape = labels.shape[0], tuple(labels.shape[2:])
        d = len(shape)
        if self.rotation or self.translation or self.scale != (1.0, 1.0):
            matrix = random_affine_matrix(
                shape,
                b,
                g,
                spacing=spacing,
                rotation=self.rotation,
                translation=self.translation,
                scale=self.scale,
            )
            _, out = apply_affine(None, labels, matrix)
            assert out is not None
            labels = out
        if self.deformation > 0:
            amp = _rand(g, b).view(b, 1, *[1] * d) * self.deformation
            # the field is smooth (a coarse control grid): integrate it at half resolution in
            # resolution-free normalised units, then upsample the displacement (as SynthMorph)
            half = tuple(max(2, (n + 1) // 2) for n in shape)
            velocity = smooth_random_field(
                half, b, d, g, resolution=self.deformation_resolution, device=labels.device
            ) * amp.to(labels.device, torch.float32)
            scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=labels.device)
            disp = scaling_and_squaring(velocity * scale.view(1, d, *[1] * d))
            disp = resize_displacement(disp, shape)
            labels = warp(labels.float(), disp, mode="nearest").round().to(labels.dtype)
        return labels


def degrade_resolution(
    image: torch.Tensor, g: torch.Generator, max_factor: float, probability: float = 0.5
) -> torch.Tensor:
    """``image`` ``(1, C, *spatial)`` as acquired at a lower resolution along random axes and
    resampled back onto its grid: each axis, with ``probability``, gets a factor drawn in
    ``[1, max_factor]`` (voxels per coarse voxel), an anti-aliasing blur of that FWHM, and
    linear down- and upsampling. Thick slices (anisotropy) are the one-axis case."""
    shape = tuple(image.shape[2:])
    d = len(shape)
    factors = []
    for _ in range(d):
        use = float(_rand(g, 1)) < probability
        f = 1.0 + float(_rand(g, 1)) * (max_factor - 1.0)
        factors.append(f if use else 1.0)
    if all(f == 1.0 for f in factors):
        return image
    # anti-aliasing blur of sigma ~ factor / 2.355 voxels (FWHM of the coarse voxel)
    sigmas = [0.0 if f == 1.0 else f / 2.355 for f in factors]
    low = gaussian_blur(image, sigmas)
    small = tuple(max(2, round(n / f)) for n, f in zip(shape, factors, strict=True))
    mode = "bilinear" if d == 2 else "trilinear"
    low = F.interpolate(low, size=small, mode=mode, align_corners=True)
    return F.interpolate(low, size=shape, mode=mode, align_corners=True)
