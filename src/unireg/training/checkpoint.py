"""Checkpoints that rebuild their own network: weights plus the constructor arguments, the
method name, the unireg version, the preprocessing the model expects and (for resuming) the
optimiser state and step. Written atomically (a temporary file renamed into place).

:class:`Checkpoint` is the typed form of a file; the network is rebuilt from it by the method's
registry entry (:func:`unireg.methods.load_checkpoint`), so this module needs no method code.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "unireg-checkpoint-1"


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
            raise ValueError(f"{where}not a unireg checkpoint (format {FORMAT} expected)")
        missing = [k for k in ("method", "model_config", "state_dict") if k not in payload]
        if missing:
            raise ValueError(f"{where}checkpoint lacks {', '.join(missing)}")
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
) -> Path:
    """Write ``model`` (which must carry ``model.config``, its constructor arguments) to
    ``path``. ``half`` stores floating-point weights as float16 (half the size; for shipping
    a finished model, not for resuming)."""
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(checkpoint.payload(), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file (on the CPU); ``FileNotFoundError`` or ``ValueError`` naming the
    file when it is missing, unreadable or not a unireg checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise ValueError(f"{path}: not a readable unireg checkpoint ({err})") from err
    return Checkpoint.from_payload(payload, path)
