"""The ``unireg`` command line: --help/--version and ``unireg apply``, bad inputs included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import oblique_affine, smooth_image

from unireg import __version__
from unireg.cli import main
from unireg.io import Image, LabelMap, load_image, resample, save_affine, save_image, save_transform
from unireg.spatial import AffineTransform, random_affine


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unireg", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"unireg {__version__}"
    out = run("--help")
    assert out.returncode == 0 and "apply" in out.stdout
    out = run("apply", "--help")
    assert out.returncode == 0 and "--reference" in out.stdout and "ANTs order" in out.stdout


def test_console_script_is_installed():
    exe = shutil.which("unireg") or str(Path(sys.executable).with_name("unireg"))
    if not Path(exe).exists():
        pytest.skip("unireg console script not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and __version__ in out.stdout


EXIT_SCRIPT = """
import atexit, sys, threading, time
import torch
from unireg.cli import exit_now
atexit.register(lambda: print("atexit ran", flush=True))
sys.stdout.write("unflushed")  # buffered: written only if the streams are flushed
if sys.argv[1] == "thread":  # a non-daemon thread still running: a normal exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
exit_now(7)
"""


@pytest.mark.parametrize("case_", ["plain", "thread"])
def test_exit_now_runs_atexit_flushes_and_keeps_the_code(case_):
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, case_], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 7
    assert "unflushed" in out.stdout and "atexit ran" in out.stdout
    assert ("thread done" in out.stdout) == (case_ == "thread")


GC_SCRIPT = """
import gc, sys
from unireg.cli import imports_done, main, pause_gc
pause_gc()
paused = not gc.isenabled()
import unireg.cli._common  # imports torch, then hands the collector back
print(paused, gc.isenabled(), gc.get_freeze_count() > 1000)
pause_gc()  # torch is in: nothing to pause for
print(gc.isenabled())
gc.unfreeze()
code = main(["info", sys.argv[1]])  # a whole command, torch already in
print(code, gc.isenabled(), gc.get_freeze_count())
"""


def test_collector_paused_only_while_a_command_imports_torch(tmp_path):
    """The command line turns the cyclic garbage collector off while torch is imported, then
    freezes what was imported and turns it back on; with torch already in, it never pauses."""
    path = save_image(Image(torch.rand(1, 4, 5, 6), np.eye(4)), tmp_path / "i.nii.gz")
    out = subprocess.run([sys.executable, "-c", GC_SCRIPT, str(path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("True", "False", "0"))]
    assert lines == ["True True True", "True", "0 True 0"]


@pytest.fixture
def case(tmp_path):
    """A fixed and a moving image on different oblique grids, a label map and an affine."""
    fixed = Image(
        smooth_image((20, 18, 16), seed=1)[0].float(),
        oblique_affine((1.2, 1.0, 1.5), (5, 0, 10), (-12, -9, -12)),
    )
    moving = Image(
        smooth_image((22, 16, 18), seed=2)[0].float(),
        oblique_affine((1.0, 1.3, 1.1), (0, 10, -5), (-11, -10, -10)),
    )
    labels = LabelMap((moving.data > moving.data.mean()).long() * 5 + 2, moving.affine)
    m = random_affine(
        3,
        rotation=10,
        translation=2,
        seed=0,
        dtype=torch.float64,
        center=torch.tensor(fixed.geometry.center_world),
    )[0]
    paths = {
        "fixed": save_image(fixed, tmp_path / "fixed.nii.gz"),
        "moving": save_image(moving, tmp_path / "moving.nii.gz"),
        "labels": save_image(labels, tmp_path / "labels.nii.gz"),
        "affine": save_affine(AffineTransform(m), tmp_path / "affine.mat"),
    }
    return tmp_path, paths, AffineTransform(m)


def test_apply_matches_python_api(case):
    tmp, p, t = case
    out = tmp / "out" / "warped.nii.gz"
    code = main(
        ["apply", str(p["affine"]), str(p["moving"]), "-r", str(p["fixed"]), "-o", str(out), "-q"]
    )
    assert code == 0
    got = load_image(out)
    expected = resample(load_image(p["moving"]), load_image(p["fixed"]), t)
    np.testing.assert_allclose(got.affine, load_image(p["fixed"]).affine, atol=1e-5)
    torch.testing.assert_close(got.data, expected.data)


def test_apply_chain_of_affine_and_field(case):
    tmp, p, t = case
    fixed = load_image(p["fixed"])
    save_transform(t, tmp / "field.nii.gz", reference=fixed.geometry)
    inv = save_affine(t.inverse(), tmp / "inverse.txt")
    # field then the inverse affine: x -> t^-1(t(x)) = x, so the result is the fixed grid of moving
    out = tmp / "w.nii.gz"
    assert (
        main(
            [
                "apply",
                str(tmp / "field.nii.gz"),
                str(inv),
                str(p["moving"]),
                "-r",
                str(p["fixed"]),
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    expected = resample(load_image(p["moving"]), fixed)
    torch.testing.assert_close(load_image(out).data, expected.data, atol=1e-4, rtol=0)


@pytest.mark.parametrize("interp", [None, "onehot"])
def test_apply_labels_keeps_values(case, interp):
    tmp, p, _ = case
    out = tmp / "wl.nii.gz"
    args = [
        "apply",
        str(p["affine"]),
        str(p["labels"]),
        "-r",
        str(p["fixed"]),
        "-o",
        str(out),
        "--labels",
        "-q",
    ]
    if interp:
        args += ["--interpolation", interp]
    assert main(args) == 0
    values = set(np.unique(np.asarray(nib.load(out).dataobj)).tolist())
    assert values <= {0, 2, 7} and {2, 7} <= values
    assert np.issubdtype(nib.load(out).get_data_dtype(), np.integer)


def _assert_failed_cleanly(capsys, code: int, out_dir: Path, before: set[str], names: str) -> None:
    err = capsys.readouterr().err
    assert code == 1
    assert names in err, err
    assert set(x.name for x in out_dir.iterdir()) == before  # nothing written, no temp files


def test_apply_bad_inputs_raise_named_errors_and_write_nothing(case, capsys):
    tmp, p, _ = case
    out_dir = tmp / "outputs"
    out_dir.mkdir()
    out = str(out_dir / "o.nii.gz")
    before: set[str] = set()

    def apply(*args: str) -> int:
        return main(["apply", *args, "-o", out, "-q"])

    # missing moving image
    code = apply(str(p["affine"]), str(tmp / "missing.nii.gz"), "-r", str(p["fixed"]))
    _assert_failed_cleanly(capsys, code, out_dir, before, "missing.nii.gz: no such image file")
    # empty file
    (tmp / "empty.nii.gz").write_bytes(b"")
    code = apply(str(p["affine"]), str(tmp / "empty.nii.gz"), "-r", str(p["fixed"]))
    _assert_failed_cleanly(capsys, code, out_dir, before, "empty.nii.gz: image file is empty")
    # NaN voxels
    arr = np.ones((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp / "nan.nii.gz")
    code = apply(str(p["affine"]), str(tmp / "nan.nii.gz"), "-r", str(p["fixed"]))
    _assert_failed_cleanly(capsys, code, out_dir, before, "nan.nii.gz: 1 voxels are NaN")
    # wrong dimensionality: a 2D image with a 3D transform
    save_image(Image(torch.zeros(1, 8, 8), np.eye(3)), tmp / "flat.nii.gz")
    code = apply(str(p["affine"]), str(tmp / "flat.nii.gz"), "-r", str(p["fixed"]))
    _assert_failed_cleanly(
        capsys, code, out_dir, before, "flat.nii.gz: image is 2D but the transform is 3D"
    )
    # unreadable transform
    (tmp / "junk.mat").write_bytes(b"\x01\x02junk" * 10)
    code = apply(str(tmp / "junk.mat"), str(p["moving"]), "-r", str(p["fixed"]))
    _assert_failed_cleanly(capsys, code, out_dir, before, "junk.mat")
    # unsupported output extension
    code = main(
        [
            "apply",
            str(p["affine"]),
            str(p["moving"]),
            "-r",
            str(p["fixed"]),
            "-o",
            str(out_dir / "o.png"),
        ]
    )
    _assert_failed_cleanly(capsys, code, out_dir, before, "o.png: unsupported image extension")
    # labels are never warped linearly
    code = apply(
        str(p["affine"]),
        str(p["labels"]),
        "-r",
        str(p["fixed"]),
        "--labels",
        "--interpolation",
        "linear",
    )
    _assert_failed_cleanly(capsys, code, out_dir, before, "never warped with plain linear")
    # a float image that is not a label map
    code = apply(str(p["affine"]), str(p["moving"]), "-r", str(p["fixed"]), "--labels")
    _assert_failed_cleanly(
        capsys, code, out_dir, before, "moving.nii.gz: label map holds non-integer"
    )


def test_apply_on_real_brain_matches_ants(tmp_path, ixi_pair):
    ants = pytest.importorskip("ants", reason="antspyx is not installed")
    fixed_path, moving_path = ixi_pair
    fixed = load_image(fixed_path)
    m = random_affine(
        3,
        rotation=25,
        translation=10,
        seed=4,
        dtype=torch.float64,
        center=torch.tensor(fixed.geometry.center_world),
    )[0]
    save_transform(AffineTransform(m), tmp_path / "t.nii.gz", reference=fixed.geometry)
    out = run(
        "apply",
        str(tmp_path / "t.nii.gz"),
        str(moving_path),
        "-r",
        str(fixed_path),
        "-o",
        str(tmp_path / "w.nii.gz"),
    )
    assert out.returncode == 0, out.stderr
    ours = load_image(tmp_path / "w.nii.gz").data[0].numpy()
    theirs = ants.apply_transforms(
        ants.image_read(str(fixed_path)),
        ants.image_read(str(moving_path)),
        [str(tmp_path / "t.nii.gz")],
    ).numpy()
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_apply_cuda_without_cuda_is_a_clear_error(case, capsys):
    tmp, p, _ = case
    out = tmp / "cuda.nii.gz"
    args = [str(p["affine"]), str(p["moving"]), "-r", str(p["fixed"]), "-o", str(out)]
    assert main(["apply", *args, "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()
