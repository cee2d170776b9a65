"""Checkpoints that rebuild their own network: weights plus the constructor arguments, the
method name, the unireg version, the preprocessing the model expects and (for resuming) the
optimiser state and step. Written atomically (a temporary file renamed into place)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from unireg.methods.keymorph import KeyMorph
    from unireg.methods.sitreg import SITReg

FORMAT = "unireg-checkpoint-1"


def _builders() -> dict[str, Any]:
    from unireg.methods.keymorph import KeyMorph
    from unireg.methods.sitreg import SITReg

    return {"keymorph": KeyMorph.from_config, "sitreg": lambda config: SITReg(**config)}


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

    if not hasattr(model, "config"):
        raise TypeError("the model needs a .config dict of its constructor arguments")
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "method": method,
        "unireg_version": __version__,
        "model_config": model.config,
        "state_dict": state,
        "preprocessing": preprocessing or {},
        "train_config": train_config or {},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "step": int(step),
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from the file alone; returns ``(model, payload)`` with the model in
    eval mode and float32 on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise ValueError(f"{path}: not a readable unireg checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a unireg checkpoint (format {FORMAT} expected)")
    builders = _builders()
    method = payload["method"]
    if method not in builders:
        raise ValueError(f"{path}: unknown method {method!r}")
    model = builders[method](payload["model_config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    return model.to(device).eval(), payload


# -- the models a user runs -------------------------------------------------------------------

# SITReg's default is the lite model (strided stem): more accurate on the IXI test pairs and,
# with the affine-gn stage, 23-24x faster than ANTs SyN (docs/sitreg_ixi_evaluation.md).
# KeyMorph's is the two-stage model: best on the IXI training pairs, the rule for the default
# (docs/keymorph_evaluation.md, session 12)
DEFAULT_MODELS = {"keymorph": "keymorph_ixi_4mm_upright.pt", "sitreg": "sitreg_lite_ixi_2mm.pt"}
# the shipped models by name (``--model standard``, ``sitreg:fast:model=standard``)
SHIPPED_VARIANTS = {
    "sitreg": {"lite": "sitreg_lite_ixi_2mm.pt", "standard": "sitreg_ixi_2mm.pt"},
    # KeyMorph: the anatomical-keypoint model (the default until session 12, the two-stage
    # model's first stage), its self-supervised start, it fine-tuned further with soft Dice or
    # with a decoder (finer maps), and the two-stage model, the default
    # (docs/keymorph_evaluation.md)
    "keymorph": {
        "anatomical": "keymorph_ixi_4mm.pt",
        "selfsup": "keymorph_ixi_4mm_selfsup.pt",
        "dice": "keymorph_ixi_4mm_dice.pt",
        "decoder": "keymorph_ixi_4mm_decoder.pt",
        "upright": "keymorph_ixi_4mm_upright.pt",
    },  # fmt: skip
}
_NAMES = {"keymorph": "KeyMorph", "sitreg": "SITReg"}


def default_model_path(method: str = "keymorph", variant: str | None = None) -> Path:
    """The model of ``method`` shipped inside the package (``unireg/models/``): the default,
    or the named ``variant`` (:data:`SHIPPED_VARIANTS`)."""
    name = DEFAULT_MODELS[method] if variant is None else SHIPPED_VARIANTS[method][variant]
    return Path(__file__).resolve().parents[1] / "models" / name


def load_model(
    method: str, path: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """A ``method`` network and its checkpoint payload (the shipped default when ``path`` is
    None); the payload's ``preprocessing`` says the grid the network expects. Errors name the
    file: missing, unreadable, or a checkpoint of another method. ``path`` may also name a
    shipped variant (:data:`SHIPPED_VARIANTS`, e.g. ``"lite"`` for SITReg)."""
    if path is None:
        path = default_model_path(method)
    elif str(path) in SHIPPED_VARIANTS.get(method, {}):
        path = default_model_path(method, str(path))
    else:
        path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no {_NAMES[method]} model (train one: unireg train {method} --config ...)"
        )
    model, payload = load_checkpoint(path, device=device)
    if payload["method"] != method:
        raise ValueError(f"{path}: a {payload['method']} checkpoint, not a {_NAMES[method]} one")
    return model, payload


def load_user_model(
    method: str, path: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[Any, dict]:
    """:func:`load_model` for a user's request (command line, evaluation spec): a missing,
    unreadable or wrong-method file is a :class:`~unireg.errors.UniregError` naming it."""
    from unireg.errors import UniregError

    try:
        return load_model(method, path, device)
    except (FileNotFoundError, ValueError) as err:
        raise UniregError(str(err)) from err


def load_keymorph(
    path: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[KeyMorph, dict]:
    """:func:`load_model` for KeyMorph."""
    model, payload = load_model("keymorph", path, device)
    return model, payload  # type: ignore[return-value]


def load_sitreg(
    path: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[SITReg, dict]:
    """:func:`load_model` for SITReg."""
    model, payload = load_model("sitreg", path, device)
    return model, payload  # type: ignore[return-value]
