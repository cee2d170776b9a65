"""The method registry: one options declaration gives validated spec strings, config mappings
and command-line flags; a new method is one package plus one registry line."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
from conftest import gaussian_blob

from unireg.methods import OptionError, Prompts, create, entries, get, options_for, parse_spec
from unireg.methods.base import MethodEntry, MethodOptions, option
from unireg.methods.keymorph import KeyMorphOptions
from unireg.methods.sitreg import SITRegOptions
from unireg.methods.solver import SolverOptions


def test_every_method_is_registered_once_with_its_options() -> None:
    names = list(entries())
    assert names == [
        "rigid",
        "affine",
        "affine-gn",
        "syn",
        "bspline",
        "ffd",
        "keymorph",
        "sitreg",
        "dio",
        "avsm",
    ]
    assert get("keymorph").options is KeyMorphOptions and get("sitreg").options is SITRegOptions
    assert {get(n).options for n in names[:6]} == {SolverOptions}
    assert get("keymorph").default_model == "synth" and get("sitreg").default_model == "synth"
    with pytest.raises(OptionError, match="unknown method 'elastix'; choose from rigid"):
        get("elastix")


@pytest.mark.parametrize(
    ("spec", "name", "values"),
    [
        ("syn", "syn", {}),
        ("unireg:syn:preset=accurate:deformable=svf", "syn", {"preset": "accurate",
                                                              "deformable": "svf"}),
        ("keymorph:tps:lam=0.5:rotations=2", "keymorph", {"transform": "tps", "lam": 0.5,
                                                          "rotations": 2}),
        ("sitreg:fast:affine=none:model=standard", "sitreg", {"inference": "fast",
                                                              "affine": "none",
                                                              "model": "standard"}),
        ("affine:multimodal=true", "affine", {"multimodal": True}),
    ],
)  # fmt: skip
def test_spec_strings_parse_to_typed_options_and_back(spec: str, name: str, values: dict) -> None:
    entry, options = parse_spec(spec)
    assert entry.name == name
    for key, value in values.items():
        got = getattr(options, key)
        assert got == value and type(got) is type(value), (key, got)
    # the spec it writes rebuilds the same options, and so does the config form
    again = parse_spec(options.to_spec(name))
    assert again[1] == options
    assert options_for(name, options.to_dict()) == options


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("keymorph:tps:lam=abc", "'lam' must be float"),
        ("keymorph:rotations=0", "'rotations' must be >= 1"),
        ("keymorph:cubic", "'transform' must be one of rigid, affine, tps"),
        ("keymorph:tps:refine=affine-gn", "refines an affine alignment"),
        ("sitreg:affine=similarity", "'affine' must be one of"),
        ("sitreg:tol=1", "unknown option"),
        ("syn:oops", "takes no unnamed option"),
        ("affine:deformable=svf", "deformable is syn's option"),
        ("affine-gn:multimodal=true", "affine-gn is same-modality"),
        ("affine:multimodal=maybe", "'multimodal' must be bool"),
        ("unireg", "name a unireg method"),
        ("syn:preset", "takes no unnamed option"),
    ],
)
def test_bad_specs_are_named_errors(spec: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_spec(spec)


def test_a_flag_of_another_method_is_refused_before_any_file_is_read(tmp_path, capsys) -> None:
    from unireg.cli import main

    missing = str(tmp_path / "missing.nii.gz")
    rc = main(["register", missing, missing, "-o", str(tmp_path / "out"), "--method", "sitreg",
               "--tps-lambda", "0.3"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "--tps-lambda is not an option of --method sitreg (keymorph)" in err
    assert "missing.nii.gz" not in err and not (tmp_path / "out").exists()


@dataclass(frozen=True)
class _ShiftOptions(MethodOptions):
    method = "shift"
    mm: float = option(0.0, help="shift: the translation along the first axis, mm")


class _Shift:
    """A toy method: a fixed translation (the test of what a new method needs)."""

    def __init__(self, entry: MethodEntry, options: _ShiftOptions, device: str = "cpu"):
        self.entry, self.options = entry, options

    def register(self, fixed, moving, *, prompts: Prompts | None = None, seed=0, progress=None):
        import numpy as np

        from unireg.result import Extras, measured_result
        from unireg.spatial.transform import AffineTransform

        matrix = np.eye(fixed.ndim + 1)
        matrix[0, -1] = self.options.mm

        def run():
            t = AffineTransform(matrix)
            return t, t.inverse(), Extras("shift", matrix)

        return measured_result(fixed, moving, run)


def test_a_new_method_is_one_package_and_one_registry_line(tmp_path, monkeypatch) -> None:
    import unireg.methods.registry as registry
    from unireg.cli import main
    from unireg.io import Image, save_image

    package = types.ModuleType("toy_shift")
    package.METHODS = (MethodEntry("shift", "a fixed translation", _ShiftOptions,
                                   factory=f"{__name__}:_Shift"),)  # fmt: skip
    monkeypatch.setitem(sys.modules, "toy_shift", package)
    monkeypatch.setitem(sys.modules, __name__, sys.modules[__name__])
    monkeypatch.setattr(registry, "PACKAGES", (*registry.PACKAGES, "toy_shift"))
    registry.entries.cache_clear()
    try:
        assert create("shift:mm=2.5").options.mm == 2.5
        import numpy as np

        blob = gaussian_blob((16, 18, 14), (8.0, 9.0, 7.0)).float()[None]
        image = Image(blob, np.diag([2.0, 2.0, 2.0, 1.0]))
        save_image(image, tmp_path / "f.nii.gz")
        rc = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "f.nii.gz"), "-o",
                   str(tmp_path / "out"), "--method", "shift", "--mm", "4", "-q"])  # fmt: skip
        assert rc == 0
        import json

        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert metrics["method"] == "shift" and metrics["mm"] == 4.0
        assert (tmp_path / "out" / "transform.nii.gz").exists()
        # the config form: a TOML table of the same options, overridden by flags
        config = tmp_path / "shift.toml"
        config.write_text("[shift]\nmm = 1.5\n")
        for extra, expected in (([], 1.5), (["--mm", "3"], 3.0)):
            out = tmp_path / f"out{expected}"
            image_path = str(tmp_path / "f.nii.gz")
            rc = main(["register", image_path, image_path, "-o", str(out), "--method", "shift",
                       "--options", str(config), "-q", *extra])  # fmt: skip
            assert rc == 0
            assert json.loads((out / "metrics.json").read_text())["mm"] == expected
        config.write_text("[shift]\nmm = 'far'\n")
        rc = main(["register", "nothing.nii.gz", "nothing.nii.gz", "-o", str(tmp_path / "bad"),
                   "--method", "shift", "--options", str(config)])  # fmt: skip
        assert rc == 1 and not (tmp_path / "bad").exists()
    finally:
        registry.entries.cache_clear()
