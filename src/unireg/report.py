"""A one-page picture of a registration: what a reviewer looks at first.

Rows are three orthogonal slices through the fixed image's centre (shown in RAS, superior /
anterior up); columns are the fixed image, the moving image before registration (on the fixed
grid, through world space only), the warped moving image, a checkerboard of fixed and warped,
the fixed image's edges over the warped image, the deformed grid (every 6th grid line of the
fixed image mapped by the transform, in mm on the slice) and the Jacobian determinant of the
transform (world mm/mm; blue < 1 < red, black where <= 0). Method extras with keypoints
(``extras.keypoints_fixed``, world mm ``(N, d)``) are drawn on the fixed image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from unireg.io.files import write_atomic
from unireg.io.image import Image, normalize_intensity, reorient, resample
from unireg.metrics import transform_jacobian
from unireg.result import KeyMorphExtras, RegistrationResult
from unireg.spatial.field import world_points


def _ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = reorient(Image(torch.from_numpy(np.ascontiguousarray(data))[None], affine), "RAS"
                   if data.ndim == 3 else "RA")  # fmt: skip
    return img.data[0].numpy(), img.affine


def _slice(vol: np.ndarray, axis: int) -> np.ndarray:
    """The middle slice across ``axis``, transposed so the second remaining axis points up."""
    sl = [slice(None)] * vol.ndim
    if vol.ndim == 3:
        sl[axis] = vol.shape[axis] // 2
    return vol[tuple(sl)].T


def _edges(x: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    mag = np.hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))
    return mag > np.percentile(mag, 92)


def _checker(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    yy, xx = np.indices(a.shape)
    size = max(max(a.shape) // tiles, 1)
    return np.where(((yy // size) + (xx // size)) % 2 == 0, a, b)


def registration_report(
    result: RegistrationResult,
    fixed: Image,
    moving: Image,
    path: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the report of ``result`` (``moving`` registered onto ``fixed``) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geom = fixed.geometry
    d = geom.ndim
    f_img = normalize_intensity(fixed.with_data(fixed.data[:1].float().cpu()))
    m_img = normalize_intensity(moving.with_data(moving.data[:1].float().cpu()))
    before = resample(m_img, geom)
    warped = result.warp(m_img)
    det = (
        result.jacobian()
        if geom.same_grid(result.fixed)
        else transform_jacobian(result.transform, geom)
    )
    jac = det.float().numpy()
    mapped = result.transform.map_points(world_points(geom, dtype=torch.float64))[0].numpy()
    vols = {
        "fixed": f_img.data[0].numpy(),
        "moving (before)": before.data[0].numpy(),
        "warped": warped.data[0].numpy(),
        "jacobian": jac,
    }
    ras = {k: _ras(v, geom.affine)[0] for k, v in vols.items()}
    # the mapped world points, as d channels reoriented like the images
    mapped_ras = np.stack([_ras(mapped[..., c], geom.affine)[0] for c in range(d)], -1)
    ras_affine = _ras(vols["fixed"], geom.affine)[1]
    to_vox = np.linalg.inv(ras_affine)

    rows = [0, 1, 2] if d == 3 else [0]
    names = ["sagittal", "coronal", "axial"] if d == 3 else ["slice"]
    cols = ["fixed", "moving (before)", "warped", "checkerboard", "fixed edges on warped",
            "deformed grid", "Jacobian det."]  # fmt: skip
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.3 * len(cols), 2.5 * len(rows)),
                             dpi=110, squeeze=False)  # fmt: skip
    kp = result.extras.keypoints_fixed if isinstance(result.extras, KeyMorphExtras) else None
    for r, axis in enumerate(rows):
        f2 = _slice(ras["fixed"], axis)
        w2 = _slice(ras["warped"], axis)
        panels = [f2, _slice(ras["moving (before)"], axis), w2, _checker(f2, w2)]
        for c, img in enumerate(panels):
            axes[r, c].imshow(img, cmap="gray", origin="lower", vmin=0, vmax=1)
        edge = _edges(f2)
        overlay = np.clip(np.dstack([w2, w2, w2]), 0.0, 1.0)
        overlay[edge] = [1.0, 0.15, 0.15]
        axes[r, 4].imshow(overlay, origin="lower")
        # deformed grid: mapped points, in the RAS voxel frame, of every 6th line of the slice
        keep = [a for a in range(d) if a != axis] if d == 3 else [0, 1]
        pts = mapped_ras
        if d == 3:
            idx = [slice(None)] * 3
            idx[axis] = pts.shape[axis] // 2
            pts = pts[tuple(idx)]
        vox = pts @ to_vox[:d, :d].T + to_vox[:d, d]
        u, v = vox[..., keep[0]], vox[..., keep[1]]
        ax = axes[r, 5]
        ax.imshow(w2 * 0.35, cmap="gray", origin="lower", vmin=0, vmax=1)
        step = 6
        for i in range(0, u.shape[0], step):
            ax.plot(u[i, :], v[i, :], color="#ffcc00", lw=0.5)
        for j in range(0, u.shape[1], step):
            ax.plot(u[:, j], v[:, j], color="#ffcc00", lw=0.5)
        ax.set_xlim(-0.5, f2.shape[1] - 0.5)
        ax.set_ylim(-0.5, f2.shape[0] - 0.5)
        j2 = _slice(ras["jacobian"], axis)
        im = axes[r, 6].imshow(j2, cmap="coolwarm", origin="lower", vmin=0.5, vmax=1.5)
        folds = np.ma.masked_where(j2 > 0, np.ones_like(j2))
        axes[r, 6].imshow(folds, cmap="gray_r", origin="lower", vmin=0, vmax=1)
        if kp is not None and d == 3:
            k = np.asarray(kp, float) @ to_vox[:3, :3].T + to_vox[:3, 3]
            near = np.abs(k[:, axis] - ras["fixed"].shape[axis] // 2) < 3
            axes[r, 0].scatter(k[near, keep[0]], k[near, keep[1]], s=6, c="#00e5ff")
        axes[r, 0].set_ylabel(names[r])
        for c in range(len(cols)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=9)
    fig.colorbar(im, ax=axes[:, 6].tolist(), fraction=0.05, shrink=0.8)
    head = title or "unireg registration"
    if metrics:
        parts = []
        if metrics.get("dice_mean") is not None:
            parts.append(f"Dice {metrics['dice_mean']:.3f}")
        if metrics.get("hd95_mean") is not None:
            parts.append(f"HD95 {metrics['hd95_mean']:.2f} mm")
        if metrics.get("folding_percent") is not None:
            parts.append(f"folding {metrics['folding_percent']:.3f} %")
        if result.elapsed is not None:
            parts.append(f"{result.elapsed:.1f} s")
        head += " - " + ", ".join(parts)
    fig.suptitle(head, fontsize=11)
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def keypoint_figure(
    fixed: Image,
    moving: Image,
    keypoints: dict[str, np.ndarray],
    path: str | Path,
    *,
    warped: Image | None = None,
    title: str | None = None,
) -> Path:
    """Keypoints over three orthogonal slices (RAS, through each image's centre).

    ``keypoints`` maps ``"fixed"``, ``"moving"`` and optionally ``"aligned"`` to world-mm
    arrays ``(K, 3)``. Columns: the fixed image with its keypoints, the moving image with its
    keypoints and, with ``warped``, the warped moving image with the fixed keypoints (+) and
    the aligned ones (x). Every keypoint is projected onto each view (marker size shrinks
    with the distance to the slice); keypoint ``k`` has the same colour in every panel, so
    corresponding points can be followed from image to image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fixed", fixed, ["fixed"]), ("moving", moving, ["moving"])]
    if warped is not None:
        panels.append(("warped (+ fixed, x aligned)", warped, ["fixed", "aligned"]))
    k = len(next(iter(keypoints.values())))
    colours = plt.get_cmap("hsv")(np.linspace(0, 1, k, endpoint=False))
    fig, axes = plt.subplots(3, len(panels), figsize=(3.0 * len(panels), 8.4), dpi=110,
                             squeeze=False)  # fmt: skip
    for c, (name, image, which) in enumerate(panels):
        img = normalize_intensity(image.with_data(image.data[:1].float().cpu()))
        vol, ras_affine = _ras(img.data[0].numpy(), image.affine)
        to_vox = np.linalg.inv(ras_affine)
        for r, axis in enumerate((0, 1, 2)):
            keep = [a for a in range(3) if a != axis]
            ax = axes[r, c]
            ax.imshow(_slice(vol, axis), cmap="gray", origin="lower", vmin=0, vmax=1)
            for kind in which:
                if kind not in keypoints:
                    continue
                pts = np.asarray(keypoints[kind], float) @ to_vox[:3, :3].T + to_vox[:3, 3]
                dist = np.abs(pts[:, axis] - vol.shape[axis] // 2)
                size = 4 + 30 * np.exp(-dist / 8.0)
                marker = "x" if kind == "aligned" else "o" if c < 2 else "+"
                ax.scatter(pts[:, keep[0]], pts[:, keep[1]], s=size, c=colours, marker=marker,
                           linewidths=0.8)  # fmt: skip
            ax.set_xlim(-0.5, vol.shape[keep[0]] - 0.5)
            ax.set_ylim(-0.5, vol.shape[keep[1]] - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(["sagittal", "coronal", "axial"][r])
    fig.suptitle(title or f"{k} keypoints", fontsize=11)
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
