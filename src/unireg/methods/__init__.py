"""Registration methods behind one interface: the registry, the ``Method`` protocol, each
method's options, and one package per method family (``solver``, ``keymorph``, ``sitreg``).

Importing this package loads no torch: the registry and the options are plain Python.
"""

from unireg.methods.base import (
    Method,
    MethodEntry,
    MethodOptions,
    OptionError,
    OptionInfo,
    Prompts,
    option,
)
from unireg.methods.registry import (
    create,
    entries,
    get,
    load_checkpoint,
    load_model,
    model_path,
    options_for,
    parse_spec,
    trainable,
)

__all__ = [
    "Method",
    "MethodEntry",
    "MethodOptions",
    "OptionError",
    "OptionInfo",
    "Prompts",
    "create",
    "entries",
    "get",
    "load_checkpoint",
    "load_model",
    "model_path",
    "option",
    "options_for",
    "parse_spec",
    "trainable",
]
