"""Checkpoints that rebuild their own network: weights plus the constructor arguments, the
method name, the unireg version, the preprocessing the model expects and (for resuming) the
optimiser state and step. Written atomically (a temporary file renamed into place), with a
SHA-256 digest of the contents that reading verifies; ``keep_previous`` keeps the checkpoint
it replaces as ``NAME.prev.pt`` to fall back to (:func:`read_latest_checkpoint`).

:class:`Checkpoint` is the typed form of a file; the network is rebuilt from it by the method's
registry entry (:func:`unireg.methods.load_checkpoint`), so this module needs no method code.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unireg.errors import UniregError
from unireg.io.files import write_atomic

FORMAT = "unireg-checkpoint-1"


class CheckpointError(UniregError, ValueError):
    """A checkpoint file is missing, unreadable, not a unireg checkpoint or corrupt."""


def content_digest(payload: Any) -> str:
    """SHA-256 over a checkpoint payload's contents, walked in a fixed order: dict keys
    sorted, tensors by dtype, shape and bytes. Independent of how ``torch.save`` lays the file
    out, so a flipped byte anywhere in the weights or the optimiser state changes it."""
    digest = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().reshape(-1).contiguous()
            digest.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            digest.update(f"D{len(obj)}".encode())
            for key in sorted(obj, key=repr):
                digest.update(repr(key).encode())
                walk(obj[key])
        elif isinstance(obj, list | tuple):
            digest.update(f"L{len(obj)}".encode())
            for item in obj:
                walk(item)
        else:
            digest.update(f"V{obj!r}".encode())

    walk(payload)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """The contents of a checkpoint file.

    Attributes:
        method: the registry name of the method whose network this is.
        model_config: the network's constructor arguments.
        state_dict: its weights (float16 in shipped models).
        preprocessing: the grid the network expects (``spacing_mm``, ``shape``, ``center``).
        train_config: the training config that made it.
        optimizer: the optimiser state (None in shipped models).
        step: training steps done.
        extra: method extras (e.g. KeyMorph's anatomical labels).
        unireg_version: the version that wrote it.
        path: the file it was read from, if any.
    """

    method: str
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    unireg_version: str = ""
    path: Path | None = None

    def float_state(self) -> dict[str, torch.Tensor]:
        """The weights in float32 (shipped float16 weights widened)."""
        return {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}

    def payload(self) -> dict[str, Any]:
        """The dict written to disk (plain types only, so it loads with ``weights_only``)."""
        return {
            "format": FORMAT, "method": self.method, "unireg_version": self.unireg_version,
            "model_config": self.model_config, "state_dict": self.state_dict,
            "preprocessing": self.preprocessing, "train_config": self.train_config,
            "optimizer": self.optimizer, "step": int(self.step), "extra": self.extra,
        }  # fmt: skip

    @classmethod
    def from_payload(cls, payload: Any, path: Path | None = None) -> Checkpoint:
        """Validate a loaded dict; a ``ValueError`` naming ``path`` if it is not one."""
        where = f"{path}: " if path is not None else ""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{where}not a unireg checkpoint (format {FORMAT} expected)")
        missing = [k for k in ("method", "model_config", "state_dict") if k not in payload]
        if missing:
            raise CheckpointError(f"{where}checkpoint lacks {', '.join(missing)}")
        return cls(
            method=str(payload["method"]), model_config=dict(payload["model_config"]),
            state_dict=dict(payload["state_dict"]),
            preprocessing=dict(payload.get("preprocessing") or {}),
            train_config=dict(payload.get("train_config") or {}),
            optimizer=payload.get("optimizer"), step=int(payload.get("step", 0)),
            extra=dict(payload.get("extra") or {}),
            unireg_version=str(payload.get("unireg_version", "")), path=path,
        )  # fmt: skip


def save_checkpoint(
    path: str | Path,
    method: str,
    model: nn.Module,
    *,
    preprocessing: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    half: bool = False,
    keep_previous: bool = False,
) -> Path:
    """Write ``model`` (which must carry ``model.config``, its constructor arguments) to
    ``path``, with a digest of its contents. ``half`` stores floating-point weights as float16
    (half the size; for shipping a finished model, not for resuming). ``keep_previous`` first
    moves an existing ``path`` to :func:`previous_path` (what a resume falls back to)."""
    from unireg import __version__

    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError("the model needs a .config dict of its constructor arguments")
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    checkpoint = Checkpoint(
        method=method, model_config=config, state_dict=state,
        preprocessing=preprocessing or {}, train_config=train_config or {},
        optimizer=None if optimizer is None else optimizer.state_dict(), step=int(step),
        extra=extra or {}, unireg_version=__version__,
    )  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = checkpoint.payload()
    payload["sha256"] = content_digest(payload)

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))  # then tmp -> path: never no checkpoint

    return write_atomic(path, write)


def previous_path(path: str | Path) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the checkpoint it replaced:
    ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file (on the CPU) and verify its digest (files written without one,
    by older versions, are read unverified); :class:`CheckpointError` (a ``ValueError``)
    naming the file when it is missing, unreadable, not a unireg checkpoint or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise CheckpointError(f"{path}: not a readable unireg checkpoint ({err})") from err
    if isinstance(payload, dict) and "sha256" in payload:
        stored = payload.pop("sha256")
        if content_digest(payload) != stored:
            raise CheckpointError(f"{path}: corrupt checkpoint (contents do not match its digest)")
    return Checkpoint.from_payload(payload, path)


def read_latest_checkpoint(path: str | Path) -> Checkpoint | None:
    """The checkpoint to resume from: ``path`` when it reads and verifies, else the previous
    one (:func:`previous_path`) with a message on stderr saying why; None when neither file
    exists. Raises :class:`CheckpointError` when the files exist but none is usable."""
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        return None
    problems = []
    for candidate in (path, prev):
        if not candidate.exists():
            continue
        try:
            checkpoint = read_checkpoint(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            print(f"{problems[0]}; resuming from {candidate} (step {checkpoint.step})",
                  file=sys.stderr)  # fmt: skip
        return checkpoint
    raise CheckpointError("; ".join(problems) + "; no usable checkpoint to resume from")
