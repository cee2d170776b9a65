"""Time and peak memory of warping a 160x192x224 volume: unireg against ANTsPy and SciPy.

Every case runs in its own process, on the same data, in the same run; the peak-memory number is
the growth of the process's peak resident set (VmHWM, reset just before the timed part) over
what it held after loading its inputs. Times are the median of ``--repeats`` runs.

    python bench/warp_benchmark.py [--shape 160 192 224] [--repeats 5] [--threads 2]

Cases:
  unireg_affine        AffineTransform read from .mat, warp (linear)
  unireg_field         displacement field read from .nii, warp (linear)   <- vs ants_field
  unireg_labels        same field, label map, nearest neighbour           <- vs ants_labels
  unireg_tensor_field  tensor-level warp(image, disp) as networks call it (no file)
  ants_affine          ants.apply_transforms with the same .mat
  ants_field           ants.apply_transforms with the same .nii field
  ants_labels          ants.apply_transforms, nearestNeighbor
  scipy_field          scipy.ndimage.map_coordinates(order=1) on precomputed voxel coordinates
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    "unireg_affine",
    "ants_affine",
    "unireg_field",
    "ants_field",
    "scipy_field",
    "unireg_labels",
    "ants_labels",
    "unireg_tensor_field",
]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def make_data(folder: Path, shape: tuple[int, int, int]) -> None:
    """Write a smooth image, a label map, an affine and a ~5 mm smooth displacement field."""
    import numpy as np
    import torch

    from unireg.io import Image, LabelMap, save_affine, save_image, save_transform
    from unireg.spatial import (
        AffineTransform,
        CompositeTransform,
        DisplacementFieldTransform,
        Geometry,
        random_affine,
    )

    g = torch.Generator().manual_seed(0)
    affine = np.array([[-1.0, 0, 0, 80], [0, 1.0, 0, -110], [0, 0, 1.0, -100], [0, 0, 0, 1]])
    geom = Geometry(shape, affine)
    small = torch.rand(1, 1, 12, 14, 16, generator=g)
    img = torch.nn.functional.interpolate(small, size=shape, mode="trilinear", align_corners=True)
    save_image(Image(img[0] * 1000, affine), folder / "image.nii")
    save_image(LabelMap((img[0] * 40).long(), affine), folder / "labels.nii")
    m = random_affine(
        3,
        rotation=10,
        translation=5,
        seed=1,
        dtype=torch.float64,
        center=torch.tensor(geom.center_world),
    )[0]
    save_affine(AffineTransform(m), folder / "affine.mat")
    coarse = torch.randn(1, 3, 6, 7, 8, generator=g) * 2.5
    field = torch.nn.functional.interpolate(
        coarse, size=shape, mode="trilinear", align_corners=True
    )
    chain = CompositeTransform([DisplacementFieldTransform(field[0], geom), AffineTransform(m)])
    save_transform(chain, folder / "field.nii", reference=geom)


def run_case(case: str, folder: Path, repeats: int) -> dict:
    """Run one case in this process; returns seconds and peak extra memory in MiB."""
    import numpy as np

    setup_kb = 0
    if case.startswith("unireg"):
        import torch

        from unireg.io import load_image, load_labels, load_transform, resample
        from unireg.spatial import displacement_from_world, warp

        if case == "unireg_tensor_field":
            t = load_transform(folder / "field.nii")
            img = load_image(folder / "image.nii")
            disp = displacement_from_world(t.field[None], t.geometry, img.geometry)
            x = img.batch()

            def job():
                with torch.no_grad():
                    return warp(x, disp)

        else:
            labels = case == "unireg_labels"
            img = load_labels(folder / "labels.nii") if labels else load_image(folder / "image.nii")
            tname = "affine.mat" if case == "unireg_affine" else "field.nii"

            def job():
                with torch.no_grad():
                    return resample(img, img.geometry, load_transform(folder / tname))

    elif case.startswith("ants"):
        import ants

        interp = "nearestNeighbor" if case == "ants_labels" else "linear"
        img = ants.image_read(
            str(folder / ("labels.nii" if case == "ants_labels" else "image.nii"))
        )
        tname = "affine.mat" if case == "ants_affine" else "field.nii"

        def job():
            return ants.apply_transforms(img, img, [str(folder / tname)], interpolator=interp)

    elif case == "scipy_field":
        import nibabel as nib
        from scipy.ndimage import map_coordinates

        from unireg.io import load_image, load_transform

        img = load_image(folder / "image.nii")
        t = load_transform(folder / "field.nii")
        pts = t.moving_points(img.geometry, img.geometry)[0].double().numpy()
        coords = np.moveaxis((pts + 1) / 2 * (np.array(img.shape) - 1), -1, 0)
        data = np.asarray(nib.load(folder / "image.nii").dataobj)

        def job():
            return map_coordinates(data, coords, order=1, mode="constant", cval=0.0)

    else:
        raise ValueError(case)
    job()  # warm-up (first-call allocations, lazy imports)
    setup_kb = _status_kb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = job()
        times.append(time.perf_counter() - start)
        del out
    peak_kb = _status_kb("VmHWM")
    return {
        "case": case,
        "seconds": statistics.median(times),
        "seconds_all": times,
        "peak_extra_mib": (peak_kb - setup_kb) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 224])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cases", nargs="*", default=CASES)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # child process
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.case, args.folder, args.repeats)))
        return

    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder, tuple(args.shape))
        results = {}
        for case in args.cases:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                case,
                "--folder",
                str(folder),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{case}: failed\n{proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    shape = "x".join(map(str, args.shape))
    print(f"\nWarp of a {shape} volume, CPU, {args.threads} threads, median of {args.repeats}\n")
    print("| case | time (s) | peak extra memory (MiB) | time vs ANTs | memory vs ANTs |")
    print("|---|---:|---:|---:|---:|")
    peers = {
        "affine": "ants_affine",
        "field": "ants_field",
        "labels": "ants_labels",
        "tensor_field": "ants_field",
        "scipy_field": "ants_field",
    }
    for case, r in results.items():
        key = case.split("_", 1)[1] if case.startswith("unireg") else case
        peer = results.get(peers.get(key, ""))
        if peer and not case.startswith("ants"):
            tr = f"{r['seconds'] / peer['seconds']:.2f}x"
            mr = f"{r['peak_extra_mib'] / max(peer['peak_extra_mib'], 1e-9):.2f}x"
        else:
            tr = mr = "-"
        print(f"| {case} | {r['seconds']:.3f} | {r['peak_extra_mib']:.0f} | {tr} | {mr} |")
    print("\nratios < 1 mean unireg is faster / uses less memory than ANTsPy on the same job")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
