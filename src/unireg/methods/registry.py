"""The method registry: one line per method package.

Each package in :data:`PACKAGES` declares ``METHODS``, a tuple of
:class:`~unireg.methods.base.MethodEntry`, in an ``__init__`` that imports no torch. The
command line (``register``, ``train``, ``models``), ``unireg evaluate`` and checkpoint loading
all read the registry, so a new method is its own package plus one line here.

Spec strings name a method and its options in one token: ``NAME[:POSITIONAL][:key=value]...``
(``keymorph:tps:lam=0.1``, ``sitreg:fast:model=standard``, ``syn:preset=accurate``); a
method with a ``family`` may also be written ``family:NAME...`` (``unireg:syn``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from unireg.errors import UniregError
from unireg.methods.base import (
    Method,
    MethodEntry,
    MethodOptions,
    OptionError,
    import_object,
    models_dir,
)

if TYPE_CHECKING:  # pathlib, torch: imported when used (the CLI's --help needs neither)
    from pathlib import Path

    from torch import nn

    from unireg.training.checkpoint import Checkpoint

# one line per method package
PACKAGES = (
    "unireg.methods.solver",
    "unireg.methods.keymorph",
    "unireg.methods.sitreg",
    "unireg.methods.dio",
    "unireg.methods.avsm",
)


@cache
def entries() -> dict[str, MethodEntry]:
    """Every registered method by name, in registry order."""
    out: dict[str, MethodEntry] = {}
    for package in PACKAGES:
        for entry in importlib.import_module(package).METHODS:
            if entry.name in out:
                raise RuntimeError(f"method {entry.name!r} is registered twice")
            out[entry.name] = entry
    return out


def get(name: str) -> MethodEntry:
    """The entry of ``name``; an :class:`OptionError` listing the methods otherwise."""
    found = entries().get(name)
    if found is None:
        raise OptionError(f"unknown method {name!r}; choose from {', '.join(entries())}")
    return found


def parse_spec(spec: str) -> tuple[MethodEntry, MethodOptions]:
    """The entry and validated options of a spec string (see the module docstring)."""
    parts = [p.strip() for p in spec.strip().split(":") if p.strip()]
    if not parts:
        raise OptionError(f"empty method spec {spec!r}")
    head, rest = parts[0], parts[1:]
    families = {e.family for e in entries().values() if e.family}
    if head in families and head not in entries():
        if not rest or "=" in rest[0]:
            members = [e.name for e in entries().values() if e.family == head]
            raise OptionError(f"{spec!r}: name a {head} method ({', '.join(members)})")
        head, rest = rest[0], rest[1:]
    entry = get(head)
    values: dict[str, Any] = {}
    positional = entry.options.positional()
    if rest and "=" not in rest[0]:
        if positional is None:
            raise OptionError(f"{spec!r}: {entry.name} takes no unnamed option ({rest[0]!r})")
        values[positional.spec] = rest[0]
        rest = rest[1:]
    for item in rest:
        if "=" not in item:
            raise OptionError(f"{spec!r}: option {item!r} is not key=value")
        key, value = item.split("=", 1)
        values[key.strip().replace("-", "_")] = value.strip()
    return entry, entry.options.from_mapping(values, where=spec.strip(), method=entry.name)


def options_for(name: str, values: Mapping[str, Any] | None = None) -> MethodOptions:
    """Validated options of method ``name`` from a mapping (a config table, flags)."""
    entry = get(name)
    return entry.options.from_mapping(values or {}, where=name, method=name)


def create(
    spec: str | MethodEntry, options: MethodOptions | None = None, device: str = "cpu"
) -> Method:
    """A method ready to run, from a spec string or an entry and its options (its network,
    if any, loaded on ``device``); with ``brain = "auto"`` (the default) it runs on the pair
    :func:`~unireg.methods.extraction.inference.match_extraction` makes of its inputs."""
    if isinstance(spec, str):
        entry, parsed = parse_spec(spec)
        options = options or parsed
    else:
        entry = spec
        options = options or entry.options()
    if not isinstance(options, entry.options):
        raise OptionError(f"{entry.name} takes {entry.options.__name__}")
    method = entry.build(options, device)
    if options.brain == "auto":  # built from its name, as every method is
        from unireg.methods.extraction import MATCHED

        return import_object(MATCHED)(method, device)
    return method


def model_path(method: str, model: str | Path | None = None) -> Path:
    """The checkpoint file of ``model`` for ``method``: its default shipped model when None,
    a shipped model by name (``entry.models``), or a path."""
    from pathlib import Path

    entry = get(method)
    if model is None:
        if entry.default_model is None:
            raise OptionError(f"{method} ships no model")
        return models_dir() / entry.models[entry.default_model]
    if str(model) in entry.models:
        return models_dir() / entry.models[str(model)]
    return Path(model)


def load_checkpoint(path: str | Path, *, device: Any = "cpu") -> tuple[nn.Module, Checkpoint]:
    """Rebuild a network from a checkpoint file alone (its method's registry entry builds it);
    returns ``(model, checkpoint)``, the model in eval mode and float32 on ``device``.
    ``FileNotFoundError`` / ``ValueError`` naming the file on failure."""
    from unireg.training.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    entry = entries().get(checkpoint.method)
    if entry is None or entry.network is None:
        raise ValueError(f"{path}: unknown method {checkpoint.method!r}")
    model = import_object(entry.network)(checkpoint.model_config)
    model.load_state_dict(checkpoint.float_state())
    return model.to(device).eval(), checkpoint


def load_model(
    method: str, model: str | Path | None = None, *, device: Any = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """A ``method`` network and its checkpoint: the shipped default when ``model`` is None, a
    shipped model by name, or a file. A missing, unreadable or other-method file is a
    :class:`~unireg.errors.UniregError` naming it."""
    path = model_path(method, model)
    if not path.is_file():
        raise UniregError(
            f"no {method} model (train one: unireg train {method} --config ...)", path
        )
    try:
        network, checkpoint = load_checkpoint(path, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise UniregError(str(err)) from err
    if checkpoint.method != method:
        raise UniregError(f"a {checkpoint.method} checkpoint, not a {method} one", path)
    return network, checkpoint


def trainable() -> list[str]:
    """The methods with a trainer."""
    return [name for name, e in entries().items() if e.trainer is not None]
