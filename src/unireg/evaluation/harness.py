"""The evaluation harness: every method on the same pairs, under the same misalignments.

Robustness protocol (as the KeyMorph papers'): the moving image and its label map are rotated
about the moving image's centre by a chosen angle about 1 to 3 randomly chosen axes (seeded per
pair and angle), optionally with a translation and an isotropic scaling, and resampled onto a
grid big enough to hold the whole rotated field of view. Every method then registers the
misaligned moving image onto the fixed image, and is scored on the fixed grid.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unireg.data.manifest import Manifest
from unireg.errors import ManifestError
from unireg.io import image as image_io
from unireg.io.image import Image, LabelMap, resample
from unireg.metrics import registration_metrics
from unireg.spatial.geometry import Geometry, linear_about, rotation_about_axes
from unireg.spatial.transform import AffineTransform


@dataclass
class Pair:
    """One registration problem: image and label-map files of both subjects."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_id: str = ""
    moving_id: str = ""
    name: str = ""  # the pair's own name (a pairs CSV's ``id`` column), if any


def pairs_from_csv(path: str | Path) -> list[Pair]:
    """Pairs from a CSV with columns ``fixed, moving[, fixed_labels, moving_labels, id]``
    (paths relative to the CSV's folder unless absolute)."""
    path = Path(path)
    base = path.parent
    try:
        rows = list(csv.DictReader(path.open(newline="")))
    except OSError as e:
        raise ManifestError(f"cannot read the pairs file: {e}", path) from e
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise ManifestError("a pairs CSV needs columns fixed and moving", path)

    def p(v: str | None) -> Path | None:
        return None if not v else (Path(v) if Path(v).is_absolute() else base / v)

    return [
        Pair(
            p(r["fixed"]),
            p(r["moving"]),
            p(r.get("fixed_labels")),
            p(r.get("moving_labels")),
            Path(r["fixed"]).name,
            Path(r["moving"]).name,
            (r.get("id") or "").strip(),
        )  # fmt: skip
        for r in rows
    ]


def pairs_from_manifest(
    path: str | Path, dataset: str, split: str = "test", modality: str | None = None
) -> list[Pair]:
    """All ordered pairs of different subjects of a manifest's dataset and split."""
    entries = Manifest.read(path).select(dataset=dataset, split=split, modality=modality)
    if len(entries) < 2:
        raise ManifestError(f"fewer than 2 images for dataset={dataset} split={split}", path)
    return [
        Pair(a.image, b.image, a.labels, b.labels, a.subject, b.subject)
        for a, b in itertools.permutations(entries, 2)
        if a.subject != b.subject
    ]


def misalignment(
    geometry: Geometry,
    angle: float,
    *,
    axes: int | None = None,
    translation: float = 0.0,
    scale: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[int]]:
    """A world map ``(d+1, d+1)`` rotating by ``angle`` degrees about ``axes`` randomly chosen
    axes (1 to 3 at random when None; 3D) about the grid's centre, plus a random translation
    of up to ``translation`` mm and a random isotropic scaling within ``1 +- scale``."""
    rng = np.random.default_rng(seed)
    d = geometry.ndim
    if d == 3:
        k = int(rng.integers(1, 4)) if axes is None else int(axes)
        if not 1 <= k <= 3:
            raise ValueError("axes must be 1, 2 or 3")
        chosen = sorted(rng.choice(3, size=k, replace=False).tolist())
    else:
        chosen = []
    lin = rotation_about_axes(angle, chosen, d) * (1.0 + rng.uniform(-scale, scale))
    t = rng.uniform(-translation, translation, size=d)
    m = linear_about(lin, geometry.center_world)
    m[:d, d] += t
    return m, chosen


def covering_geometry(geometry: Geometry) -> Geometry:
    """An axis-aligned grid of the same spacing, centred on ``geometry``, whose side is the
    field of view's diagonal: it holds the field of view under any rotation about its centre."""
    d = geometry.ndim
    world = geometry.corners_world
    diag = float(np.linalg.norm(world.max(0) - world.min(0)))
    sp = min(geometry.spacing)
    n = int(math.ceil(diag / sp)) + 1
    aff = np.eye(d + 1)
    aff[:d, :d] = np.diag([sp] * d)
    aff[:d, d] = geometry.center_world - sp * (n - 1) / 2
    return Geometry((n,) * d, aff)


def misalign(
    image: Image, labels: LabelMap | None, matrix: np.ndarray
) -> tuple[Image, LabelMap | None]:
    """Move an image (and its label map) by the world map ``matrix`` (points move by it),
    resampled onto :func:`covering_geometry` so nothing leaves the field of view."""
    grid = covering_geometry(image.geometry)
    pull = AffineTransform(np.linalg.inv(matrix))  # new grid point -> original point
    out = resample(image, grid, pull)
    lab = None if labels is None else resample(labels, grid, pull)
    return out, lab


@dataclass
class Case:
    """A loaded pair with its (possibly misaligned) moving side."""

    fixed: Image
    moving: Image
    fixed_labels: LabelMap | None
    moving_labels: LabelMap | None


def load_pair(pair: Pair, *, channels: bool = False) -> Case:
    """Read a pair's files, checking each label map against its image's grid (``channels``:
    keep every channel of multi-channel images)."""
    images = image_io.load_pair(
        pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, channels=channels
    )
    return Case(*images)


METRIC_COLUMNS = [
    "dice_mean", "hd95_mean", "epe_mean_mm", "folding_percent", "jacobian_std",
    "inverse_consistency_mean_mm", "flagged", "time_s", "peak_memory_mb",
]  # fmt: skip


def endpoint_error(
    transform: Any, truth: Any, fixed: Image, labels: LabelMap | None, points: int = 50_000
) -> float:
    """Mean end-point error (mm) of ``transform`` against the true fixed -> moving map
    ``truth``, over the fixed voxels inside the label map's foreground (all voxels without
    one), at most ``points`` of them (an even subsample)."""
    import torch

    from unireg.metrics import target_registration_error
    from unireg.spatial.field import world_points

    world = world_points(fixed.geometry, dtype=torch.float64).reshape(-1, fixed.ndim)
    if labels is not None:
        world = world[(labels.data.reshape(-1) > 0).to(world.device)]
    step = max(1, world.shape[0] // points)
    sample = world[::step]
    truth_points = truth.map_points(sample)
    return float(target_registration_error(transform, sample, truth_points)["tre_mean_mm"])


@dataclass
class Registered:
    """One registration of an evaluation run as it was made: its row, the images it
    registered (after the shift and the misalignment), the fixed labels, the result and its
    metrics."""

    row: dict[str, Any]
    fixed: Any
    moving: Any
    fixed_labels: Any
    result: Any
    metrics: dict[str, Any]


def evaluate(
    pairs: Sequence[Pair],
    methods: Sequence[Any],
    angles: Sequence[float] = (0.0,),
    *,
    axes: int | None = None,
    translation: float = 0.0,
    scale: float = 0.0,
    seed: int = 0,
    hd95: bool = True,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    shifts: Sequence[str] = ("none",),
    quality: bool = True,
    on_result: Callable[[Registered], None] | None = None,
    warmup: bool = False,
) -> list[dict[str, Any]]:
    """Run every method on every pair under every shift (:mod:`unireg.evaluation.shifts`) at
    every misalignment angle; one row per (pair, shift, angle, method) with the pair, the
    shift, the misalignment and the metrics of :data:`METRIC_COLUMNS` (Dice and HD95 when both
    label maps are given, nearest-neighbour label warping; the end-point error in mm when the
    shift knows the true map; ``flagged``: 1 when :func:`unireg.quality.quality_check` finds
    the result worse than no registration or than its own linear stage). ``on_result`` sees
    each registration with its inputs (for per-case reports) as it is made. With ``warmup``
    each method first registers the first pair once, untimed and unrecorded (a GPU's start-up
    and kernel selection), so the times per pair are those of a method already running."""
    from tqdm import tqdm

    from unireg.evaluation.shifts import apply_shift, check_shift, misaligned_truth
    from unireg.quality import quality_check

    for name in shifts:
        check_shift(name)
    rows: list[dict[str, Any]] = []
    if warmup and pairs:
        first = load_pair(pairs[0])
        for method in methods:
            method.register(first.fixed, first.moving, seed=seed)
    jobs = list(enumerate(pairs))
    bar = tqdm(jobs, desc="pairs", unit="pair", disable=not progress)
    for index, pair in bar:
        loaded = load_pair(pair)
        for shift in shifts:
            case = apply_shift(shift, loaded.fixed, loaded.moving, loaded.fixed_labels,
                               loaded.moving_labels, seed=seed * 100003 + index)  # fmt: skip
            for angle in angles:
                case_seed = seed * 100003 + index * 1009 + int(round(angle * 10))
                matrix, chosen = misalignment(
                    case.moving.geometry, angle, axes=axes, translation=translation,
                    scale=scale, seed=case_seed,
                )  # fmt: skip
                moving, moving_labels, truth = case.moving, case.moving_labels, case.truth
                if angle != 0 or translation or scale:
                    moving, moving_labels = misalign(case.moving, case.moving_labels, matrix)
                    truth = misaligned_truth(truth, matrix)
                for method in methods:
                    bar.set_postfix_str(f"{method.label} {shift} @ {angle:g} deg")
                    result = method.register(case.fixed, moving, seed=seed)
                    metrics = registration_metrics(
                        result, fixed_labels=case.fixed_labels, moving_labels=moving_labels,
                        hd95=hd95,
                    )  # fmt: skip
                    if truth is not None:
                        metrics["epe_mean_mm"] = endpoint_error(
                            result.transform, truth, case.fixed, case.fixed_labels
                        )
                    if quality:  # 1 when the result is worse than no registration
                        checked = quality_check(result, case.fixed, moving)
                        metrics["flagged"] = float(checked["quality_warning"] is not None)
                    row = {
                        "fixed": pair.fixed_id or str(pair.fixed),
                        "moving": pair.moving_id or str(pair.moving),
                        "method": method.label,
                        "shift": shift,
                        "angle": angle,
                        "axes": "".join("xyz"[a] for a in chosen),
                        **{k: metrics.get(k, float("nan")) for k in METRIC_COLUMNS},
                    }
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    if on_result is not None:
                        on_result(Registered(row, case.fixed, moving, case.fixed_labels,
                                             result, metrics))  # fmt: skip
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of every metric per (method, shift, angle), in first-seen
    order."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["method"], str(r.get("shift", "none")), float(r["angle"]))
        groups.setdefault(key, []).append(r)
    out = []
    for (method, shift, angle), rs in groups.items():
        entry: dict[str, Any] = {"method": method, "shift": shift, "angle": angle,
                                 "pairs": len(rs)}  # fmt: skip
        for k in METRIC_COLUMNS:
            vals = np.array([float(r.get(k, "nan")) for r in rs], float)
            vals = vals[np.isfinite(vals)]
            entry[f"{k}_mean"] = float(vals.mean()) if vals.size else float("nan")
            entry[f"{k}_std"] = float(vals.std()) if vals.size else float("nan")
        out.append(entry)
    return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± std)."""
    cols = [
        ("Dice", "dice_mean", 3), ("HD95 (mm)", "hd95_mean", 2),
        ("end-point error (mm)", "epe_mean_mm", 2),
        ("folding %", "folding_percent", 3), ("Jacobian std", "jacobian_std", 3),
        ("inverse consistency (mm)", "inverse_consistency_mean_mm", 3),
        ("flagged", "flagged", 2),
        ("time (s)", "time_s", 2), ("peak memory (MiB)", "peak_memory_mb", 0),
    ]  # fmt: skip
    known = [c for c in cols if any(math.isfinite(s[f"{c[1]}_mean"]) for s in summary)]
    cols = known or cols[:1]
    head = "| method | shift | angle | pairs | " + " | ".join(c[0] for c in cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    for s in summary:
        cells = []
        for _, key, digits in cols:
            m, sd = s[f"{key}_mean"], s[f"{key}_std"]
            cells.append("" if not math.isfinite(m) else f"{m:.{digits}f} ± {sd:.{digits}f}")
        lines.append(
            f"| {s['method']} | {s.get('shift', 'none')} | {s['angle']:g} | {s['pairs']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"
