"""Helpers the verbs share (imported when a verb runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unireg.errors import UniregError


def device(name: str) -> torch.device:
    """The torch device of ``--device``; a named error when CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UniregError("--device cuda was asked for but CUDA is not available here")
    return torch.device(name)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    from unireg.io.files import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
