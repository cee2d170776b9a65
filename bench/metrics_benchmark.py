"""Dice and HD95 over all DLMUSE regions of real label maps: unireg against MONAI in the same
run (time, and the largest disagreement between the two), plus the Jacobian statistics of a
dense transform on a 160x192x224 grid.

    python bench/metrics_benchmark.py [--data ../shared/data] [--threads 2]

The pairs are the IXI test subjects' label maps (2 mm), the moving map resampled onto the fixed
grid with nearest neighbour (identity in world space: a poor, unregistered overlap, which is the
hard case for HD95).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from unireg.data import Manifest
from unireg.io.image import load_labels, resample
from unireg.metrics import dice, hausdorff95, jacobian_stats, transform_jacobian
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import DisplacementFieldTransform


def monai_scores(fixed: np.ndarray, moving: np.ndarray, labels: list[int], spacing):
    from monai.metrics import compute_dice, compute_hausdorff_distance

    def onehot(x):
        return torch.from_numpy(np.stack([x == k for k in labels]))[None]

    f, m = onehot(fixed), onehot(moving)
    d = compute_dice(m, f, include_background=True)[0]
    h = compute_hausdorff_distance(m, f, include_background=True, percentile=95, spacing=spacing)
    return d.numpy(), h[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entries = Manifest.read(Path(args.data) / "manifest.csv").select(dataset="ixi", split="test")
    maps = [load_labels(e.labels) for e in entries]
    t_ours = t_monai = 0.0
    worst_d = worst_h = 0.0
    n_labels = []
    for i in range(len(maps)):
        for j in range(len(maps)):
            if i == j:
                continue
            fixed = maps[i]
            moving = resample(maps[j], fixed.geometry, mode="nearest")
            f, m = fixed.data[0].numpy(), moving.data[0].numpy()
            start = time.perf_counter()
            d = dice(f, m)
            h = hausdorff95(f, m, spacing=fixed.spacing)
            t_ours += time.perf_counter() - start
            labels = list(d)
            n_labels.append(len(labels))
            start = time.perf_counter()
            md, mh = monai_scores(f, m, labels, fixed.spacing)
            t_monai += time.perf_counter() - start
            ours_d, ours_h = np.array([d[k] for k in labels]), np.array([h[k] for k in labels])
            both = np.isfinite(ours_h) & np.isfinite(mh)
            assert np.array_equal(np.isfinite(ours_h), np.isfinite(mh))
            worst_d = max(worst_d, float(np.abs(ours_d - md).max()))
            worst_h = max(worst_h, float(np.abs(ours_h[both] - mh[both]).max()))
    pairs = len(maps) * (len(maps) - 1)
    print(f"{pairs} ordered IXI test pairs, {min(n_labels)}-{max(n_labels)} labels each, 2 mm")
    print(f"unireg Dice+HD95: {t_ours / pairs:.2f} s/pair; MONAI: {t_monai / pairs:.2f} s/pair")
    print(f"time ratio unireg/MONAI: {t_ours / t_monai:.2f}x")
    print(f"largest difference from MONAI: Dice {worst_d:.2e}, HD95 {worst_h:.2e} mm")

    shape = (160, 192, 224)
    geom = Geometry(shape, np.diag([1.0, 1.0, 1.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 8, 8, 8, generator=g) * 3
    field = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]
    start = time.perf_counter()
    stats = jacobian_stats(transform_jacobian(DisplacementFieldTransform(field, geom), geom))
    elapsed = time.perf_counter() - start
    print(
        f"Jacobian statistics of a dense field on {'x'.join(map(str, shape))}: {elapsed:.2f} s "
        f"(folding {stats['folding_percent']:.3f} %, std {stats['jacobian_std']:.3f})"
    )
    assert math.isfinite(stats["jacobian_std"])


if __name__ == "__main__":
    main()
