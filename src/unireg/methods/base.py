"""What a registration method declares: its options, its registry entry and the ``Method``
protocol every method object follows.

This module imports neither torch nor NumPy: the command line builds its parser from the
entries without loading any network code. A method's options are a dataclass of
:class:`MethodOptions`; each field carries its help, its choices, its command-line flag and its
key in spec strings (``keymorph:tps:lam=0.1``), so the flags, the spec strings and the config
form (a mapping) all come from one declaration and are validated in one place.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, get_type_hints

from unireg.errors import UniregError

if TYPE_CHECKING:
    from pathlib import Path

    from unireg.io.image import Image, LabelMap
    from unireg.result import RegistrationResult


class OptionError(UniregError, ValueError):
    """A method option has a wrong name, type or value, or options that exclude each other."""


def option(
    default: Any,
    *,
    help: str,
    choices: tuple[Any, ...] | None = None,
    flag: str | None = None,
    spec: str | None = None,
    positional: bool = False,
    minimum: float | None = None,
) -> Any:
    """A field of a :class:`MethodOptions` dataclass.

    Args:
        default: the value when not given.
        help: one line for ``--help`` and the docs.
        choices: the allowed values, if a closed set.
        flag: the command-line flag (default ``--name-with-dashes``).
        spec: the key in spec strings (default the field name).
        positional: the value stands unnamed right after the method in a spec string
            (``keymorph:tps`` for ``transform="tps"``).
        minimum: the smallest allowed value of a number.
    """
    meta = {"help": help, "choices": choices, "flag": flag, "spec": spec,
            "positional": positional, "minimum": minimum}  # fmt: skip
    return field(default=default, metadata=meta)


def resolution_option(users: str) -> Any:
    """The ``resolution`` option (flag ``--resolution``) of learned methods that match the two
    images' resolution first (:func:`unireg.methods.pipeline.resolution_matched`), by default
    (each method's default chosen on IXI training pairs with 5 mm moving slices)."""
    return option(
        "match", choices=("match", "native"),
        help=f"{users}: 'match' blurs the finer image along each axis where the other's voxels "
        "are longer (a thick-slice profile) before the affine stage and the network; 'native' "
        "leaves both as they are",
    )  # fmt: skip


# number formats of a network's convolutions at inference
# (:func:`unireg.methods.pipeline.network_dtype`)
PRECISIONS = ("auto", "float32", "bfloat16")


def precision_option(users: str, what: str) -> Any:
    """The ``precision`` option (flag ``--precision``) of learned methods whose network can run
    its convolutions in bfloat16 (``what``: the part that does; the rest stays float32)."""
    return option(
        "auto", choices=PRECISIONS,
        help=f"{users}: the number format of {what}; auto: bfloat16 on CPUs with native "
        "bfloat16 (AVX512-BF16 or AMX), float32 elsewhere",
    )  # fmt: skip


def model_option() -> Any:
    """The ``model`` option of learned methods: a checkpoint file or a shipped model's name."""
    return option(
        None,
        help="keymorph, sitreg, dio, avsm: checkpoint file or shipped model name (default: the "
        "shipped default; `unireg models` lists them)",
    )


def parse_iterations(text: str, example: str = "100,50,10") -> tuple[int, int, int]:
    """``"I4,I2,I1"``: a solver's iteration caps at 1/4, 1/2 and full resolution (counts >= 0,
    not all 0; a level with 0 is skipped). ``example`` goes into the error message."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or max(values) == 0:
        raise OptionError(
            f"iterations must be three counts >= 0 for 1/4, 1/2 and full resolution "
            f"(e.g. {example}), got {text!r}"
        )
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class OptionInfo:
    """One option as the command line, the spec strings and the docs see it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    flag: str
    spec: str
    positional: bool
    minimum: float | None


def _base_type(hint: Any) -> type:
    """``int`` of ``int``, ``str`` of ``str | None``."""
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    return args[0] if args else hint


def _coerce(info: OptionInfo, value: Any, where: str) -> Any:
    if value is None:
        if info.default is None:
            return None
        raise OptionError(f"{where}: option {info.spec!r} needs a value")
    kind = info.type
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = low in ("true", "1", "yes")
            elif not isinstance(value, bool | int):
                raise ValueError(value)
            value = bool(value)
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            value = int(value)
        elif kind is float:
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError) as err:
        raise OptionError(
            f"{where}: option {info.spec!r} must be {kind.__name__}, got {value!r}"
        ) from err
    if info.choices is not None and value not in info.choices:
        raise OptionError(
            f"{where}: option {info.spec!r} must be one of {', '.join(map(str, info.choices))}; "
            f"got {value!r}"
        )
    if info.minimum is not None and value < info.minimum:
        raise OptionError(f"{where}: option {info.spec!r} must be >= {info.minimum}, got {value}")
    return value


OptionsT = TypeVar("OptionsT", bound="MethodOptions")

# the ``brain`` option every method has (:func:`unireg.methods.registry.create`)
BRAIN_MODES = ("auto", "off")


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: frozen, validated once when built
    (:meth:`from_mapping`, or the constructor followed by :meth:`check`)."""

    method: ClassVar[str] = ""

    brain: str = option(
        "auto", choices=BRAIN_MODES,
        help="every method: when exactly one image is brain-extracted (zero outside the brain) "
        "and the other a whole head, register the head stripped to its brain mask (the "
        "brain-mask network; unireg.methods.extraction); off: the images as given",
    )  # fmt: skip

    @classmethod
    def infos(cls) -> list[OptionInfo]:
        """The options, in declaration order."""
        hints = get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            out.append(
                OptionInfo(
                    name=f.name,
                    type=_base_type(hints[f.name]),
                    default=f.default,
                    help=meta.get("help", ""),
                    choices=meta.get("choices"),
                    flag=meta.get("flag") or "--" + f.name.replace("_", "-"),
                    spec=meta.get("spec") or f.name,
                    positional=bool(meta.get("positional")),
                    minimum=meta.get("minimum"),
                )
            )
        return out

    @classmethod
    def positional(cls) -> OptionInfo | None:
        """The option that stands unnamed in spec strings, if any."""
        return next((i for i in cls.infos() if i.positional), None)

    @classmethod
    def from_mapping(
        cls: type[OptionsT], values: Mapping[str, Any], *, where: str = "", method: str = ""
    ) -> OptionsT:
        """Options from a mapping keyed by spec key or field name (a spec string's
        ``key=value`` pairs, a config file's table, command-line flags) for the registered
        ``method``; every value is coerced to its type and checked, unknown keys are an
        :class:`OptionError`."""
        where = where or cls.method
        infos = cls.infos()
        by_key = {i.spec: i for i in infos} | {i.name: i for i in infos}
        unknown = sorted(k for k in values if k not in by_key)
        if unknown:
            known = ", ".join(i.spec for i in infos) or "none"
            raise OptionError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {known})")
        kwargs = {by_key[k].name: _coerce(by_key[k], v, where) for k, v in values.items()}
        out = cls(**kwargs)
        out.check(where, method or cls.method)
        return out

    def check(self, where: str = "", method: str = "") -> None:
        """Raise an :class:`OptionError` for values that exclude each other, for the registered
        ``method`` (several methods may share one options class)."""

    def to_dict(self) -> dict[str, Any]:
        """The options by field name (the config form)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_spec(self, method: str = "") -> str:
        """The spec string that rebuilds these options for ``method`` (non-default values
        only)."""
        parts = [method or self.method]
        for info in self.infos():
            value = getattr(self, info.name)
            if info.positional:
                if value is not None:
                    parts.append(str(value))
            elif value != info.default:
                parts.append(f"{info.spec}={value}")
        return ":".join(parts)


@dataclass(frozen=True)
class Prompts:
    """What a user may give beside the two images: label maps (a soft-Dice prompt of
    ``label_weight`` when > 0; otherwise they only score the result), landmarks (world mm,
    ``(N, d)`` arrays), and a fixed-grid mask restricting the similarity."""

    fixed_labels: LabelMap | None = None
    moving_labels: LabelMap | None = None
    label_weight: float = 0.0
    fixed_landmarks: Any = None
    moving_landmarks: Any = None
    landmark_weight: float = 1.0
    mask: Image | None = None

    def uses(self) -> list[str]:
        """The prompts that steer a registration (not those that only score it)."""
        out = []
        if self.label_weight > 0:
            out.append("label prompt")
        if self.fixed_landmarks is not None or self.moving_landmarks is not None:
            out.append("landmarks")
        if self.mask is not None:
            out.append("mask")
        return out


class Method(Protocol):
    """A registration method ready to run: built by its entry from validated options, with its
    network (if any) loaded on ``device``."""

    entry: MethodEntry
    options: MethodOptions

    def register(
        self,
        fixed: Image,
        moving: Image,
        *,
        prompts: Prompts | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``; the transform maps fixed world mm to moving
        world mm."""
        ...


def models_dir() -> Path:
    """``unireg/models/``: the shipped models."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "models"


def import_object(path: str) -> Any:
    """The object named ``"package.module:attr.attr"``."""
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class MethodEntry:
    """A method's line in the registry.

    Attributes:
        name: what ``--method`` and spec strings call it.
        summary: one line for help texts.
        options: its :class:`MethodOptions` dataclass.
        factory: ``"module:callable"`` building the method from ``(entry, options, device)``.
        family: spec strings may also write ``family:name`` (``unireg:syn``).
        prompts: which :class:`Prompts` it honours (``"labels"``, ``"landmarks"``, ``"mask"``).
        models: shipped weights by name, files in ``unireg/models/``; the first is the default.
        network: ``"module:callable"`` rebuilding the network from a checkpoint's
            ``model_config``.
        trainer, config: ``"module:Class"`` of its trainer and training config.
    """

    name: str
    summary: str
    options: type[MethodOptions]
    factory: str
    family: str = ""
    prompts: tuple[str, ...] = ()
    models: Mapping[str, str] = field(default_factory=dict)
    network: str | None = None
    trainer: str | None = None
    config: str | None = None

    @property
    def default_model(self) -> str | None:
        return next(iter(self.models), None)

    def build(self, options: MethodOptions, device: str = "cpu") -> Method:
        """The method object (loads its network, if any)."""
        factory: Callable[..., Method] = import_object(self.factory)
        return factory(self, options, device)


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``names`` (name -> submodule) on first use, so a
    method package's ``__init__`` stays light (its entry is read without loading torch)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    return __getattr__
