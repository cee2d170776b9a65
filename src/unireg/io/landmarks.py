"""Landmark files: matched points in world millimetres.

A landmark file is a CSV of one point per row, ``x,y,z`` (or ``x,y`` in 2D) in the world frame
of the NIfTI headers (RAS+ mm, the frame every unireg transform maps), with an optional header
row. Row ``i`` of the fixed file corresponds to row ``i`` of the moving file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from unireg.errors import LandmarkError
from unireg.io.files import check_input_file


def read_landmarks(path: str | Path, ndim: int = 3) -> np.ndarray:
    """The points of a landmark file, ``(N, ndim)`` float64 world mm. A named
    :class:`~unireg.errors.LandmarkError` when a row is not ``ndim`` numbers, a value is not
    finite, or there is no point."""
    path = Path(path)
    check_input_file(path, "landmark")
    rows: list[list[float]] = []
    with path.open(newline="") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            try:
                values = [float(c) for c in cells]
            except ValueError:
                if number == 1 and not rows:  # a header
                    continue
                raise LandmarkError(f"row {number} is not {ndim} numbers: {row}", path) from None
            if len(values) != ndim:
                raise LandmarkError(
                    f"row {number} has {len(values)} values, expected {ndim} (world mm)", path
                )
            rows.append(values)
    points = np.asarray(rows, dtype=np.float64).reshape(-1, ndim)
    if points.shape[0] == 0:
        raise LandmarkError("holds no point", path)
    if not np.isfinite(points).all():
        raise LandmarkError("holds a value that is not finite", path)
    return points


def read_landmark_pair(
    fixed: str | Path, moving: str | Path, ndim: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Matched fixed and moving points (world mm); a :class:`LandmarkError` naming the moving
    file when the counts differ."""
    pf, pm = read_landmarks(fixed, ndim), read_landmarks(moving, ndim)
    if pf.shape != pm.shape:
        raise LandmarkError(
            f"holds {pm.shape[0]} points and the fixed file {pf.shape[0]}: rows must match",
            moving,
        )
    return pf, pm
