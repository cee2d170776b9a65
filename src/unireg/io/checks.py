"""Guards that turn a bad file into a named error before its voxels are read: claimed sizes
against the file and the free memory, missing or degenerate orientations, label values that do
not fit. (Checks of loaded images, such as constant ones, are in :mod:`unireg.io.image`.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unireg.errors import (
    EmptyFileError,
    ImageTooLargeError,
    LabelValueError,
    OrientationError,
    UnreadableFileError,
)

# what a label map may hold: it is written as (at most) a 32-bit signed integer
LABEL_MIN, LABEL_MAX = -(2**31), 2**31 - 1
# deflate never compresses better than about 1032:1, so a gzip file of n bytes holds less than
# 1032 n bytes: a header that claims more is lying (or the file was cut short)
DEFLATE_MAX_RATIO = 1032
AXIS_CODES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def parse_bytes(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"1000000"`` -> bytes (powers of 1024)."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    return int(float(number) * scale)


def memory_available() -> int | None:
    """Bytes of memory this process may still use: the system's available memory
    (``MemAvailable``), capped by ``UNIREG_MEMORY_LIMIT`` (e.g. ``8G``) when set; None when
    neither can be told."""
    limit = os.environ.get("UNIREG_MEMORY_LIMIT")
    capped = parse_bytes(limit) if limit else None
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    if capped is None:
        return available
    return capped if available is None else min(capped, available)


def _gzip_size(path: Path) -> int:
    """The uncompressed size a gzip file's last member declares (its ISIZE trailer, mod
    2**32): the whole size for the usual one-member file, read without decompressing. In a
    file cut short these four bytes are whatever came before the cut."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def check_claimed_size(
    path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int, *, label: bool
) -> None:
    """Refuse a file whose header claims more voxel data than the file holds, or more than
    the free memory could take, before any of it is read."""
    nvox = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if nvox == 0:
        raise EmptyFileError(f"image holds no voxels (shape {tuple(shape)})", path)
    raw = nvox * np.dtype(dtype).itemsize
    claimed = offset + raw
    name = str(path).lower()
    if name.endswith((".gz", ".mgz")):
        if claimed > DEFLATE_MAX_RATIO * path.stat().st_size + 1024:
            raise UnreadableFileError(
                f"header lies: shape {tuple(shape)} {np.dtype(dtype)} claims {_bytes(claimed)}, "
                f"more than {_bytes(path.stat().st_size)} of gzip can hold (deflate compresses "
                f"at most {DEFLATE_MAX_RATIO}:1)",
                path,
            )
        if _gzip_size(path) != claimed % 2**32:
            # not the usual one-member file of exactly header + voxels: read the whole stream
            # (its CRC and length checked), which a cut or corrupt file fails
            total, whole = _gzip_stream_size(path)
            if not whole:
                raise UnreadableFileError("truncated or corrupt gzip stream", path)
            if total < claimed:
                raise UnreadableFileError(
                    f"header lies: shape {tuple(shape)} {np.dtype(dtype)} claims "
                    f"{_bytes(claimed)} but the file decompresses to {_bytes(total)}",
                    path,
                )
    else:
        held = path.stat().st_size
        if held < claimed:
            raise UnreadableFileError(
                f"truncated or header lies: shape {tuple(shape)} {np.dtype(dtype)} claims "
                f"{_bytes(claimed)} but the file holds {_bytes(held)}",
                path,
            )
    needed = raw + nvox * (8 if label else 4)  # the file's array and its int64/float32 copy
    available = memory_available()
    if available is not None and needed > available:
        raise ImageTooLargeError(
            f"shape {tuple(shape)} {np.dtype(dtype)} needs about {_bytes(needed)} of memory to "
            f"read, but {_bytes(available)} is available (UNIREG_MEMORY_LIMIT caps it)",
            path,
        )


def _gzip_stream_size(path: Path) -> tuple[int, bool]:
    """Decompressed bytes of a gzip file, counted without keeping them, and whether the whole
    stream read cleanly (every member's CRC and length verified by :mod:`gzip`)."""
    import gzip
    import zlib

    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                total += len(block)
    except (OSError, EOFError, zlib.error):
        return total, False  # cut short or corrupt
    return total, True


def check_affine(affine: np.ndarray, path: Path | None, ndim: int) -> None:
    """Refuse a voxel-to-world matrix that is not finite or not invertible (zero or singular
    sform/qform), or a 2D slice whose plane is not the world's axial plane."""
    if not np.all(np.isfinite(affine)):
        raise OrientationError("voxel-to-world affine holds NaN or infinite values", path)
    linear = affine[:ndim, :ndim]
    sv = np.linalg.svd(linear, compute_uv=False)
    if sv[-1] <= 1e-6 * max(sv[0], 1e-12) or sv[-1] < 1e-6:
        extra = ""
        if ndim == 2:
            extra = (
                "; a 2D slice must lie in the world's axial (x, y) plane, stored as (X, Y) "
                "or (X, Y, 1)"
            )
        raise OrientationError(
            f"voxel-to-world affine is singular (voxel sizes {np.round(sv, 6).tolist()} mm)"
            + extra,
            path,
        )


def orientation_affine(codes: str, zooms: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The 4x4 affine of an array whose axes point along ``codes`` (``"RAS"``, ``"LPS"``...)
    with voxel sizes ``zooms`` (mm), centred on the world origin: what
    ``--assume-orientation`` gives a file that carries no orientation."""
    codes = codes.upper()
    axes = [AXIS_CODES.get(c) for c in codes]
    if len(codes) != 3 or None in axes or len({a[0] for a in axes if a}) != 3:
        raise OrientationError(f"--assume-orientation {codes!r}: give three axis codes, e.g. RAS")
    out = np.eye(4)
    out[:3, :3] = 0.0
    size = [*shape[:3], 1, 1, 1][:3]
    zoom = [*(abs(z) if z else 1.0 for z in zooms[:3]), 1.0, 1.0, 1.0][:3]
    for axis, code in enumerate(axes):
        assert code is not None
        world, sign = code
        out[world, axis] = sign * zoom[axis]
    out[:3, 3] = -out[:3, :3] @ ((np.array(size, float) - 1) / 2)
    return out


def check_label_values(array: np.ndarray, path: Path | None) -> None:
    """Refuse label values that are not integers or do not fit a 32-bit signed integer."""
    if array.size == 0:
        return
    lo, hi = array.min(), array.max()
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise LabelValueError("label map holds non-integer values", path)
    if float(lo) < LABEL_MIN or float(hi) > LABEL_MAX:
        raise LabelValueError(
            f"label values range over [{lo:.6g}, {hi:.6g}]; labels must fit a 32-bit signed "
            f"integer [{LABEL_MIN}, {LABEL_MAX}]",
            path,
        )
