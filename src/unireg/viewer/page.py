"""The interactive HTML report of one registration: one self-contained page built on NiiVue.

Every volume the page shows is computed here on a *report grid* (the fixed or moving grid
regridded to ``resolution`` mm, never finer than the input) and embedded as a base64
``.nii.gz``; NiiVue's bundle, the page's script and style are inlined, so the page makes no
network request of any kind and opens from a file or an e-mail attachment.

Volumes (world coordinates RAS+ mm, as every NIfTI unireg writes):

- ``fixed``, ``moving`` (moving before registration, on its own grid) and ``warped`` (the
  moving image pulled through the transform onto the fixed report grid, in one interpolation
  from the input) as 8-bit display copies (0.5-99.5 percentile window of each input; the
  warped image uses the moving image's window);
- (the page itself builds the checkerboard of fixed and warped from those two, in blocks of
  ``CHECKER_MM``);
- ``labels``: the fixed label map itself (not drawn: the read-out under the views names the
  label at the crosshair and its Dice from it);
- ``outline``: the boundary voxels of the fixed label map, each keeping its label value (in
  3D, and ``outline_axial``/``_coronal``/``_sagittal`` within each viewing plane);
- ``logjac``: ``log2`` of the transform's Jacobian determinant (int8, 1/32 steps, clipped to
  [-2, 2]), ``folds``: the report voxels that hold a folded (det <= 0) voxel of the full grid;
- ``grid``: the deformation as grid sheets (every ``grid_mm`` mm of the moving world) pulled
  back onto the fixed grid; each sheet's value (1, 2, 3) names the fixed world axis its
  normal is closest to, so a view of one plane hides the sheets parallel to it;
- ``kp_fixed``, ``kp_moving``: KeyMorph's keypoints as small spheres (fixed keypoints on the
  fixed grid; the moving keypoints, value 1, and where the transform sends the fixed ones,
  value 2, joined by a line, value 3, on the moving grid).
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from unireg.io.files import write_atomic
from unireg.io.image import Image, LabelMap, affine_to_4x4, percentile_range, resample
from unireg.spatial.field import displacement_jacobian_determinant, world_points
from unireg.spatial.geometry import Geometry, apply_matrix_np
from unireg.spatial.keypoints import fit_affine
from unireg.spatial.transform import Transform

REPORT_RESOLUTION = 2.0  # mm: the default report grid spacing
GRID_MM = 10.0  # mm between the deformation grid's sheets (in the moving world)
LOGJAC_STEP = 1.0 / 32.0  # log2 Jacobian quantisation of the embedded volume
LOGJAC_LIMIT = 2.0  # |log2 det| shown up to this (det 1/4 .. 4)
LOGJAC_SHOWN = 0.15  # |log2 det| below this (volume change under about 11 %) is not coloured
CHECKER_MM = 16.0  # edge of a checkerboard block, mm
GZIP_LEVEL = 6


@dataclass(frozen=True)
class Keypoints:
    """KeyMorph's keypoints in world mm (RAS+), ``(n, d)`` each: detected on the fixed and
    on the moving image, and the fixed keypoints mapped by the transform (``aligned``, in the
    moving world)."""

    fixed: np.ndarray
    moving: np.ndarray
    aligned: np.ndarray


# --------------------------------------------------------------------------------------------
# Volumes on the report grid
# --------------------------------------------------------------------------------------------


def report_grid(geometry: Geometry, resolution: float) -> Geometry:
    """``geometry`` regridded to ``resolution`` mm voxels along every axis finer than that
    (same axes, centre and field of view); axes already coarser, and grids coarser
    everywhere, are kept."""
    if resolution <= 0:
        raise ValueError(f"report resolution must be > 0 mm, got {resolution}")
    spacing = geometry.spacing
    if min(spacing) >= resolution * (1 - 1e-6):
        return geometry
    return geometry.regrid([max(s, resolution) for s in spacing])


def _first_channel(image: Image) -> Image:
    return image if image.data.shape[0] == 1 else image.with_data(image.data[:1])


def display_window(image: Image) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of an image's first channel: its display window."""
    lo, hi = percentile_range(image.data[0].float())
    return lo, hi if hi > lo else lo + 1.0


def to_uint8(data: torch.Tensor, window: tuple[float, float]) -> np.ndarray:
    """Intensities scaled to 0-255 by ``window`` (clipped)."""
    lo, hi = window
    scaled = ((data.float() - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0
    return scaled.round().to(torch.uint8).cpu().numpy()


def label_outline(labels: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """The boundary voxels of a label map: a labelled voxel with a differently labelled
    neighbour along one of ``axes`` (all by default), or on the array's edge along one, keeps
    its label; all others are 0. The outline seen in one plane takes that plane's two axes
    (a label thin across the plane would otherwise fill it)."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    for axis in range(lab.ndim) if axes is None else axes:
        if lab.shape[axis] < 2:
            continue
        differs = np.diff(lab, axis=axis) != 0
        lead = [slice(None)] * lab.ndim
        lead[axis] = slice(0, -1)
        trail = [slice(None)] * lab.ndim
        trail[axis] = slice(1, None)
        edge[tuple(lead)] |= differs
        edge[tuple(trail)] |= differs
        first = [slice(None)] * lab.ndim
        first[axis] = 0
        last = [slice(None)] * lab.ndim
        last[axis] = -1
        edge[tuple(first)] = True
        edge[tuple(last)] = True
    return np.where(edge & (lab != 0), lab, 0).astype(lab.dtype)


def world_axes(geometry: Geometry) -> list[int]:
    """The world axis (0 R, 1 A, 2 S) each array axis runs closest to."""
    d = geometry.ndim
    return [int(np.argmax(np.abs(geometry.affine[:d, i]))) for i in range(d)]


def label_centres(labels: np.ndarray, geometry: Geometry) -> dict[int, list[float]]:
    """For every non-zero label, the world position (mm) of its voxel nearest to its
    centroid: a point inside the label even where the centroid is not (a C-shaped
    structure)."""
    lab = np.asarray(labels)
    flat = lab.reshape(-1).astype(np.int64)
    if flat.size == 0 or flat.min() < 0:
        return {}
    counts = np.bincount(flat)
    present = np.nonzero(counts)[0]
    present = present[present != 0]
    idx = np.indices(lab.shape).reshape(lab.ndim, -1).astype(np.float64)
    means = np.stack([np.bincount(flat, weights=c, minlength=counts.size) for c in idx])
    means /= np.maximum(counts, 1)
    inside = np.nonzero(flat)[0]
    dist = ((idx[:, inside] - means[:, flat[inside]]) ** 2).sum(0)
    order = np.lexsort((dist, flat[inside]))  # by label, then by distance
    first = np.unique(flat[inside][order], return_index=True)[1]
    nearest = idx[:, inside[order[first]]]
    world = apply_matrix_np(geometry.voxel_to_world, nearest.T)
    return {int(k): [float(v) for v in world[i]] for i, k in enumerate(present)}


def fold_mask(det: torch.Tensor, geometry: Geometry, grid: Geometry) -> np.ndarray:
    """The voxels of ``grid`` that hold a folded (``det <= 0``) voxel of ``geometry``: the
    fold mask dilated by one report voxel's extent, then sampled at the report voxels."""
    folds = (det <= 0).float()[None, None]
    if not bool(folds.any()):
        return np.zeros(grid.shape, np.uint8)
    kernel = [max(1, math.ceil(g / s)) | 1 for g, s in zip(grid.spacing, geometry.spacing,
                                                             strict=True)]  # fmt: skip
    pool = torch.nn.functional.max_pool3d if det.ndim == 3 else torch.nn.functional.max_pool2d
    dilated = pool(folds, kernel, stride=1, padding=[k // 2 for k in kernel])
    mask = LabelMap(dilated[0].to(torch.uint8), geometry.affine)
    return resample(mask, grid).data[0].numpy().astype(np.uint8)


def log_jacobian(det: torch.Tensor) -> torch.Tensor:
    """``log2`` of a Jacobian determinant, clipped to ``±LOGJAC_LIMIT`` (folded voxels at the
    lower limit)."""
    return torch.log2(det.clamp_min(2.0**-LOGJAC_LIMIT)).clamp(-LOGJAC_LIMIT, LOGJAC_LIMIT)


def grid_sheets(points: torch.Tensor, grid: Geometry, spacing_mm: float = GRID_MM) -> np.ndarray:
    """The deformation grid on ``grid``: the voxels whose mapped point (``points``, the moving
    world position of each voxel, ``(d, *grid.shape)`` mm) lies within half a voxel of a sheet
    ``x_k = n * spacing_mm`` of the moving world. A sheet voxel's value is 1 + the fixed world
    axis closest to the sheet's normal (from the least-squares linear part of the map), so
    sheets can be hidden in the view of the plane they lie in."""
    d = grid.ndim
    pts = points.reshape(d, -1).double().cpu()
    world = world_points(grid, dtype=torch.float64)[0].reshape(-1, d)
    step = max(1, world.shape[0] // 20000)
    fit = fit_affine(world[None, ::step], pts.T[None, ::step])[0].numpy()
    linear = fit[:d, :d]  # d(point_k)/d(world_j)
    pts = pts.numpy()
    out = np.zeros(pts.shape[1], np.uint8)
    half = min(grid.spacing) / 2.0
    for k in range(d):
        gradient = linear[k]
        # thickness along the sheet's normal: half a voxel, in the moving world's units
        width = half * max(float(np.linalg.norm(gradient)), 1e-6)
        r = np.abs(pts[k] - spacing_mm * np.round(pts[k] / spacing_mm))
        normal = int(np.argmax(np.abs(gradient)))
        out[(r < width) & (out == 0)] = normal + 1
    return out.reshape(grid.shape)


def marker_volume(
    groups: list[tuple[np.ndarray, int]],
    grid: Geometry,
    radius_vox: float = 2.0,
    segments: tuple[np.ndarray, np.ndarray, int] | None = None,
) -> np.ndarray:
    """Small spheres at world points (mm) on ``grid``: ``groups`` of ``(points (n, d),
    value)``, later groups over earlier ones; ``segments`` ``(starts, ends, value)`` draws
    the straight line between each pair of points first (one-voxel wide)."""
    d = grid.ndim
    shape = np.array(grid.shape)
    out = np.zeros(grid.shape, np.uint8)

    def voxels(points: np.ndarray) -> np.ndarray:
        return apply_matrix_np(grid.world_to_voxel, np.asarray(points, np.float64).reshape(-1, d))

    def paint(v: np.ndarray, value: int) -> None:
        v = np.round(v).astype(int)
        keep = np.all((v >= 0) & (v < shape), axis=1)
        out[tuple(v[keep].T)] = value

    if segments is not None:
        starts, ends, value = segments
        for a, b in zip(voxels(starts), voxels(ends), strict=True):
            steps = max(2, int(np.ceil(2 * np.abs(b - a).max())) + 1)
            paint(a + np.linspace(0.0, 1.0, steps)[:, None] * (b - a), value)
    r = int(math.ceil(radius_vox))
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * d, indexing="ij"), -1).reshape(-1, d)
    offsets = offsets[(offsets**2).sum(1) <= radius_vox**2]
    for points, value in groups:
        for c in np.round(voxels(points)).astype(int):
            paint(c + offsets, value)
    return out


def nifti_base64(
    array: np.ndarray, geometry: Geometry, *, slope: float = 1.0, intercept: float = 0.0
) -> str:
    """A volume on ``geometry`` as base64 ``.nii.gz`` (sform and qform = the grid's affine;
    ``slope`` and ``intercept`` as ``scl_slope``/``scl_inter``). 2D grids are one slice."""
    data = np.asarray(array)
    if geometry.ndim == 2:
        data = data[..., None]
    img = nib.Nifti1Image(data, affine_to_4x4(geometry.affine))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(slope, intercept)
    raw = gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
    return base64.b64encode(raw).decode("ascii")


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _static(name: str) -> str:
    return resources.files("unireg.viewer").joinpath("static", name).read_text("utf-8")


def niivue_version() -> str:
    """The version of the NiiVue bundle the pages inline."""
    return str(json.loads(_static("niivue.json"))["version"])


def _label_rows(
    metrics: Mapping[str, Any],
    centres: dict[int, list[float]],
    names: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if not key.startswith("dice_") or not key[5:].isdigit():
            continue
        label = int(key[5:])
        dice = float(value)
        hd = metrics.get(f"hd95_{label}")
        rows.append({"label": label, "name": (names or {}).get(label),
                     "dice": None if math.isnan(dice) else dice,
                     "hd95": None if hd is None or math.isnan(float(hd)) else float(hd),
                     "centre": centres.get(label)})  # fmt: skip
    # the labels that fail most first (labels without a Dice last)
    return sorted(rows, key=lambda r: (r["dice"] is None, r["dice"] or 0.0, r["label"]))


_SETTING_KEYS = ("method", "spec", "fallback", "unireg_version", "threads", "command")


def _tables(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The page's metrics and settings tables from a ``metrics.json`` dict: per-label
    entries go to the label table, inputs and the command line to the settings."""
    shown: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in metrics.items():
        per_label = key[:5] in ("dice_", "hd95_") and key[5:].isdigit()
        if per_label or key == "tre_per_point_mm":
            continue
        if key in _SETTING_KEYS or key == "inputs":
            settings[key] = value
        elif isinstance(value, (int, float, str, bool)) or value is None:
            shown[key] = value
        else:
            settings[key] = value
    return shown, settings


def _json_for_script(value: Any) -> str:
    text = json.dumps(value, allow_nan=False, default=str)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_report(
    fixed: Image,
    moving: Image,
    transform: Transform,
    *,
    metrics: Mapping[str, Any] | None = None,
    fixed_labels: LabelMap | None = None,
    displacement: torch.Tensor | None = None,
    keypoints: Keypoints | None = None,
    resolution: float = REPORT_RESOLUTION,
    title: str = "unireg registration",
    label_names: Mapping[int, str] | None = None,
) -> str:
    """The report page (HTML text) of a registration of ``moving`` onto ``fixed`` by
    ``transform`` (fixed world -> moving world, mm).

    ``displacement`` is the forward world displacement on the fixed grid (``(d, *shape)``
    mm, as :meth:`~unireg.result.RegistrationResult.displacement`), computed when not
    given; ``metrics`` is the ``metrics.json`` dict (per-label Dice and HD95 feed the label
    table); ``label_names`` names the label values (:mod:`unireg.io.label_names`);
    ``resolution`` is the report grid's voxel size in mm."""
    metrics = dict(metrics or {})
    fixed, moving = _first_channel(fixed), _first_channel(moving)
    fixed, moving = fixed.with_data(fixed.data.cpu()), moving.with_data(moving.data.cpu())
    fgrid = report_grid(fixed.geometry, resolution)
    mgrid = report_grid(moving.geometry, resolution)
    fwin, mwin = display_window(fixed), display_window(moving)
    fixed_r = resample(fixed, fgrid).data[0]
    warped_r = resample(moving, fgrid, transform).data[0]
    moving_r = resample(moving, mgrid).data[0]
    f8, w8, m8 = to_uint8(fixed_r, fwin), to_uint8(warped_r, mwin), to_uint8(moving_r, mwin)
    block = [max(1, round(CHECKER_MM / s)) for s in fgrid.spacing]  # the page builds it

    if displacement is None:
        displacement = transform.displacement(fixed.geometry)
    disp = displacement.detach().float().cpu()
    det = displacement_jacobian_determinant(disp, fixed.geometry)
    logjac_full = Image(log_jacobian(det)[None], fixed.geometry.affine)
    logjac = resample(logjac_full, fgrid, padding="border").data[0]
    logjac_q = torch.round(logjac / LOGJAC_STEP).clamp(-127, 127).to(torch.int8).numpy()
    folds = fold_mask(det, fixed.geometry, fgrid)
    # each report voxel's moving world position: its world position plus the displacement
    moved = transform.displacement(fgrid).detach().float().cpu()
    moved += world_points(fgrid)[0].movedim(-1, 0)
    grid = grid_sheets(moved, fgrid)

    volumes = {
        "fixed": nifti_base64(f8, fgrid),
        "warped": nifti_base64(w8, fgrid),
        "moving": nifti_base64(m8, mgrid),
        "logjac": nifti_base64(logjac_q, fgrid, slope=LOGJAC_STEP),
        "folds": nifti_base64(folds, fgrid),
        "grid": nifti_base64(grid, fgrid),
    }
    labels: list[dict[str, Any]] = []
    if fixed_labels is not None:
        fixed_labels = fixed_labels.with_data(fixed_labels.data.cpu())
        lab_r = resample(fixed_labels, fgrid).data[0].numpy()
        top = int(lab_r.max(initial=0))
        dtype = np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32
        volumes["labels"] = nifti_base64(lab_r.astype(dtype), fgrid)  # for the read-out
        volumes["outline"] = nifti_base64(label_outline(lab_r).astype(dtype), fgrid)
        # the outline of each viewing plane (sagittal, coronal, axial: normal R, A, S)
        to_world = world_axes(fgrid)
        for name, normal in (("outline_sagittal", 0), ("outline_coronal", 1),
                             ("outline_axial", 2)):  # fmt: skip
            in_plane = tuple(a for a in range(fgrid.ndim) if to_world[a] != normal)
            volumes[name] = nifti_base64(label_outline(lab_r, in_plane).astype(dtype), fgrid)
        centres = label_centres(lab_r, fgrid)  # on the grid the page shows
        labels = _label_rows(metrics, centres, label_names)
        if not labels:  # no Dice in the metrics: the labels alone, for the outline colours
            labels = [{"label": k, "name": (label_names or {}).get(k), "dice": None,
                       "hd95": None, "centre": c}
                      for k, c in sorted(centres.items())]  # fmt: skip
    kp: dict[str, Any] | None = None
    if keypoints is not None:
        volumes["kp_fixed"] = nifti_base64(marker_volume([(keypoints.fixed, 1)], fgrid), fgrid)
        pairs = (np.asarray(keypoints.moving), np.asarray(keypoints.aligned), 3)
        volumes["kp_moving"] = nifti_base64(
            marker_volume([(keypoints.moving, 1), (keypoints.aligned, 2)], mgrid, segments=pairs),
            mgrid,
        )
        residual = np.linalg.norm(np.asarray(keypoints.aligned) - keypoints.moving, axis=1)
        kp = {"fixed": np.asarray(keypoints.fixed).tolist(),
              "moving": np.asarray(keypoints.moving).tolist(),
              "aligned": np.asarray(keypoints.aligned).tolist(),
              "residual_mm": residual.tolist()}  # fmt: skip
    shown, settings = _tables(metrics)
    folded = int((det <= 0).sum())
    data = {
        "title": title,
        "ndim": fixed.ndim,
        "volumes": volumes,
        "labels": labels,
        "metrics": shown,
        "settings": settings,
        "keypoints": kp,
        "grid_mm": GRID_MM,
        "checker_block": block + [1] * (3 - len(block)),
        "logjac_limit": LOGJAC_LIMIT,
        "logjac_min": LOGJAC_SHOWN,
        "folded_voxels": folded,
        "report_grid": {
            "fixed": {"shape": list(fgrid.shape), "spacing": list(fgrid.spacing)},
            "moving": {"shape": list(mgrid.shape), "spacing": list(mgrid.spacing)},
        },  # fmt: skip
        "niivue": niivue_version(),
    }
    return render_page(title, _finite(data), "report.js")


def render_page(title: str, data: Mapping[str, Any], script: str) -> str:
    """One self-contained page: the template with the style, NiiVue's bundle, the data (as
    JSON) and the page's script inlined."""
    import html

    page = _static("report.html")
    parts = {
        "{{TITLE}}": html.escape(title),
        "{{STYLE}}": _static("report.css"),
        "{{DATA}}": _json_for_script(data),
        "{{NIIVUE}}": _static("niivue.umd.js") if script == "report.js" else "",  # index: none
        "{{SCRIPT}}": _static(script),
    }
    out = []
    rest = page
    # one pass over the template, so inlined text is never searched for placeholders
    while True:
        hits = [(rest.find(k), k) for k in parts if rest.find(k) >= 0]
        if not hits:
            out.append(rest)
            break
        at, key = min(hits)
        out.extend([rest[:at], parts[key]])
        rest = rest[at + len(key) :]
    return "".join(out)


def write_report(path: str | Path, page: str) -> Path:
    """Write a page atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# From a register output folder
# --------------------------------------------------------------------------------------------


def read_keypoints_csv(path: str | Path) -> Keypoints:
    """``keypoints.csv`` as written by ``unireg register --method keymorph``."""
    import csv

    from unireg.errors import UnreadableFileError

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError("no keypoints")
        axes = [a for a in "xyz" if f"fixed_{a}" in rows[0]]

        def column(kind: str) -> np.ndarray:
            return np.array([[float(r[f"{kind}_{a}"]) for a in axes] for r in rows])

        return Keypoints(column("fixed"), column("moving"), column("aligned"))
    except (OSError, KeyError, ValueError) as err:
        raise UnreadableFileError(f"not a keypoints table ({err})", path) from err


def folder_report(
    outdir: str | Path,
    *,
    fixed: str | Path | None = None,
    moving: str | Path | None = None,
    fixed_labels: str | Path | None = None,
    resolution: float = REPORT_RESOLUTION,
    assume_orientation: str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> tuple[str, list[str]]:
    """The report page of a ``unireg register`` output folder, and warnings.

    The inputs are read from the paths ``metrics.json`` records (``fixed``, ``moving`` and
    ``fixed_labels`` override them); an input whose SHA-256 differs from the recorded one
    gives a warning. Raises :class:`~unireg.errors.UniregError` naming the missing or
    mismatched file before any heavy work."""
    from unireg.errors import GridMismatchError, ImageNotFoundError, UniregError
    from unireg.io.image import check_same_grid, load_image, load_labels
    from unireg.io.outputs import sha256_file
    from unireg.io.transforms import load_displacement_field

    out = Path(outdir)
    if not out.is_dir():
        raise ImageNotFoundError("is not a unireg register output folder", out)
    metrics_path, field_path = out / "metrics.json", out / "transform.nii.gz"
    for needed in (metrics_path, field_path):
        if not needed.is_file():
            raise ImageNotFoundError(
                f"missing: {out} is not a unireg register output folder", needed
            )
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as err:
        raise UniregError(f"not readable JSON ({err})", metrics_path) from err
    recorded = metrics.get("inputs", {}) if isinstance(metrics, dict) else {}
    warnings: list[str] = []

    def source(name: str, given: str | Path | None, required: bool) -> Path | None:
        if given is not None:
            return Path(given)
        record = recorded.get(name)
        if record is None:
            if required:
                raise UniregError(f"records no {name} input; give --{name.replace('_', '-')}",
                                  metrics_path)  # fmt: skip
            return None
        path = Path(record["path"])
        if not path.is_file():
            raise ImageNotFoundError(
                f"the {name} input recorded in {metrics_path} is gone; give "
                f"--{name.replace('_', '-')}", path,
            )  # fmt: skip
        if record.get("sha256") and sha256_file(path) != record["sha256"]:
            warnings.append(f"{path}: changed since the registration (SHA-256 differs)")
        return path

    fixed_p = source("fixed", fixed, True)
    moving_p = source("moving", moving, True)
    labels_p = source("fixed_labels", fixed_labels, False)
    assert fixed_p is not None and moving_p is not None
    fixed_img = load_image(fixed_p, assume_orientation=assume_orientation)
    moving_img = load_image(moving_p, assume_orientation=assume_orientation)
    transform = load_displacement_field(field_path)
    if not transform.geometry.same_grid(fixed_img.geometry, atol=1e-3):
        raise GridMismatchError(f"is not on the fixed image's grid ({fixed_p})", field_path)
    labels = None
    if labels_p is not None:
        labels = load_labels(labels_p, assume_orientation=assume_orientation)
        check_same_grid(fixed_img, labels)
    kp_path = out / "keypoints.csv"
    keypoints = read_keypoints_csv(kp_path) if kp_path.is_file() else None
    title = f"{metrics.get('spec', 'registration')}: {moving_p.name} onto {fixed_p.name}"
    page = build_report(
        fixed_img, moving_img, transform, metrics=metrics, fixed_labels=labels,
        displacement=transform.field, keypoints=keypoints, resolution=resolution, title=title,
        label_names=label_names,
    )  # fmt: skip
    return page, warnings


# --------------------------------------------------------------------------------------------
# The index page of an evaluation run
# --------------------------------------------------------------------------------------------


def build_index(
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    *,
    plots: Mapping[str, bytes] | None = None,
    links: list[str | None] | None = None,
    settings: Mapping[str, Any] | None = None,
    title: str = "unireg evaluation",
) -> str:
    """The index page of an evaluation (HTML text): the summary table, the plots (PNG bytes,
    embedded), every case with a link to its page (``links[i]`` for ``rows[i]``, relative)
    and the run's settings. Self-contained like the report pages, without NiiVue."""
    data = {
        "title": title,
        "rows": [dict(r) for r in rows],
        "summary": [dict(s) for s in summary],
        "links": list(links) if links is not None else [None] * len(rows),
        "plots": {
            name: base64.b64encode(png).decode("ascii") for name, png in (plots or {}).items()
        },
        "settings": dict(settings or {}),
    }
    return render_page(title, _finite(data), "index.js")
