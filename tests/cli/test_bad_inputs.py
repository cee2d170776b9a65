"""The bad-input table: every row is a hostile input a careful user's pipeline meets. Each must
end with exit code 1 and one line that names the error and the file (or flag) at fault, before
the heavy step runs (that step is replaced by one that fails the test), and must leave the
output as it was: an earlier ``register`` result in the output folder stays byte for byte, a
file output is not created, and no staging folder or lock is left behind."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
import torch
from conftest import smooth_image

from unireg.cli import main

SHAPE = (20, 22, 18)
AFFINE = np.diag([2.0, 2.0, 2.2, 1.0])


def _nifti(path: Path, data: np.ndarray, affine=AFFINE, *, qcode=1, scode=1, dtype=None) -> Path:
    img = nib.Nifti1Image(np.asarray(data), affine, dtype=dtype)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def _claiming(path: Path, shape: tuple[int, ...], payload: int = 1024) -> Path:
    """A NIfTI whose header claims ``shape`` float32 voxels but holds ``payload`` bytes."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(AFFINE, code=1)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _itk_text(path: Path, linear: np.ndarray) -> Path:
    params = " ".join(str(float(v)) for v in [*linear.reshape(-1), 0.0, 0.0, 0.0])
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {params}\nFixedParameters: 0 0 0\n"
    )
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Good inputs, a previous register result, and every bad file of the table."""
    d = tmp_path_factory.mktemp("bad_inputs")
    vol = smooth_image(SHAPE, seed=3)[0, 0].numpy().astype(np.float32)
    labels = (vol > np.percentile(vol, 60)).astype(np.int16)
    _nifti(d / "fixed.nii.gz", vol)
    _nifti(d / "moving.nii.gz", np.roll(vol, 2, axis=0))
    _nifti(d / "fixed_labels.nii.gz", labels)
    _nifti(d / "moving_labels.nii.gz", np.roll(labels, 2, axis=0))
    other = np.diag([1.0, 1.0, 1.0, 1.0])
    _nifti(d / "other_grid_labels.nii.gz", labels, other)
    (d / "empty.nii.gz").write_bytes(b"")
    good = (d / "moving.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (d / "text.nii.gz").write_bytes(b"not an image at all\n")
    shutil.copy(d / "moving.nii.gz", d / "image.png")
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    _nifti(d / "nan.nii.gz", nan)
    inf = vol.copy()
    inf[0, 0, 0] = np.inf
    _nifti(d / "inf.nii.gz", inf)
    _nifti(d / "noorient.nii.gz", vol, qcode=0, scode=0)
    singular = AFFINE.copy()
    singular[:, 1] = 0.0
    nan_affine = AFFINE.copy()
    nan_affine[0, 0] = np.nan
    for name, sform in (("zero_sform", np.zeros((4, 4))), ("singular", singular),
                        ("nan_affine", nan_affine)):  # fmt: skip
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(vol.shape)
        hdr.set_data_dtype(np.float32)
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
        hdr["sform_code"], hdr["qform_code"] = 1, 0
        nib.save(nib.Nifti1Image(vol, None, hdr), str(d / f"{name}.nii.gz"))
    _nifti(d / "thin.nii.gz", vol[:, :1, :])
    _nifti(d / "slice2d.nii.gz", vol[:, :, 9])
    _nifti(d / "fivedim.nii.gz", np.ones((4, 4, 4, 2, 2), np.float32))
    _nifti(d / "fourd.nii.gz", np.stack([vol] * 3, axis=-1))
    _nifti(d / "constant.nii.gz", np.full(SHAPE, 5.0, np.float32))
    _nifti(d / "zeros.nii.gz", np.zeros(SHAPE, np.float32))
    _nifti(d / "labels_float.nii.gz", labels.astype(np.float32) * 1.5)
    _nifti(d / "labels_1e20.nii.gz", labels.astype(np.float32) * 1e20)
    _nifti(d / "labels_int64.nii.gz", labels.astype(np.int64) * 2**33, dtype=np.int64)
    _nifti(d / "labels_empty.nii.gz", np.zeros(SHAPE, np.int16))
    _claiming(d / "claims_2000.nii.gz", (2000, 2000, 2000))
    _claiming(d / "claims_1200.nii", (1200, 1200, 1200))
    (d / "notoml.toml").write_text("this is = = not toml [")
    (d / "corrupt_model.pt").write_bytes(os.urandom(4096))
    name = "AffineTransform_double_3_3"
    zeros = np.zeros((12, 1))
    scipy.io.savemat(str(d / "zero.mat"), {name: zeros, "fixed": np.zeros((3, 1))}, format="4")
    _itk_text(d / "singular.txt", np.diag([1.0, 0.0, 1.0]))
    _itk_text(d / "identity.txt", np.eye(3))
    (d / "a_file").write_text("I am a file")
    (d / "folder.nii.gz").mkdir()
    (d / "theirs").mkdir()
    (d / "theirs" / "notes.md").write_text("not unireg's")
    torch.set_num_threads(2)
    assert main(["register", str(d / "fixed.nii.gz"), str(d / "moving.nii.gz"), "-o",
                 str(d / "previous"), "--method", "affine", "-q"]) == 0  # fmt: skip
    return d


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (world folder, output) -> arguments
    error: str  # the error's class name in the message
    names: str  # what the message must name (a file or a flag)
    env: dict[str, str] = field(default_factory=dict)
    output: str = "folder"  # "folder": register's OUTDIR; "file": a file output


def reg(fixed: str = "fixed.nii.gz", moving: str = "moving.nii.gz", *extra: str):
    """``register FIXED MOVING -o OUT --method affine EXTRA`` (files from the world folder;
    ``@name`` in EXTRA is a world file)."""

    def argv(d: Path, out: Path) -> list[str]:
        rest = [str(d / e[1:]) if e.startswith("@") else e for e in extra]
        return ["register", str(d / fixed), str(d / moving), "-o", str(out), "--method",
                "affine", *rest]  # fmt: skip

    return argv


def verb(*args: str):
    """Any verb; ``@name`` is a world file, ``OUT`` the output path."""

    def argv(d: Path, out: Path) -> list[str]:
        return [str(out) if a == "OUT" else a.replace("@", f"{d}/") for a in args]

    return argv


CASES = [
    # unreadable or missing files
    Case("fixed missing", reg("missing.nii.gz"), "ImageNotFoundError", "missing.nii.gz"),
    Case("moving empty", reg(moving="empty.nii.gz"), "EmptyFileError", "empty.nii.gz"),
    Case(
        "moving truncated",
        reg(moving="truncated.nii.gz"),
        "UnreadableFileError",
        "truncated.nii.gz",
    ),  # fmt: skip
    Case("not an image", reg(moving="text.nii.gz"), "UnreadableFileError", "text.nii.gz"),
    Case("unsupported extension", reg(moving="image.png"), "UnsupportedFormatError", "image.png"),
    Case("folder as image", reg(moving="theirs"), "UnsupportedFormatError", "theirs"),
    # values
    Case("NaN voxels", reg(moving="nan.nii.gz"), "NonFiniteError", "nan.nii.gz"),
    Case("infinite voxels", reg("inf.nii.gz"), "NonFiniteError", "inf.nii.gz"),
    Case(
        "constant moving", reg(moving="constant.nii.gz"), "ConstantImageError", "constant.nii.gz"
    ),  # fmt: skip
    Case("all-zero fixed", reg("zeros.nii.gz"), "ConstantImageError", "zeros.nii.gz"),
    # orientation
    Case(
        "qform and sform codes 0",
        reg(moving="noorient.nii.gz"),
        "OrientationError",
        "noorient.nii.gz",
    ),  # fmt: skip
    Case("zero sform", reg(moving="zero_sform.nii.gz"), "OrientationError", "zero_sform.nii.gz"),
    Case("singular sform", reg("singular.nii.gz"), "OrientationError", "singular.nii.gz"),
    Case(
        "NaN in the sform", reg(moving="nan_affine.nii.gz"), "OrientationError", "nan_affine.nii.gz"
    ),  # fmt: skip
    Case(
        "bad --assume-orientation",
        reg("fixed.nii.gz", "noorient.nii.gz", "--assume-orientation", "XYZ"),
        "OrientationError",
        "XYZ",
    ),  # fmt: skip
    # dimensions
    Case("1-voxel-thick image", reg(moving="thin.nii.gz"), "DimensionalityError", "thin.nii.gz"),
    Case(
        "2D moving, 3D fixed", reg(moving="slice2d.nii.gz"), "DimensionalityError", "slice2d.nii.gz"
    ),  # fmt: skip
    Case("5D array", reg(moving="fivedim.nii.gz"), "DimensionalityError", "fivedim.nii.gz"),
    Case(
        "4D moving, 3D fixed", reg(moving="fourd.nii.gz"), "DimensionalityError", "fourd.nii.gz"
    ),  # fmt: skip
    # size guards
    Case(
        "header claims 2000^3 (gzip)",
        reg(moving="claims_2000.nii.gz"),
        "UnreadableFileError",
        "claims_2000.nii.gz",
    ),  # fmt: skip
    Case(
        "header claims 1200^3",
        reg(moving="claims_1200.nii"),
        "UnreadableFileError",
        "claims_1200.nii",
    ),  # fmt: skip
    Case(
        "more than the free memory",
        reg(),
        "ImageTooLargeError",
        "fixed.nii.gz",
        env={"UNIREG_MEMORY_LIMIT": "20K"},
    ),  # fmt: skip
    # label maps and masks
    Case(
        "--fixed-labels alone",
        reg("fixed.nii.gz", "moving.nii.gz", "--fixed-labels", "@fixed_labels.nii.gz"),
        "UniregError",
        "--moving-labels",
    ),  # fmt: skip
    Case(
        "labels on another grid",
        reg(
            "fixed.nii.gz",
            "moving.nii.gz",
            "--fixed-labels",
            "@other_grid_labels.nii.gz",
            "--moving-labels",
            "@moving_labels.nii.gz",
        ),
        "GridMismatchError",
        "other_grid_labels.nii.gz",
    ),  # fmt: skip
    Case(
        "non-integer labels",
        reg("fixed.nii.gz", "moving.nii.gz", "--moving-labels", "@labels_float.nii.gz"),
        "LabelValueError",
        "labels_float.nii.gz",
    ),  # fmt: skip
    Case(
        "labels of 1e20",
        reg("fixed.nii.gz", "moving.nii.gz", "--moving-labels", "@labels_1e20.nii.gz"),
        "LabelValueError",
        "labels_1e20.nii.gz",
    ),  # fmt: skip
    Case(
        "int64 labels above 2^31",
        reg("fixed.nii.gz", "moving.nii.gz", "--moving-labels", "@labels_int64.nii.gz"),
        "LabelValueError",
        "labels_int64.nii.gz",
    ),  # fmt: skip
    Case(
        "empty moving labels",
        reg("fixed.nii.gz", "moving.nii.gz", "--moving-labels", "@labels_empty.nii.gz"),
        "ConstantImageError",
        "labels_empty.nii.gz",
    ),  # fmt: skip
    Case(
        "empty mask",
        reg("fixed.nii.gz", "moving.nii.gz", "--fixed-mask", "@labels_empty.nii.gz"),
        "ConstantImageError",
        "labels_empty.nii.gz",
    ),  # fmt: skip
    Case(
        "mask on another grid",
        reg("fixed.nii.gz", "moving.nii.gz", "--fixed-mask", "@other_grid_labels.nii.gz"),
        "GridMismatchError",
        "other_grid_labels.nii.gz",
    ),  # fmt: skip
    Case(
        "--label-prompt without labels",
        reg("fixed.nii.gz", "moving.nii.gz", "--label-prompt", "1"),
        "UniregError",
        "--label-prompt",
    ),  # fmt: skip
    # options
    Case(
        "another method's flag",
        reg("fixed.nii.gz", "moving.nii.gz", "--tps-lambda", "0.1"),
        "OptionError",
        "--tps-lambda",
    ),  # fmt: skip
    Case(
        "options file not TOML",
        reg("fixed.nii.gz", "moving.nii.gz", "--options", "@notoml.toml"),
        "OptionError",
        "notoml.toml",
    ),  # fmt: skip
    Case(
        "missing model file",
        verb(
            "register",
            "@fixed.nii.gz",
            "@moving.nii.gz",
            "-o",
            "OUT",
            "--method",
            "keymorph",
            "--model",
            "@nope.pt",
        ),
        "UniregError",
        "nope.pt",
    ),  # fmt: skip
    Case(
        "corrupt model file",
        verb(
            "register",
            "@fixed.nii.gz",
            "@moving.nii.gz",
            "-o",
            "OUT",
            "--method",
            "sitreg",
            "--model",
            "@corrupt_model.pt",
        ),
        "UniregError",
        "corrupt_model.pt",
    ),  # fmt: skip
    # output paths
    Case(
        "output is a file",
        verb("register", "@fixed.nii.gz", "@moving.nii.gz", "-o", "@a_file", "--method", "affine"),
        "OutputPathError",
        "a_file",
    ),  # fmt: skip
    Case(
        "output folder holds other files",
        verb("register", "@fixed.nii.gz", "@moving.nii.gz", "-o", "@theirs", "--method", "affine"),
        "OutputPathError",
        "notes.md",
    ),  # fmt: skip
    Case(
        "output below a file",
        verb(
            "register", "@fixed.nii.gz", "@moving.nii.gz", "-o", "@a_file/out", "--method", "affine"
        ),
        "OutputPathError",
        "a_file",
    ),  # fmt: skip
    # apply
    Case(
        "apply: all-zero matrix",
        verb("apply", "@zero.mat", "@moving.nii.gz", "-r", "@fixed.nii.gz", "-o", "OUT"),
        "TransformFormatError",
        "zero.mat",
        output="file",
    ),  # fmt: skip
    Case(
        "apply: inverse of a singular affine",
        verb("apply", "[@singular.txt,1]", "@moving.nii.gz", "-r", "@fixed.nii.gz", "-o", "OUT"),
        "TransformFormatError",
        "singular.txt",
        output="file",
    ),  # fmt: skip
    Case(
        "apply: missing transform",
        verb("apply", "@nope.mat", "@moving.nii.gz", "-r", "@fixed.nii.gz", "-o", "OUT"),
        "ImageNotFoundError",
        "nope.mat",
        output="file",
    ),  # fmt: skip
    Case(
        "apply: output is a folder",
        verb(
            "apply",
            "@identity.txt",
            "@moving.nii.gz",
            "-r",
            "@fixed.nii.gz",
            "-o",
            "@folder.nii.gz",
        ),
        "OutputPathError",
        "folder.nii.gz",
        output="file",
    ),  # fmt: skip
    Case(
        "apply: output extension",
        verb("apply", "@identity.txt", "@moving.nii.gz", "-r", "@fixed.nii.gz", "-o", "@out.png"),
        "UnsupportedFormatError",
        "out.png",
        output="file",
    ),  # fmt: skip
    Case(
        "apply: 2D image, 3D transform",
        verb("apply", "@identity.txt", "@slice2d.nii.gz", "-r", "@fixed.nii.gz", "-o", "OUT"),
        "DimensionalityError",
        "slice2d.nii.gz",
        output="file",
    ),  # fmt: skip
    Case(
        "apply: reference without orientation",
        verb("apply", "@identity.txt", "@moving.nii.gz", "-r", "@noorient.nii.gz", "-o", "OUT"),
        "OrientationError",
        "noorient.nii.gz",
        output="file",
    ),  # fmt: skip
    # metrics, synthesize, info, train
    Case(
        "metrics: empty fixed labels",
        verb(
            "metrics",
            "--fixed-labels",
            "@labels_empty.nii.gz",
            "--moving-labels",
            "@moving_labels.nii.gz",
        ),
        "ConstantImageError",
        "labels_empty.nii.gz",
        output="none",
    ),  # fmt: skip
    Case(
        "metrics: labels of 1e20",
        verb(
            "metrics",
            "--fixed-labels",
            "@fixed_labels.nii.gz",
            "--moving-labels",
            "@labels_1e20.nii.gz",
        ),
        "LabelValueError",
        "labels_1e20.nii.gz",
        output="none",
    ),  # fmt: skip
    Case(
        "synthesize: bad --labels-output",
        verb("synthesize", "@fixed_labels.nii.gz", "-o", "OUT", "--labels-output", "@l.png"),
        "UnsupportedFormatError",
        "l.png",
        output="file",
    ),  # fmt: skip
    Case(
        "synthesize: background only",
        verb("synthesize", "@labels_empty.nii.gz", "-o", "OUT"),
        "ConstantImageError",
        "labels_empty.nii.gz",
        output="file",
    ),  # fmt: skip
    Case(
        "info: no orientation",
        verb("info", "@noorient.nii.gz"),
        "OrientationError",
        "noorient.nii.gz",
        output="none",
    ),  # fmt: skip
    Case(
        "train: missing config",
        verb("train", "keymorph", "--config", "@nope.toml"),
        "UniregError",
        "nope.toml",
        output="none",
    ),  # fmt: skip
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Replace each verb's heavy step by one that fails the test if it is reached."""
    import unireg.data.synthesis
    import unireg.io.image
    import unireg.methods
    from unireg.methods.base import import_object
    from unireg.methods.registry import entries

    # every method's module imported first: one imported under the patches below would keep
    # the patched names (``from unireg.io.image import resample``) for the rest of the run
    for entry in entries().values():
        import_object(entry.factory)
    real_create = unireg.methods.create

    def create(*args, **kwargs):
        method = real_create(*args, **kwargs)

        def register(*a, **k):
            raise AssertionError("the registration started before the bad input was refused")

        method.register = register
        return method

    def refuse(*a, **k):
        raise AssertionError("the heavy step started before the bad input was refused")

    monkeypatch.setattr(unireg.methods, "create", create)
    monkeypatch.setattr(unireg.io.image, "resample", refuse)
    monkeypatch.setattr(unireg.data.synthesis, "LabelSynthesis", refuse)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name_before_work_and_the_output_is_unchanged(
    case, world, tmp_path, capsys, monkeypatch, no_heavy_work
):
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.output == "folder":
        out = tmp_path / "out"
        shutil.copytree(world / "previous", out)
    else:
        out = tmp_path / "out.nii.gz"
    argv = case.argv(world, out)
    before = _snapshot(out) if case.output == "folder" else None
    world_before = sorted(p.name for p in world.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"unireg {argv[0]}: error: "), err
    assert f"{case.error}:" in err and case.names in err, err
    if case.output == "folder":
        assert _snapshot(out) == before  # the earlier result, byte for byte
    elif case.output == "file":
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".unireg-" in p.name or ".tmp" in p.name] == []
    assert sorted(p.name for p in world.iterdir()) == world_before  # nothing written beside


def test_the_table_covers_every_verb_that_reads_files():
    assert {c.argv(Path("w"), Path("o"))[0] for c in CASES} == {
        "register", "apply", "metrics", "synthesize", "info", "train"}  # fmt: skip
    assert len(CASES) >= 50


def test_no_orientation_is_read_with_assume_orientation(world, capsys):
    assert main(["info", str(world / "noorient.nii.gz"), "--assume-orientation", "LPS"]) == 0
    assert "orientation=LPS" in capsys.readouterr().out


def test_a_folder_in_use_is_refused_and_left_to_its_owner(world, tmp_path, capsys):
    from unireg.io.outputs import OutputFolder

    out = tmp_path / "busy"
    owner = OutputFolder(out, ["warped.nii.gz"])
    owner.open()
    try:
        code = main(reg()(world, out))
    finally:
        owner.__exit__(None, None, None)
    err = capsys.readouterr().err
    assert code == 1 and "OutputInUseError" in err and f"pid {os.getpid()}" in err
    assert not out.exists()


def test_an_unexpected_error_is_one_line_with_its_own_exit_code(monkeypatch, capsys, world):
    import unireg.cli.info

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(unireg.cli.info, "run", broken)
    assert main(["info", str(world / "fixed.nii.gz")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (ZeroDivisionError" in err and "--debug" in err
    assert main(["info", str(world / "fixed.nii.gz"), "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_synthesize_writes_both_files_or_neither(world, tmp_path, monkeypatch, capsys):
    import unireg.io.image

    real = unireg.io.image.save_image

    def full_disk(image, path):
        if image.is_label:
            raise OSError(28, "No space left on device", str(path))
        return real(image, path)

    monkeypatch.setattr(unireg.io.image, "save_image", full_disk)
    out, labels_out = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    code = main(["synthesize", str(world / "fixed_labels.nii.gz"), "-o", str(out),
                 "--labels-output", str(labels_out), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # neither file, no temporary
