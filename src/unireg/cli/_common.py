"""Helpers the verbs share (imported when a verb runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unireg.cli import imports_done
from unireg.errors import UniregError

imports_done()  # torch is in: the collector paused by the command line may run again


def device(name: str) -> torch.device:
    """The torch device of ``--device``; a named error for an unknown device and when CUDA is
    asked for but absent."""
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise UniregError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UniregError(f"--device {name} was asked for but CUDA is not available here")
    return dev


def threads(args: Any) -> int:
    """Set torch's CPU threads from ``--threads`` (see :func:`unireg.cpu.configure_threads`);
    returns the number set."""
    from unireg.cpu import configure_threads

    try:
        n, _ = configure_threads(getattr(args, "threads", None))
    except ValueError as err:
        raise UniregError(str(err)) from err
    return n


def check_output_file(path: str | Path, what: str = "--output") -> Path:
    """Refuse an output file path before any work: a known image extension, not a folder,
    and a writable place (its folder, or the nearest existing folder above it)."""
    import os

    from unireg.io.image import image_suffix
    from unireg.io.outputs import OutputPathError

    out = Path(path)
    image_suffix(out)
    if out.is_dir():
        raise OutputPathError(f"{what} is a folder; give a file name such as out.nii.gz", out)
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputPathError(f"{what} exists and is not writable", out)
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what}: cannot write into this folder (no permission)", folder)
    return out


def command_line(args: Any) -> list[str]:
    """The command as the user typed it (set by :func:`unireg.cli.main`; ``sys.argv`` when a
    verb's ``run`` is called directly)."""
    import sys

    return list(getattr(args, "command_line", None) or ["unireg", *sys.argv[1:]])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    from unireg.io.files import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def label_names(args: Any) -> dict[int, str] | None:
    """The ``--label-names`` table, read once and kept on ``args`` (read before any heavy
    work, so a bad file is refused at once)."""
    if getattr(args, "label_names", None) is None:
        return None
    table: dict[int, str] | None = getattr(args, "label_names_table", None)
    if table is None:
        from unireg.io.label_names import read_label_names

        table = read_label_names(args.label_names)
        args.label_names_table = table
    return table
