"""Never silently worse than doing nothing: a registration's result scored against no
registration (and, for a deformable result, against its own linear stage).

The score is the mutual information (nats, 32-bin Parzen histogram) between the fixed image
and the moving image mapped onto it, over the fixed image's foreground (normalised intensity
above 0.05): at most 20000 of its voxels, drawn once with a fixed seed and shared by every
candidate, so the comparison is paired and costs a fraction of a second. Mutual information
serves any pair of contrasts, so one check covers every method. The moving image is normalised
once, before it is sampled, so the candidates differ only by the map:

- ``identity``: the moving image where its header puts it (no registration);
- ``linear``: through the result's linear part (deformable results only);
- ``result``: through the whole transform.

A result whose score is below a candidate's by more than ``margin`` (relative, 1 % by default)
gets a ``quality_warning``. The margin was fixed before any evaluation: it only absorbs
interpolation differences between nearly equal maps.

A deformable result that folds more than :data:`FOLDING_LIMIT` % of the fixed grid (Jacobian
determinant <= 0) gets one too: no anatomical correspondence folds that much, and a solver
chasing features that do not correspond (a synthetic brain-only contrast against a head with
skull) does, while its mutual information can still look no worse than no registration's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unireg.io.image import Image, normalize_intensity, resample
from unireg.losses import mutual_information
from unireg.spatial.field import folding_percent
from unireg.spatial.geometry import Geometry
from unireg.spatial.grid import transform_points
from unireg.spatial.transform import AffineTransform, Transform
from unireg.spatial.warp import sample

MARGIN = 0.01  # relative: a result may score up to 1 % below a baseline without a warning
POINTS = 20_000  # fixed foreground voxels compared (drawn once, seeded)
FOREGROUND = 0.05  # normalised intensity above which a voxel is foreground
# percent of the fixed grid. Chosen on the first 6 ordered IXI training pairs (shifts none,
# skullstrip, synth, skullstrip+synth, aniso; syn, sitreg, dio, keymorph:tps, avsm): twice the
# largest folding of a result at or above no registration's Dice (6.9 %, dio on
# skullstrip+synth), rounded up. It flags 4 of the 6 dio results on synth (13.5-16.9 %
# folding, Dice 0.000-0.007), 3 of them missed by the mutual information.
FOLDING_LIMIT = 14.0


def _first_channel(image: Image) -> Image:
    return image if image.data.shape[0] == 1 else image.with_data(image.data[:1])


def similarity_scores(
    fixed: Image, moving: Image, maps: dict[str, Transform | None], *, points: int = POINTS
) -> dict[str, float]:
    """Mutual information (nats) of ``fixed`` with ``moving`` through each map (None: the
    identity world map), over at most ``points`` foreground voxels of the fixed image (the
    same ones for every map)."""
    f = normalize_intensity(_first_channel(fixed))
    m = normalize_intensity(_first_channel(moving))
    values = f.data.reshape(-1)
    chosen = torch.nonzero(values > FOREGROUND).reshape(-1)
    if chosen.numel() == 0:
        chosen = torch.arange(values.numel())
    if chosen.numel() > points:
        g = torch.Generator().manual_seed(0)
        chosen = chosen[torch.randperm(chosen.numel(), generator=g)[:points]]
    # np.unravel_index: torch's imports sympy on its first call (~0.3 s)
    voxels = np.stack(np.unravel_index(chosen.numpy(), f.geometry.shape), axis=-1)
    world = transform_points(f.geometry.voxel_to_world, torch.from_numpy(voxels).double())
    fixed_values = values[chosen].reshape(1, 1, -1, 1)
    moving_data = m.data[None].to(torch.float32)
    out = {}
    for name, transform in maps.items():
        mapped = world if transform is None else transform.map_points(world)
        local = transform_points(m.geometry.world_to_normalized, mapped[None])
        shape = [1, -1] + [1] * (m.ndim - 1) + [m.ndim]
        moved = sample(moving_data, local.reshape(shape).to(torch.float32))
        out[name] = float(-mutual_information(fixed_values, moved.reshape(1, 1, -1, 1)))
    return out


def foreground_overlaps(
    fixed: Image, moving: Image, maps: dict[str, Transform | None], *, step: int = 1
) -> dict[str, float]:
    """Dice of the fixed image's foreground (normalised intensity above :data:`FOREGROUND`)
    with the moving image's, resampled onto the fixed grid through each map (None: the
    identity world map): how well the outlines agree (of brain-extracted images, the
    brains'). ``step``: over every ``step``-th voxel of the fixed grid along each axis."""
    grid = fixed.geometry
    every = tuple(slice(None, None, step) for _ in range(grid.ndim))
    seen = Geometry(
        tuple(-(-n // step) for n in grid.shape), grid.affine @ np.diag([step] * grid.ndim + [1])
    )
    f = normalize_intensity(_first_channel(fixed)).data[0][every] > FOREGROUND
    m = normalize_intensity(_first_channel(moving))
    out = {}
    for name, transform in maps.items():
        w = resample(m, seen, transform).data[0] > FOREGROUND
        total = float(f.sum() + w.sum())
        out[name] = 2.0 * float((f & w).sum()) / total if total else 0.0
    return out


def quality_check(
    result: Any, fixed: Image, moving: Image, *, margin: float = MARGIN
) -> dict[str, Any]:
    """Score ``result`` (a :class:`~unireg.result.RegistrationResult`) against no
    registration and, when deformable, its own linear stage, and a deformable result's
    folding against :data:`FOLDING_LIMIT`; returns ``quality_mi_*`` scores,
    ``quality_folding_percent`` (None for a linear result) and ``quality_warning`` (None
    when the result passes each check)."""
    maps: dict[str, Transform | None] = {"identity": None}
    linear = result.affine
    deformable = not isinstance(result.transform, AffineTransform)
    if deformable and linear is not None:
        maps["linear"] = linear
    maps["result"] = result.transform
    scores = similarity_scores(fixed, moving, maps)
    warning = None
    for name, what in (("identity", "no registration"), ("linear", "its own linear stage")):
        if name in scores and scores["result"] < scores[name] * (1.0 - margin):
            warning = (
                f"the result aligns the images worse than {what} (mutual information "
                f"{scores['result']:.4f} < {scores[name]:.4f} nats)"
            )
            break
    folding = None
    if deformable:
        folding = folding_percent(result.jacobian())
        if warning is None and folding > FOLDING_LIMIT:
            warning = (
                f"the result folds {folding:.1f} % of the fixed grid (Jacobian determinant <= 0; "
                f"the limit is {FOLDING_LIMIT:g} %): not a plausible anatomical map"
            )
    out: dict[str, Any] = {f"quality_mi_{k}": v for k, v in scores.items()}
    out["quality_folding_percent"] = folding
    out["quality_warning"] = warning
    return out
