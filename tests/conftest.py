"""Shared fixtures. Real data lives in ../shared/data beside the project (or $UNIREG_SHARED_DATA);
tests that need it skip with a message when it is absent."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))
IXI_T1 = SHARED_DATA / "ixi" / "t1"
IXI_LABELS = SHARED_DATA / "ixi" / "labels"

torch.set_num_threads(2)

_SHARED_TOKENS = ("shared_file(", "SHARED_DATA", "IXI_T1", "IXI_LABELS")


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _reads_shared(source: str, helpers: set[str]) -> bool:
    return any(t in source for t in _SHARED_TOKENS) or any(f"{h}(" in source for h in helpers)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that read ``../shared/data`` (``-m shared_data`` / ``-m "not
    shared_data"``): those whose code, one of their fixtures, or a helper of their module that
    they call reads it."""
    helpers: dict[str, set[str]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None or module.__name__ in helpers:
            continue
        helpers[module.__name__] = {
            name for name, obj in vars(module).items()
            if inspect.isfunction(obj) and not name.startswith("test_")
            and any(t in _source(obj) for t in _SHARED_TOKENS)
        }  # fmt: skip
    for item in items:
        module = getattr(item, "module", None)
        mine = helpers.get(module.__name__, set()) if module is not None else set()
        sources = [_source(getattr(item, "function", None))]
        info = getattr(item, "_fixtureinfo", None)
        for defs in info.name2fixturedefs.values() if info is not None else ():
            sources += [_source(d.func) for d in defs]
        if any(_reads_shared(src, mine) for src in sources):
            item.add_marker(pytest.mark.shared_data)


def shared_file(*parts: str) -> Path:
    """A file under the shared data folder, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (set UNIREG_SHARED_DATA)")
    return path


@pytest.fixture
def ixi_pair() -> tuple[Path, Path]:
    """Two IXI T1 brains (2 mm, PSR orientation) from the shared data."""
    return (
        shared_file("ixi", "t1", "IXI012-HH-1211-T1_ds.nii.gz"),
        shared_file("ixi", "t1", "IXI013-HH-1212-T1_ds.nii.gz"),
    )


@pytest.fixture
def ixi_labels() -> Path:
    """DLMUSE label map on the grid of the first brain of ``ixi_pair``."""
    return shared_file("ixi", "labels", "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz")


def smooth_image(shape: tuple[int, ...], seed: int = 0, channels: int = 1) -> torch.Tensor:
    """A smooth random image ``(1, C, *shape)`` in float64: a sum of random Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(
        *[torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape], indexing="ij"
    )
    out = torch.zeros(channels, *shape, dtype=torch.float64)
    for c in range(channels):
        for _ in range(6):
            centre = torch.rand(len(shape), generator=g, dtype=torch.float64) * 1.2 - 0.6
            width = 0.2 + 0.3 * torch.rand(1, generator=g, dtype=torch.float64)
            r2 = sum((a - m) ** 2 for a, m in zip(axes, centre, strict=True))
            out[c] += torch.exp(-r2 / (2 * width**2))
    return out.unsqueeze(0)


def smooth_field(shape: tuple[int, ...], amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random displacement ``(1, d, *shape)`` (normalised units), max |u| = amplitude."""
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    coarse = torch.randn(1, d, *[4] * d, generator=g, dtype=torch.float64)
    mode = "bilinear" if d == 2 else "trilinear"
    field = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return field * (amplitude / field.abs().max())


def oblique_affine(spacing, angles_deg, origin) -> np.ndarray:
    """A 4x4 voxel-to-world affine: rotation (degrees about x, y, z), anisotropic spacing."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rx @ ry @ rz @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def gaussian_blob(shape: tuple[int, ...], center, sigma: float = 2.5) -> torch.Tensor:
    """A float64 Gaussian ``exp(-|x - center|^2 / 2 sigma^2)`` on a voxel grid (voxel units)."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    c = torch.tensor(center, dtype=torch.float64)
    return torch.exp(-((grid - c) ** 2).sum(-1) / (2 * sigma**2))


def voxel_lengths(u: torch.Tensor) -> torch.Tensor:
    """Per-voxel vector length, in voxel units, of a normalised displacement ``(B, d, *S)``."""
    shape = u.shape[2:]
    s = torch.tensor([(n - 1) / 2 for n in shape], dtype=u.dtype).view(1, -1, *[1] * len(shape))
    return (u * s).norm(dim=1)


def demo_brains():
    """The two shipped demo brains (IXI training subjects at 2 mm) and their DLMUSE label
    maps: ``(fixed, moving, fixed_labels, moving_labels)``."""
    from importlib import resources

    from unireg.io import load_image, load_labels

    data = resources.files("unireg.demo_data")
    names = ("IXI012-HH-1211-T1_ds", "IXI013-HH-1212-T1_ds")
    images = [load_image(str(data / f"{n}.nii.gz")) for n in names]
    labels = [load_labels(str(data / f"{n}_DLMUSE.nii.gz")) for n in names]
    return images[0], images[1], labels[0], labels[1]


def write_nifti(path: Path, data, affine) -> Path:
    """Save an array as NIfTI with ``affine``; returns the path."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def oblique_pair(
    folder: Path,
    shape: tuple[int, int, int],
    seed: int,
    fixed_origin: tuple[float, float, float],
    moving_angles: tuple[float, float, float],
    moving_origin: tuple[float, float, float],
):
    """A small 3D pair, one smooth image on two grids of 2 x 2 x 2.2 mm (the moving one
    turned by ``moving_angles`` degrees), with two-label maps: ``(fixed, moving,
    fixed_labels, moving_labels)`` paths in ``folder``."""
    vol = smooth_image(shape, seed=seed)[0, 0].numpy().astype(np.float32)
    fixed_aff = oblique_affine((2.0, 2.0, 2.2), (0, 0, 0), fixed_origin)
    moving_aff = oblique_affine((2.0, 2.0, 2.2), moving_angles, moving_origin)
    labels = (vol > np.percentile(vol, 60)).astype(np.int16) + (vol > np.percentile(vol, 85))
    return (write_nifti(folder / "fixed.nii.gz", vol, fixed_aff),
            write_nifti(folder / "moving.nii.gz", vol, moving_aff),
            write_nifti(folder / "fixed_labels.nii.gz", labels, fixed_aff),
            write_nifti(folder / "moving_labels.nii.gz", labels, moving_aff))  # fmt: skip


def assert_resumes_exactly(trainer_class, config, steps: int, atol: float = 1e-5):
    """Train ``config("straight", steps)`` in one run, and ``config("resumed", ...)`` to half
    the steps, then resumed from its checkpoint to ``steps``: finite losses, and the same
    weights within ``atol``. Returns the straight trainer."""
    straight = trainer_class(config("straight", steps))
    losses = straight.run(progress=False)
    assert len(losses) == steps and all(np.isfinite(losses))
    half = steps // 2
    trainer_class(config("resumed", half)).run(progress=False)
    resumed = trainer_class(config("resumed", steps))
    assert resumed.step == half
    resumed.run(progress=False)
    pairs = zip(straight.model.state_dict().values(), resumed.model.state_dict().values(),
                strict=True)  # fmt: skip
    for a, b in pairs:
        assert torch.allclose(a, b, atol=atol)
    return straight
