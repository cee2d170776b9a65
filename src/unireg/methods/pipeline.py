"""The inference pipeline every learned method shares: images onto the network's grid, a field
on that grid turned into a world transform, and (with :func:`unireg.result.measured_result`)
the warped image and the result.

1. :func:`network_grid` and :func:`network_input`: the grid the network was trained on (its
   checkpoint's preprocessing: spacing, shape, centred on the head, RAS axes) and an image
   resampled onto it (optionally through a world transform) with intensities in [0, 1].
2. The method's network on that grid.
3. :func:`field_transform`: a normalised displacement on the network's grid as a world-mm
   :class:`~unireg.spatial.transform.DisplacementFieldTransform`, extended beyond the grid by
   its face values so that it covers the fixed and moving fields of view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unireg.errors import DimensionalityError
from unireg.io.image import Image, normalize_intensity, resample
from unireg.io.preprocessing import Preprocessing
from unireg.methods.base import PRECISIONS, MethodEntry, MethodOptions, OptionError, Prompts
from unireg.result import RegistrationResult
from unireg.solvers.pyramid import level_geometry
from unireg.spatial.filters import gaussian_blur
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Transform,
)
from unireg.training.checkpoint import Checkpoint


class LearnedMethod:
    """A learned method behind the :class:`~unireg.methods.base.Method` protocol: its model
    (``options.model``, the shipped default when None) loaded once on ``device``, then each
    pair registered by :meth:`run`. Learned methods take no prompts."""

    def __init__(self, entry: MethodEntry, options: MethodOptions, device: str = "cpu"):
        from unireg.methods.registry import load_model

        self.entry, self.options, self.device = entry, options, torch.device(device)
        model: Any = getattr(options, "model", None)
        self.model, self.checkpoint = load_model(entry.name, model, device=self.device)

    def register(
        self,
        fixed: Image,
        moving: Image,
        *,
        prompts: Prompts | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> RegistrationResult:
        if prompts is not None and prompts.uses():
            raise OptionError(f"{self.entry.name} takes no {', '.join(prompts.uses())}")
        return self.run(fixed, moving)

    def run(self, fixed: Image, moving: Image) -> RegistrationResult:
        """Register one pair with the loaded model and the options."""
        raise NotImplementedError


def network_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The number format of a network's convolutions for ``precision`` (``auto``,
    ``float32`` or ``bfloat16``) on ``device``: ``auto`` is bfloat16 on CPUs with native
    bfloat16 arithmetic (AVX512-BF16 or AMX tiles, where convolutions run in 50-60 % of
    float32's time), float32 on other CPUs (emulated bfloat16 is slower) and on GPUs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        # torch's CPU feature probes (private; a torch without them counts as no support)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        precision = "bfloat16" if torch.device(device).type == "cpu" and native else "float32"
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def channels_last_pays(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether a 3D network's convolutions run faster with channels-last weights and
    activations on ``device`` in ``dtype``: on CPUs in bfloat16, and in float32 on CPUs whose
    widest vector unit PyTorch uses is AVX2 (measured on DIO's networks, 120x120x90 images,
    2 threads: an AVX2 CPU runs float32 1.1-1.2x faster so, an AVX512 CPU a little slower;
    other CPUs were not measured and keep the default layout). Not on GPUs (left to cuDNN)."""
    if torch.device(device).type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return True
    return bool(torch.backends.cpu.get_cpu_capability() == "AVX2")


def in_dtype(dtype: torch.dtype, device: torch.device | str) -> AbstractContextManager[Any]:
    """A context in which convolutions on ``device`` run in ``dtype`` (autocast; nothing for
    float32). What they return is ``dtype``: cast it back before sums that need float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check_dimensions(fixed: Image, moving: Image, ndim: int) -> None:
    """A :class:`~unireg.errors.DimensionalityError` naming the moving image unless both
    images have the model's ``ndim``."""
    if fixed.ndim != moving.ndim or fixed.ndim != ndim:
        raise DimensionalityError(
            f"is {moving.ndim}D and the fixed image {fixed.ndim}D; the model is {ndim}D",
            moving.path,
        )


def network_grid(checkpoint: Checkpoint, image: Image) -> Geometry:
    """The network's grid placed for ``image`` (centred on its head), from the preprocessing
    the network was trained with."""
    return turned_network_grids(checkpoint, image, [np.eye(image.ndim + 1)])[0]


def turned_network_grids(
    checkpoint: Checkpoint, image: Image, turns: Sequence[np.ndarray]
) -> list[Geometry]:
    """:func:`network_grid` of ``image`` turned by each world matrix of ``turns`` (its affine
    left-multiplied, its voxels unchanged), the centre of mass computed once."""
    first = image.with_data(image.data[:1].float())
    prep = Preprocessing.from_settings(checkpoint.preprocessing, image.ndim)
    vox = prep.mass_voxel(first) if prep.center == "mass" else None
    return [prep.target_geometry(first.with_data(first.data, turn @ first.affine), vox)
            for turn in turns]  # fmt: skip


# the finer image is blurred along an axis only where the other image's voxel is at least
# this much longer along it (near-equal spacings are left alone)
MATCH_RATIO = 1.2


def resolution_matched(image: Image, other: Image, *, ratio: float = MATCH_RATIO) -> Image:
    """``image`` blurred along each of its voxel axes to ``other``'s resolution along that axis
    where ``other``'s is coarser by more than ``ratio`` (else ``image`` itself).

    ``other``'s voxel length along the world direction ``e`` of an axis is
    ``sqrt(sum_j (s_j (R^T e)_j)^2)`` (``s`` its spacing, ``R`` its axis directions): the
    spacing itself when the grids' axes agree. The blur is a Gaussian slice profile whose
    full width at half maximum is that length (``sigma = sqrt(L^2 - s_image^2) / 2.355`` mm),
    as a thick slice of a scanner records; on the same grid and intensities otherwise."""
    d = image.ndim
    a = image.geometry.voxel_to_world[:d, :d]
    b = other.geometry.voxel_to_world[:d, :d]
    own, theirs = np.array(image.geometry.spacing), np.array(other.geometry.spacing)
    directions = a / own  # unit world directions of the image's axes (columns)
    along = np.linalg.norm(theirs[:, None] * ((b / theirs).T @ directions), axis=0)
    coarser = along > ratio * own
    if not coarser.any():
        return image
    sigmas = np.where(coarser, np.sqrt(np.maximum(along**2 - own**2, 0.0)) / 2.355 / own, 0.0)
    data = image.data.float()
    return image.with_data(gaussian_blur(data[None], [float(v) for v in sigmas])[0])


def matched_pair(fixed: Image, moving: Image) -> tuple[Image, Image]:
    """Each image of a pair blurred to the other's resolution where the other's is coarser
    (:func:`resolution_matched`); a pair of one resolution comes back as it is."""
    return resolution_matched(fixed, moving), resolution_matched(moving, fixed)


def network_input(image: Image, grid: Geometry, through: Transform | None = None) -> torch.Tensor:
    """``image`` (first channel) resampled onto ``grid`` through ``through`` (grid world ->
    image world; identity when None), intensities to [0, 1]: ``(1, 1, *grid.shape)``."""
    first = image.with_data(image.data[:1].float())
    return normalize_intensity(resample(first, grid, through)).data.unsqueeze(0)


def field_transform(
    displacement: torch.Tensor, grid: Geometry, cover: np.ndarray
) -> DisplacementFieldTransform:
    """A network's field as a world transform.

    Args:
        displacement: normalised displacement ``(1, d, *s)`` over ``grid``'s extent (``s`` may
            be coarser than ``grid``'s shape).
        grid: the network's grid (world placement).
        cover: world points ``(d, N)`` (mm) the transform must reach, e.g. the corners of the
            fixed field of view.

    The field is held on its own grid (``grid``'s extent at the field's resolution: no
    resampling), extended by copies of its faces to a grid covering ``cover``: linear
    interpolation on it equals sampling the field with its face values held beyond the
    faces (no jump to zero where ``grid`` ends, which would fold there).
    """
    d = grid.ndim
    native = level_geometry(grid, tuple(displacement.shape[2:]))
    covering, lo = covering_grid(native, cover)
    pad = []
    for axis in reversed(range(d)):  # F.pad lists the last axis first
        pad += [lo[axis], covering.shape[axis] - native.shape[axis] - lo[axis]]
    to_mm = torch.from_numpy(grid.normalized_to_world[:d, :d]).float().to(displacement.device)
    world = torch.einsum("ij,bj...->bi...", to_mm, displacement.float())
    world = F.pad(world, pad, mode="replicate")[0]
    return DisplacementFieldTransform(world.contiguous().cpu(), covering)


def linear_and_fields(
    forward: torch.Tensor,
    inverse: torch.Tensor,
    grid: Geometry,
    linear: AffineTransform,
    fixed: Geometry,
    moving: Geometry,
) -> tuple[CompositeTransform, CompositeTransform]:
    """A network's forward and inverse fields (normalised, over ``grid``'s extent) after a
    linear stage ``A`` (fixed world -> moving world) as world transforms: ``x -> A(x + u(x))``
    and ``y -> z + v(z)``, ``z = A^-1(y)``. Both fields are held to cover the fixed field of
    view and the moving one mapped by ``A^-1`` (:func:`field_transform`)."""
    d = grid.ndim
    inv_linear = linear.inverse()
    back = inv_linear.matrix.numpy()
    moving_corners = back[:d, :d] @ moving.corners_world.T + back[:d, d:]
    cover = np.concatenate([fixed.corners_world.T, moving_corners], 1)
    transform = CompositeTransform([field_transform(forward, grid, cover), linear])
    inverse_transform = CompositeTransform([inv_linear, field_transform(inverse, grid, cover)])
    return transform, inverse_transform


def covering_grid(b: Geometry, world: np.ndarray) -> tuple[Geometry, list[int]]:
    """A grid with ``b``'s axes and spacing covering ``b`` and the world points ``(d, N)``
    (+1 voxel), and how many voxels it extends before ``b``'s first one on each axis (>= 1)."""
    d = b.ndim
    world = np.concatenate([b.corners_world.T, world], axis=1)
    vox = b.world_to_voxel[:d, :d] @ world + b.world_to_voxel[:d, d:]
    lo, hi = np.floor(vox.min(1) + 1e-6) - 1, np.ceil(vox.max(1) - 1e-6) + 1
    before = [int(-v) for v in lo]
    after = [int(h) - (n - 1) for h, n in zip(hi, b.shape, strict=True)]
    return b.extended(before, after), before
