"""KeyMorph numbers that are not registration accuracy (that is `unireg evaluate` and
bench/registration_benchmark.py with `keymorph:affine` / `keymorph:tps` specs):

    python bench/keymorph_benchmark.py tps     # TPS on a 160x192x224 grid: time, peak memory
    python bench/keymorph_benchmark.py t1t2 [--model M] [-o DIR]
        # IXI002 T1 vs T2 (same subject, separate grids): keypoint deviation (world mm) of the
        # model before training (its initialisation, same seed) and after; T2->T1 figure
    python bench/keymorph_benchmark.py keypoints [--model M ...] [--split train] [--rotations R]
        # anatomical keypoints against the true DLMUSE centroids of their labels (world mm) on
        # a split's IXI subjects: error per subject, and the best affine from the true
        # centroids to the keypoints (its singular values: a shrink towards the head's centre
        # shows as values < 1; what differs between two subjects becomes a pair's affine error)

Needs ../shared/data (or $UNIREG_SHARED_DATA) for t1t2 and keypoints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def tps_memory(keypoints: int = 128, shape=(160, 192, 224), chunk: int = 2**16) -> None:
    from unireg.profiling import Measure
    from unireg.spatial import fit_tps
    from unireg.spatial.field import world_points
    from unireg.spatial.geometry import Geometry

    geom = Geometry(shape, np.diag([1.0, 1.0, 1.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        centre = torch.tensor(shape, dtype=dtype) / 2
        fixed = centre + 40 * torch.randn(1, keypoints, 3, generator=g, dtype=dtype)
        moving = fixed + 3 * torch.randn(1, keypoints, 3, generator=g, dtype=dtype)
        tps = fit_tps(fixed / 64, moving / 64, 0.1)
        pts = world_points(geom, dtype=dtype).reshape(1, -1, 3) / 64
        with Measure("cpu") as m:
            out = tps(pts, chunk=chunk)
        grid_mb = pts.numel() * pts.element_size() / 2**20
        print(f"TPS {keypoints} keypoints on {'x'.join(map(str, shape))} ({pts.shape[1]} points, "
              f"{str(dtype)[6:]}), chunk {chunk}: {m.seconds:.2f} s, peak growth "
              f"{m.peak_bytes / 2**20:.0f} MiB (input points {grid_mb:.0f} MiB, output "
              f"{out.numel() * out.element_size() / 2**20:.0f} MiB)")  # fmt: skip
        del out, pts


def t1t2(model_path: str | None, outdir: Path) -> None:
    from unireg.io import load_image
    from unireg.methods import load_model, model_path
    from unireg.methods.keymorph import DEFAULT_ROTATIONS, detect_keypoints, register_keymorph
    from unireg.methods.keymorph.training import KeyMorphConfig
    from unireg.report import keypoint_figure

    base = DATA / "ixi002-t1t2"
    t1 = load_image(base / "hd_bet_IXI002-Guys-0828-T1.nii.gz")
    t2 = load_image(base / "hd_bet_IXI002-Guys-0828-T2.nii.gz")
    trained, payload = load_model("keymorph", model_path)
    cfg = KeyMorphConfig(**{k: v for k, v in payload.train_config.items()
                            if k in KeyMorphConfig.__dataclass_fields__})  # fmt: skip
    torch.manual_seed(cfg.seed)
    untrained = replace(cfg, coarse="").model().eval()  # a two-stage model: its trained detector
    models = [("before training (random initialisation)", untrained, 1)]
    for key in ("init", "coarse"):  # its starting point, its first stage (shipped, or the file)
        path = Path(getattr(cfg, key))
        if not str(getattr(cfg, key)):
            continue
        if not path.is_file():
            path = model_path("keymorph").parent / path.name
        if path.is_file():
            models.append((f"its {key} checkpoint {path.name}", load_model("keymorph", path)[0], 1))
    models += [
        ("trained", trained, 1),
        (f"trained, {DEFAULT_ROTATIONS} test-time rotations", trained, DEFAULT_ROTATIONS),
    ]
    for name, model, turns in models:
        with torch.no_grad():
            k1 = detect_keypoints(model, payload, t1, turns)[0]
            k2 = detect_keypoints(model, payload, t2, turns)[0]
        dev = (k1 - k2).norm(dim=-1)
        spread = float(k1.std(0).norm())
        print(f"{name}: T1-T2 keypoint deviation mean {float(dev.mean()):.2f} mm, median "
              f"{float(dev.median()):.2f} mm, max {float(dev.max()):.2f} mm "
              f"(keypoint spread {spread:.1f} mm)")  # fmt: skip
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = register_keymorph(t1, t2, model=trained, checkpoint=payload, transform="affine")
    print(f"T2 -> T1 affine from the keypoints in {time.perf_counter() - t0:.2f} s")
    kps = {k: getattr(result.extras, f"keypoints_{k}") for k in ("fixed", "moving", "aligned")}
    title = "KeyMorph: IXI002 T2 onto T1 (affine from the keypoints)"
    path = keypoint_figure(
        t1, t2, kps, outdir / "keymorph_t2_to_t1.png", warped=result.warped, title=title
    )
    print(f"wrote {path}")


def keypoint_errors(model_paths: list[str], split: str, rotations: int) -> None:
    from unireg.data.manifest import Manifest
    from unireg.io import load_image, load_labels
    from unireg.methods import load_model
    from unireg.methods.keymorph import detect_keypoints
    from unireg.spatial.geometry import apply_matrix_np
    from unireg.spatial.keypoints import fit_affine

    entries = Manifest.read(DATA / "manifest.csv").select(
        dataset="ixi", split=split, with_image=True, with_labels=True
    )
    subjects = []
    for e in entries:
        labels = load_labels(e.labels)
        lab = np.asarray(labels.data[0])
        subjects.append((e.subject, load_image(e.image), lab, labels.geometry.voxel_to_world))
    for path in model_paths or [None]:
        model, payload = load_model("keymorph", path)
        names = payload.extra.get("anatomical_labels")
        if not names:
            print(f"{path}: no anatomical labels in the checkpoint; skipped")
            continue
        print(f"{path or 'shipped default'} ({rotations} rotations), IXI {split}:")
        errors = []
        for subject, image, lab, to_world in subjects:
            true = np.stack([np.argwhere(lab == v).mean(0) for v in names])
            true = apply_matrix_np(to_world, true)
            with torch.no_grad():
                found = detect_keypoints(model, payload, image, rotations)[0].numpy()
            err = np.linalg.norm(found - true, axis=1)
            errors.append(err)
            # best affine true -> found (least squares): its linear part's singular values
            fit = fit_affine(torch.as_tensor(true)[None], torch.as_tensor(found)[None])[0].numpy()
            sv = np.linalg.svd(fit[:3, :3], compute_uv=False)
            rest = np.linalg.norm(apply_matrix_np(fit, true) - found, axis=1)
            print(f"  {subject}: error mean {err.mean():.2f} mm, median {np.median(err):.2f} mm; "
                  f"affine true->found singular values {sv.round(3).tolist()}, residual after "
                  f"it {rest.mean():.2f} mm")  # fmt: skip
        allerr = np.concatenate(errors)
        print(f"  all: error mean {allerr.mean():.2f} mm, median {np.median(allerr):.2f} mm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["tps", "t1t2", "keypoints"])
    ap.add_argument("--model", nargs="*", default=[], help="KeyMorph checkpoint(s) (default: "
                    "shipped; t1t2 takes one)")  # fmt: skip
    ap.add_argument("--split", default="train", help="IXI split (keypoints)")
    ap.add_argument("--rotations", type=int, default=8, help="test-time rotations (keypoints)")
    ap.add_argument("-o", "--output", default="bench/results", help="figure folder (t1t2)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "tps":
        tps_memory()
        return
    if not (DATA / "manifest.csv").exists():
        sys.exit(f"shared data not found at {DATA}")
    if args.what == "keypoints":
        keypoint_errors(args.model, args.split, args.rotations)
    else:
        if len(args.model) > 1:
            sys.exit("t1t2 takes one --model")
        t1t2(args.model[0] if args.model else None, Path(args.output))


if __name__ == "__main__":
    main()
