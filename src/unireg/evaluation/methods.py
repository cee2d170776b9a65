"""Registration methods behind one interface, unireg's own and peers' (adapters).

A method is named by a spec string ``family[:name][:key=value]...``:

- ``none``: no registration (the identity in world space);
- any method of the registry by its spec string (:mod:`unireg.methods.registry`):
  ``unireg:syn:preset=accurate``, ``keymorph:tps:lam=0.1``, ``sitreg:fast:model=standard``;
- ``ants:<type>[:init=search][:search_factor=30][:search_iterations=10]``: ANTsPy's
  ``ants.registration`` with ``type_of_transform`` (Rigid, Affine, SyN, ...); ``init=search``
  first runs ANTs' affine initializer over the whole sphere of rotations
  (``antsAffineInitializer``: starts every ``search_factor`` degrees, each refined by
  ``search_iterations`` steps), for large misalignment, as in the KeyMorph papers' robustness
  experiments;
- ``sitk:rigid`` / ``sitk:affine``: SimpleITK's ``ImageRegistrationMethod`` (Mattes MI).

The peers need the ``peers`` extra (``pip install unireg[peers]``).

Every method returns a :class:`~unireg.result.RegistrationResult` with its wall time and
peak memory measured the same way (:class:`unireg.profiling.Measure`).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unireg.errors import UniregError
from unireg.io.image import Image, resample, save_image
from unireg.profiling import Measure
from unireg.result import Extras, RegistrationResult, measured_result
from unireg.spatial.transform import AffineTransform, Transform


class MissingPeerError(UniregError):
    """A peer method's package is not installed."""


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@dataclass
class MethodSpec:
    """A parsed method spec: ``family``, ``name`` and ``options``; ``label`` is the spec as
    written (the name used in tables)."""

    family: str
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        parts = [p for p in spec.strip().split(":") if p]
        if not parts:
            raise UniregError(f"empty method spec {spec!r}")
        family, rest = parts[0].lower(), parts[1:]
        name = ""
        if rest and "=" not in rest[0]:
            name, rest = rest[0], rest[1:]
        options = {}
        for item in rest:
            if "=" not in item:
                raise UniregError(f"method option {item!r} in {spec!r} is not key=value")
            k, v = item.split("=", 1)
            options[k.strip().replace("-", "_")] = _parse_value(v.strip())
        return cls(family, name, options, spec.strip())


class Method:
    """Base class: ``register(fixed, moving, seed=...)`` -> :class:`RegistrationResult`.

    A peer names the package it imports (``requires``) and its pip name (``package``)."""

    label = "method"
    requires: str | None = None
    package: str = ""

    def register(self, fixed: Image, moving: Image, *, seed: int = 0) -> RegistrationResult:
        raise NotImplementedError

    @classmethod
    def available(cls) -> bool:
        """Whether the package this method needs is installed."""
        return cls.requires is None or importlib.util.find_spec(cls.requires) is not None

    def _require(self) -> None:
        if not self.available():
            raise MissingPeerError(
                f"the {type(self).__name__} peer needs {self.package}: "
                f"pip install 'unireg[peers]' (or {self.package})"
            )


class NoRegistration(Method):
    """The identity map in world space (how far apart the images start)."""

    def __init__(self, spec: MethodSpec) -> None:
        self.label = spec.label

    def register(self, fixed: Image, moving: Image, *, seed: int = 0) -> RegistrationResult:
        def run() -> tuple[Transform, Transform | None, Extras]:
            transform = AffineTransform.identity(fixed.ndim)
            return transform, transform, Extras("none", transform.matrix.numpy())

        return measured_result(fixed, moving, run)


class RegisteredMethod(Method):
    """A method of the registry (:mod:`unireg.methods`), built once from its spec and kept
    loaded between pairs."""

    def __init__(self, spec: MethodSpec, device: str = "cpu") -> None:
        from unireg.methods import create

        self.label = spec.label
        try:
            self.method = create(spec.label, device=device)
        except ValueError as err:  # OptionError is both
            raise UniregError(str(err)) from err

    def register(self, fixed: Image, moving: Image, *, seed: int = 0) -> RegistrationResult:
        return self.method.register(fixed, moving, seed=seed)


class AntsMethod(Method):
    """ANTsPy's ``ants.registration`` as a peer (world space through NIfTI files)."""

    requires, package = "ants", "antspyx"

    def __init__(self, spec: MethodSpec) -> None:
        self._require()
        self.type = spec.name or "SyN"
        self.options = dict(spec.options)
        self.init = self.options.pop("init", None)
        self.search_factor = float(self.options.pop("search_factor", 30))
        self.search_iterations = int(self.options.pop("search_iterations", 10))
        self.label = spec.label

    def register(self, fixed: Image, moving: Image, *, seed: int = 0) -> RegistrationResult:
        import ants

        from unireg.io.transforms import load_transforms

        with tempfile.TemporaryDirectory(prefix="unireg-ants-") as tmp:
            fpath, mpath = Path(tmp) / "fixed.nii.gz", Path(tmp) / "moving.nii.gz"
            save_image(fixed, fpath)
            save_image(moving, mpath)
            fa, ma = ants.image_read(str(fpath)), ants.image_read(str(mpath))
            os.environ.setdefault("ANTS_RANDOM_SEED", str(seed))
            with Measure() as m:
                kwargs = dict(self.options)
                if self.init == "search":
                    kwargs["initial_transform"] = ants.affine_initializer(
                        fa, ma, search_factor=self.search_factor, radian_fraction=1.0,
                        local_search_iterations=self.search_iterations,
                        txfn=str(Path(tmp) / "init.mat"),
                    )  # fmt: skip
                out = ants.registration(
                    fa, ma, type_of_transform=self.type, outprefix=str(Path(tmp) / "ants_"),
                    random_seed=seed, **kwargs,
                )  # fmt: skip
                transform = load_transforms(out["fwdtransforms"])
                inv_specs = [(p, True) if p.endswith(".mat") else p for p in out["invtransforms"]]
                inverse = load_transforms(inv_specs)
                # bring the fields into memory before the folder goes
                transform.displacement(fixed.geometry)
            warped = resample(moving, fixed.geometry, transform)
        return RegistrationResult(
            transform, fixed.geometry, moving.geometry, inverse=inverse, warped=warped,
            extras=Extras(f"ANTs {self.type}"), elapsed=m.seconds, peak_memory=m.peak_bytes,
        )  # fmt: skip


class SimpleITKMethod(Method):
    """SimpleITK's ``ImageRegistrationMethod`` as a peer: ``sitk:rigid`` or ``sitk:affine``,
    Mattes MI (32 bins, 20 % random sampling), moments initialisation, shrink factors 4-2-1
    with smoothing sigmas 2-1-0 voxels, gradient descent with physical-shift scales; options
    ``iterations`` (per level, default 200) and ``lr`` (default 1.0)."""

    requires, package = "SimpleITK", "SimpleITK"

    def __init__(self, spec: MethodSpec) -> None:
        self._require()
        self.kind = (spec.name or "affine").lower()
        if self.kind not in ("rigid", "affine"):
            raise UniregError(f"sitk methods are rigid or affine, got {self.kind!r}")
        self.iterations = int(spec.options.get("iterations", 200))
        self.lr = float(spec.options.get("lr", 1.0))
        self.label = spec.label

    @staticmethod
    def _to_sitk(image: Image):  # noqa: ANN205 - SimpleITK image
        import SimpleITK as sitk

        from unireg.io.transforms import ras_to_lps_matrix

        d = image.ndim
        arr = image.data[0].detach().cpu().numpy().astype("float32")
        img = sitk.GetImageFromArray(arr.transpose(*range(d - 1, -1, -1)))  # sitk is x-fastest
        lps = ras_to_lps_matrix(d) @ image.affine
        spacing = [float(v) for v in image.spacing]
        direction = lps[:d, :d] / spacing
        img.SetSpacing(spacing)
        img.SetOrigin([float(v) for v in lps[:d, d]])
        img.SetDirection([float(v) for v in direction.reshape(-1)])
        return img

    def register(self, fixed: Image, moving: Image, *, seed: int = 0) -> RegistrationResult:
        import numpy as np
        import SimpleITK as sitk

        from unireg.io.transforms import ras_to_lps_matrix

        d = fixed.ndim
        f, m = self._to_sitk(fixed), self._to_sitk(moving)
        with Measure() as measured:
            base = (sitk.Euler3DTransform() if d == 3 else sitk.Euler2DTransform()) \
                if self.kind == "rigid" else sitk.AffineTransform(d)  # fmt: skip
            tx = sitk.CenteredTransformInitializer(
                f, m, base, sitk.CenteredTransformInitializerFilter.MOMENTS
            )
            reg = sitk.ImageRegistrationMethod()
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(0.2, seed + 1)  # ITK: seed 0 = wall clock
            reg.SetInterpolator(sitk.sitkLinear)
            reg.SetOptimizerAsGradientDescent(
                learningRate=self.lr, numberOfIterations=self.iterations,
                convergenceMinimumValue=1e-6, convergenceWindowSize=10,
            )  # fmt: skip
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetShrinkFactorsPerLevel([4, 2, 1])
            reg.SetSmoothingSigmasPerLevel([2, 1, 0])
            reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
            reg.SetInitialTransform(tx, inPlace=True)
            reg.Execute(sitk.Cast(f, sitk.sitkFloat32), sitk.Cast(m, sitk.sitkFloat32))
            a = np.array(tx.GetMatrix()).reshape(d, d)
            c, t = np.array(tx.GetCenter()), np.array(tx.GetTranslation())
            lps = np.eye(d + 1)
            lps[:d, :d], lps[:d, d] = a, t + c - a @ c
            flip = ras_to_lps_matrix(d)
            transform = AffineTransform(flip @ lps @ flip)
        warped = resample(moving, fixed.geometry, transform)
        return RegistrationResult(
            transform, fixed.geometry, moving.geometry, inverse=transform.inverse(),
            warped=warped, extras=Extras(f"SimpleITK {self.kind}", transform.matrix.numpy()),
            elapsed=measured.seconds, peak_memory=measured.peak_bytes,
        )  # fmt: skip


# the peers and the identity; every other spec names a method of the registry
FAMILIES: dict[str, type[Method]] = {
    "none": NoRegistration,
    "ants": AntsMethod,
    "sitk": SimpleITKMethod,
}


def make_method(spec: str | MethodSpec, device: str = "cpu") -> Method:
    """The method of a spec string (see the module docstring); unireg's methods on ``device``,
    the peers (ANTsPy, SimpleITK) on the CPU."""
    parsed = MethodSpec.parse(spec) if isinstance(spec, str) else spec
    if parsed.family in FAMILIES:
        return FAMILIES[parsed.family](parsed)
    return RegisteredMethod(parsed, device)
