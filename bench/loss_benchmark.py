"""Time the similarity losses (forward + backward) on a 160x192x224 volume against MONAI's
implementations in the same run, and report peak memory.

    python bench/loss_benchmark.py [--shape 160 192 224] [--repeats 3] [--threads 2]

Peers: MONAI's LocalNormalizedCrossCorrelationLoss (rectangular kernel, separable), a
VoxelMorph-style LNCC (one dense 9^3 box convolution per statistic), and MONAI's
GlobalMutualInformationLoss (Gaussian Parzen window). Each case runs in a fresh process so that
peak memory (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = ["unireg-lncc", "monai-lncc", "voxelmorph-lncc", "unireg-mi", "monai-mi", "unireg-mk-lncc"]


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(case: str, shape: list[int], repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, *shape, generator=g)
    moving0 = (fixed * 0.7 + 0.3 * torch.rand(1, 1, *shape, generator=g)).clamp(0, 1)

    if case == "unireg-lncc":
        from unireg.losses import lncc

        def fn(m):
            return lncc(fixed, m, 9)
    elif case == "unireg-mk-lncc":
        from unireg.losses import multi_kernel_lncc

        def fn(m):
            return multi_kernel_lncc(fixed, m)
    elif case == "monai-lncc":
        from monai.losses import LocalNormalizedCrossCorrelationLoss

        loss = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=9, kernel_type="rectangular"
        )

        def fn(m):
            return loss(m, fixed)
    elif case == "voxelmorph-lncc":
        kernel = torch.ones(1, 1, 9, 9, 9)

        def fn(m):
            a, b = fixed, m
            sums = [F.conv3d(x, kernel, padding=4) for x in (a, b, a * a, b * b, a * b)]
            sa, sb, saa, sbb, sab = sums
            n = 729.0
            cross = sab - sa * sb / n
            va, vb = saa - sa * sa / n, sbb - sb * sb / n
            return 1 - (cross * cross / (va * vb + 1e-5)).mean()
    elif case == "unireg-mi":
        from unireg.losses import mutual_information

        def fn(m):
            return mutual_information(fixed, m, bins=32)
    elif case == "monai-mi":
        from monai.losses import GlobalMutualInformationLoss

        loss = GlobalMutualInformationLoss(num_bins=32)

        def fn(m):
            return loss(m, fixed)
    else:
        raise ValueError(case)

    times = []
    value = None
    for _ in range(repeats + 1):
        moving = moving0.clone().requires_grad_(True)
        if not times and value is None:
            _reset_peak()
        start = time.perf_counter()
        value = fn(moving)
        value.backward()
        times.append(time.perf_counter() - start)
    return {
        "case": case,
        "median_s": statistics.median(times[1:]),
        "peak_mb": _peak_mb(),
        "value": float(value.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 224])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.shape, args.repeats, args.threads)))
        return
    rows = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)]
        cmd += ["--threads", str(args.threads), "--shape", *map(str, args.shape)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{case}: failed ({out.stderr.strip().splitlines()[-1:]})")
            continue
        rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
    shape = "x".join(map(str, args.shape))
    print(f"forward + backward on {shape}, {args.threads} threads, median of {args.repeats}")
    print(f"{'case':18s} {'time (s)':>9s} {'peak (MB)':>10s} {'value':>9s}")
    for r in rows.values():
        print(f"{r['case']:18s} {r['median_s']:9.3f} {r['peak_mb']:10.0f} {r['value']:9.4f}")
    for ours, peer in [
        ("unireg-lncc", "monai-lncc"),
        ("unireg-lncc", "voxelmorph-lncc"),
        ("unireg-mi", "monai-mi"),
    ]:
        if ours in rows and peer in rows:
            t = rows[ours]["median_s"] / rows[peer]["median_s"]
            m = rows[ours]["peak_mb"] / rows[peer]["peak_mb"]
            print(f"{ours} / {peer}: time {t:.2f}x, peak memory {m:.2f}x")


if __name__ == "__main__":
    main()
