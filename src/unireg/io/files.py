"""File-system helpers shared by every reader and writer: input checks and atomic writes."""

from __future__ import annotations

import glob
import gzip
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unireg.errors import EmptyFileError, ImageNotFoundError, UnreadableFileError


def check_input_file(path: Path, what: str = "image") -> None:
    """Raise a named error unless ``path`` is an existing, non-empty regular file."""
    if not path.exists():
        raise ImageNotFoundError(f"no such {what} file", path)
    if path.is_dir():
        raise UnreadableFileError(f"is a directory, not a {what} file", path)
    if path.stat().st_size == 0:
        raise EmptyFileError(f"{what} file is empty (0 bytes)", path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` atomically.

    On any error the temporary file is removed and ``path`` is left untouched, so no
    half-written output ever exists under the final name. The file gets the permissions the
    umask allows (as ``open`` would give it), not the temporary file's 0600. The temporary
    name carries the writer's pid; temporary files of ``path`` left by writers that no longer
    run (killed with SIGKILL) are removed first.
    """
    path = Path(path)
    if not path.parent.exists():
        raise ImageNotFoundError("output folder does not exist", path.parent)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    _remove_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.PID.*.tmp*`` files beside ``path`` whose writer process is gone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive, but another user's
            continue


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


# gzip levels of written NIfTI files when none is asked for: images and label maps compress
# 2-10x at level 1; float32 displacement fields only by about 12 % at any level, for 0.4 s per
# 16 MB field, so they are stored (level 0: still a valid .nii.gz every reader opens)
IMAGE_COMPRESSLEVEL = 1
FIELD_COMPRESSLEVEL = 0


def write_nibabel(image: Any, path: str | Path, compresslevel: int) -> Path:
    """Write a nibabel image atomically; a ``.nii.gz`` at gzip ``compresslevel`` (0-9) with a
    zero timestamp, so equal images give byte-identical files. Other formats as nibabel
    writes them."""
    if not 0 <= compresslevel <= 9:
        raise ValueError(f"gzip compression level must be 0-9, got {compresslevel}")
    if not str(path).lower().endswith(".nii.gz"):
        import nibabel as nib

        return write_atomic(path, lambda tmp: nib.save(image, str(tmp)))

    def write(tmp: Path) -> None:
        data = image.to_bytes()
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(
                fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0, filename=""
            ) as gz,
        ):
            gz.write(data)

    return write_atomic(path, write)
