"""Evaluation metrics the field reports, in physical units.

- :func:`dice`: per label and mean over the labels present in the fixed map.
- :func:`hausdorff95`: per-label 95th-percentile symmetric Hausdorff distance in mm, with the
  voxel spacing (MONAI's convention: the larger of the two directed 95th percentiles of the
  distances between the labels' surface voxels).
- :func:`jacobian_stats`: % of voxels with det J <= 0 (folding), std, min, max.
- :func:`consistency_error`: how far a chain of transforms that should be the identity moves
  world points (inverse consistency, cycle consistency), in mm.
- :func:`target_registration_error`: landmark distances in mm.
- :func:`registration_metrics`: all of them for one registration, as a flat dict for CSV/JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unireg.io.image import Image, LabelMap, resample
from unireg.losses import label_indices
from unireg.spatial.field import (
    displacement_jacobian_determinant,
    folding_percent,
    world_points,
)
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import CompositeTransform, Transform

ArrayLike = np.ndarray | torch.Tensor


def _labels_array(labels: ArrayLike | Image) -> np.ndarray:
    if isinstance(labels, Image):
        labels = labels.data
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim in (3, 4) and arr.shape[0] == 1:
        arr = arr[0]
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError("label maps must hold integer values")
        arr = arr.astype(np.int64)
    return arr


def _pair(fixed: ArrayLike | Image, warped: ArrayLike | Image) -> tuple[np.ndarray, np.ndarray]:
    f, w = _labels_array(fixed), _labels_array(warped)
    if f.shape != w.shape:
        raise ValueError(f"label maps have different shapes {f.shape} and {w.shape}")
    return f, w


def _select(fixed: np.ndarray, labels: Sequence[int] | None, background: int) -> list[int]:
    if labels is not None:
        return [int(v) for v in labels]
    return [int(v) for v in np.unique(fixed) if v != background]


def dice(
    fixed: ArrayLike | Image,
    warped: ArrayLike | Image,
    labels: Sequence[int] | None = None,
    *,
    background: int = 0,
) -> dict[int, float]:
    """Dice ``2|F_k & W_k| / (|F_k| + |W_k|)`` per label.

    ``labels`` defaults to every label present in ``fixed`` except ``background``. A label in
    neither map gets NaN; a label in only one gets 0.
    """
    f, w = _pair(fixed, warped)
    chosen = _select(f, labels, background)
    if not chosen:
        return {}
    # one pass: each voxel's label position (or "other"), then counts
    fi = label_indices(torch.as_tensor(f.astype(np.int64).ravel()), chosen).numpy()
    wi = label_indices(torch.as_tensor(w.astype(np.int64).ravel()), chosen).numpy()
    n = len(chosen) + 1
    count_f = np.bincount(fi, minlength=n)
    count_w = np.bincount(wi, minlength=n)
    inter = np.bincount(fi[fi == wi], minlength=n)
    out: dict[int, float] = {}
    for i, k in enumerate(chosen):
        denom = int(count_f[i] + count_w[i])
        out[k] = float("nan") if denom == 0 else 2.0 * int(inter[i]) / denom
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border counts as
    outside)."""
    from scipy import ndimage  # 0.3 s to import: only when label maps are compared

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _label_boxes(labels: np.ndarray, chosen: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """Each chosen label's bounding box in ``labels`` (None when absent), from one pass over
    the map."""
    from scipy import ndimage

    index = label_indices(torch.as_tensor(labels.astype(np.int64)), chosen).numpy()
    positions = np.where(index < len(chosen), index + 1, 0)  # 1-based, 0 = other
    found = ndimage.find_objects(positions.astype(np.int32), max_label=len(chosen))
    return {int(k): found[i] for i, k in enumerate(chosen)}


def hausdorff95(
    fixed: ArrayLike | Image,
    warped: ArrayLike | Image,
    labels: Sequence[int] | None = None,
    *,
    spacing: Sequence[float] | None = None,
    percentile: float = 95.0,
    background: int = 0,
) -> dict[int, float]:
    """Percentile symmetric Hausdorff distance per label, in mm (voxels if no spacing).

    For each label, the distances from every surface voxel of one map to the nearest surface
    voxel of the other are exact Euclidean distances (SciPy's k-d tree on the surface voxels'
    positions), respecting ``spacing`` (taken from an :class:`Image` when not given); the
    result is the larger of the two directed ``percentile``-th percentiles. NaN when the
    label is missing from either map.
    """
    from scipy.spatial import cKDTree

    if spacing is None and isinstance(fixed, Image):
        spacing = fixed.spacing
    f, w = _pair(fixed, warped)
    sp = np.ones(f.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sp.shape != (f.ndim,):
        raise ValueError(f"spacing {tuple(sp)} does not match a {f.ndim}D label map")
    out: dict[int, float] = {}
    chosen = _select(f, labels, background)
    boxes_f, boxes_w = _label_boxes(f, chosen), _label_boxes(w, chosen)
    for k in chosen:
        bf, bw = boxes_f[k], boxes_w[k]
        if bf is None or bw is None:
            out[k] = float("nan")
            continue
        # crop to the union's bounding box (+1 voxel): every surface voxel lies inside it, so
        # the distance transforms restricted to it are exact
        box = tuple(
            slice(max(min(a.start, b.start) - 1, 0), min(max(a.stop, b.stop) + 1, n))
            for a, b, n in zip(bf, bw, f.shape, strict=True)
        )
        pf = np.argwhere(_surface(f[box] == k)) * sp  # surface voxels, mm in the box
        pw = np.argwhere(_surface(w[box] == k)) * sp
        to_w = cKDTree(pw).query(pf)[0]
        to_f = cKDTree(pf).query(pw)[0]
        out[k] = float(max(np.percentile(to_w, percentile), np.percentile(to_f, percentile)))
    return out


def transform_jacobian(
    transform: Transform,
    geometry: Geometry,
    *,
    device: torch.device | str | None = None,
    displacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jacobian determinant of a world transform on the voxels of ``geometry``, with respect to
    world coordinates (mm/mm): 1 keeps volume, <= 0 is folding. ``(*geometry.shape)``.
    ``displacement``: the transform's displacement on ``geometry`` when already computed
    (:meth:`~unireg.spatial.transform.Transform.displacement`)."""
    if displacement is None:
        displacement = transform.displacement(geometry, device=device)
    return displacement_jacobian_determinant(displacement, geometry)


def jacobian_stats(det: torch.Tensor, mask: ArrayLike | None = None) -> dict[str, float]:
    """Folding % (det <= 0), std, mean, min and max of a Jacobian-determinant map, within
    ``mask`` (non-zero voxels) when given."""
    values = det.detach().double().reshape(-1)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        m = m.reshape(-1).to(values.device).bool()
        if m.numel() != values.numel():
            raise ValueError("mask and Jacobian map differ in size")
        values = values[m]
    if values.numel() == 0:
        raise ValueError("no voxel to compute Jacobian statistics on")
    return {
        "folding_percent": folding_percent(values),
        "jacobian_std": float(values.std(unbiased=False)),
        "jacobian_mean": float(values.mean()),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
    }


def consistency_error(
    transforms: Sequence[Transform],
    geometry: Geometry,
    *,
    mask: ArrayLike | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Distance (mm) by which a chain that should be the identity moves the voxel centres of
    ``geometry``: mean, 95th percentile and max (within ``mask``).

    The chain is in ANTs order (first applied first): ``[forward, inverse]`` measures inverse
    consistency on the fixed grid; ``[T_ab, T_ba]`` cycle consistency of two registrations run
    in opposite directions; any longer loop works the same way. Computed in float32 (world
    coordinates of a few hundred mm: about 1e-5 mm of rounding, far below any error reported).
    """
    x = world_points(geometry, device=device, dtype=torch.float32)
    y = CompositeTransform(list(transforms)).map_points(x)
    err = torch.linalg.vector_norm(y - x, dim=-1).reshape(-1)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        err = err[m.reshape(-1).to(err.device).bool()]
    if err.numel() == 0:
        raise ValueError("no voxel to measure consistency on")
    return {
        "mean_mm": float(err.mean()),
        "p95_mm": float(np.percentile(err.cpu().numpy(), 95)),
        "max_mm": float(err.max()),
    }


def target_registration_error(
    transform: Transform, fixed_points: ArrayLike, moving_points: ArrayLike
) -> dict[str, Any]:
    """Landmark error ``|T(p_fixed) - p_moving|`` in mm: mean, std, median, max and the
    per-landmark distances. Points are ``(N, d)`` world coordinates (mm) of matched
    landmarks."""
    pf = torch.as_tensor(np.asarray(fixed_points, dtype=np.float64))
    pm = torch.as_tensor(np.asarray(moving_points, dtype=np.float64))
    if pf.shape != pm.shape or pf.ndim != 2 or pf.shape[1] != transform.ndim:
        raise ValueError(
            f"landmarks must be matched (N, {transform.ndim}) arrays, got {tuple(pf.shape)} and "
            f"{tuple(pm.shape)}"
        )
    dist = torch.linalg.vector_norm(transform.map_points(pf) - pm, dim=-1)
    return {
        "tre_mean_mm": float(dist.mean()),
        "tre_std_mm": float(dist.std(unbiased=False)),
        "tre_median_mm": float(dist.median()),
        "tre_max_mm": float(dist.max()),
        "tre_per_point_mm": [float(v) for v in dist],
    }


def _nanmean(values: dict[int, float]) -> float:
    finite = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def label_metrics(
    fixed_labels: LabelMap | ArrayLike,
    warped_labels: LabelMap | ArrayLike,
    *,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[str, Any]:
    """Dice (per label and mean) and HD95 (per label and mean, mm) as a flat dict:
    ``dice_mean``, ``dice_<label>``, ``hd95_mean``, ``hd95_<label>``, ``num_labels``."""
    d = dice(fixed_labels, warped_labels, labels)
    out: dict[str, Any] = {"num_labels": len(d), "dice_mean": _nanmean(d)}
    h: dict[int, float] = {}
    if hd95:
        h = hausdorff95(fixed_labels, warped_labels, list(d), spacing=spacing)
        out["hd95_mean"] = _nanmean(h)
    for k, v in d.items():
        out[f"dice_{k}"] = v
    for k, v in h.items():
        out[f"hd95_{k}"] = v
    return out


def registration_metrics(
    result: Any = None,
    *,
    transform: Transform | None = None,
    fixed: Geometry | Image | None = None,
    inverse: Transform | None = None,
    reverse: Transform | None = None,
    moving: Geometry | Image | None = None,
    fixed_labels: LabelMap | None = None,
    moving_labels: LabelMap | None = None,
    label_interpolation: str = "nearest",
    labels: Sequence[int] | None = None,
    mask: ArrayLike | None = None,
    fixed_landmarks: ArrayLike | None = None,
    moving_landmarks: ArrayLike | None = None,
    hd95: bool = True,
) -> dict[str, Any]:
    """Every metric that applies to one registration, as a flat JSON/CSV-ready dict.

    Pass a :class:`~unireg.result.RegistrationResult` (or ``transform`` + ``fixed`` grid, and
    ``inverse`` + ``moving`` grid when there is one). With both label maps: Dice and HD95 of
    the moving labels warped onto the fixed labels' grid with ``label_interpolation`` (stated
    in the output). Always: Jacobian statistics of the transform on the fixed grid (within
    ``mask``). With an inverse: inverse consistency in mm on the fixed grid. With ``reverse``
    (the transform of the registration run the other way, moving onto fixed): cycle
    consistency in mm on the fixed grid. With landmarks: TRE. With a result: its wall time and
    peak memory.
    """
    if result is not None:
        transform = transform or result.transform
        fixed = fixed or result.fixed
        inverse = inverse or result.inverse
        moving = moving or result.moving
    if transform is None or fixed is None:
        raise ValueError("registration_metrics needs a result, or a transform and a fixed grid")
    geom = fixed.geometry if isinstance(fixed, Image) else fixed
    out: dict[str, Any] = {}
    if fixed_labels is not None and moving_labels is not None:
        warped = resample(moving_labels, fixed_labels.geometry, transform, mode=label_interpolation)
        out.update(label_metrics(fixed_labels, warped, labels=labels, hd95=hd95))
        out["label_interpolation"] = label_interpolation
    elif (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed_labels and moving_labels, or neither")
    shared = result is not None and transform is result.transform
    det = result.jacobian() if shared else transform_jacobian(transform, geom)
    stats = jacobian_stats(det, mask)
    out.update(stats)
    if inverse is not None:
        ic = consistency_error([transform, inverse], geom, mask=mask)
        out.update({f"inverse_consistency_{k}": v for k, v in ic.items()})
    if reverse is not None:
        cc = consistency_error([transform, reverse], geom, mask=mask)
        out.update({f"cycle_consistency_{k}": v for k, v in cc.items()})
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("give both fixed_landmarks and moving_landmarks, or neither")
    if fixed_landmarks is not None:
        tre = target_registration_error(transform, fixed_landmarks, moving_landmarks)
        out.update({k: v for k, v in tre.items() if k != "tre_per_point_mm"})
    if result is not None:
        if result.elapsed is not None:
            out["time_s"] = float(result.elapsed)
        if result.peak_memory is not None:
            out["peak_memory_mb"] = result.peak_memory / 2**20
    return out


def json_ready(metrics: dict[str, Any]) -> dict[str, Any]:
    """Replace NaN/inf by None so that the dict is valid (strict) JSON."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in metrics.items()}
