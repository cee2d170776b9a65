"""AVSM numbers beside `unireg evaluate` (accuracy against peers, the affine steps and vSVF
passes swept, at 0 and 45 degrees, is that command with `avsm` specs; registration time
against ANTs SyN is `bench/registration_benchmark.py`; see docs/methods/avsm.md):

    python bench/avsm_benchmark.py command [--method avsm] [--threads 2]
        # the whole command as a user runs it, on each IXI test pair: `unireg register F M -o
        # DIR --method avsm --no-hd95` against a script doing the same with ANTsPy SyN (import,
        # read, register, write the warped image and the transforms), wall time per pair and
        # the ratio
    python bench/avsm_benchmark.py steps [--model M ...] [--pairs 12]
        # the rule behind the test-time affine steps, on training data only: the affine
        # network alone (`--stage affine`) on the first ordered pairs of the IXI training
        # subjects, mean Dice over the DLMUSE labels after 1, 2, 3, 5 and 7 steps; the default
        # is the count of highest mean Dice (ties: fewer steps)
    python bench/avsm_benchmark.py cycle [--model M ...]
        # consistency in mm on the IXI test pairs: each registration's transform against its
        # own inverse, and against the registration run the other way (cycle), per model
    python bench/avsm_benchmark.py heldout -o DIR [--subjects synthseg_13 ...]
        # a validation set for a run that keeps those SynthSeg training maps out
        # (`exclude_subjects`): from each, one image of a random contrast shared by all
        # (seeded; the real anatomy, dark air) on a 2 mm grid with its brain label map, and
        # DIR/pairs.csv of every ordered pair, for `unireg evaluate --pairs DIR/pairs.csv`

Needs ../shared/data (or $UNIREG_SHARED_DATA), and antspyx for `command`. Thread count:
OMP_NUM_THREADS / torch's from --threads; the numbers in the docs were taken with --threads 2
on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from command_benchmark import ANTS_SCRIPT, test_pairs  # bench/ is on sys.path

# the affine steps the test-time rule compares
STEP_COUNTS = (1, 2, 3, 5, 7)


def wall(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def command(method: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}  # fmt: skip
    unireg = [sys.executable, "-m", "unireg"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (f, m, _, _) in enumerate(test_pairs()):
            ours = wall([*unireg, "register", str(f), str(m), "-o", f"{tmp}/u{i}", "--method",
                         method, "--no-hd95", "--quiet"], env)  # fmt: skip
            Path(f"{tmp}/a{i}").mkdir()
            peer = wall([sys.executable, "-c", ANTS_SCRIPT, str(f), str(m), f"{tmp}/a{i}"], env)
            rows.append((ours, peer))
            print(f"pair {i}: unireg {method} {ours:.2f} s, ANTsPy SyN {peer:.2f} s", flush=True)
    ours = statistics.median(r[0] for r in rows)
    peer = statistics.median(r[1] for r in rows)
    print(f"median whole command: unireg {method} {ours:.2f} s, ANTsPy SyN {peer:.2f} s, "
          f"{peer / ours:.1f}x faster ({threads} threads)")  # fmt: skip


def cycle(models: list[str]) -> None:
    from unireg.io import load_image
    from unireg.methods import create
    from unireg.metrics import consistency_error

    data = test_pairs()
    images = {p: load_image(p) for p in {x for pair in data for x in pair[:2]}}
    for model in models:
        method = create(f"avsm:model={model}" if model else "avsm")
        results = {(f, m): method.register(images[f], images[m]) for f, m, _, _ in data}
        inv, cyc = [], []
        for (f, m), res in results.items():
            geom = images[f].geometry
            inv.append(consistency_error([res.transform, res.inverse], geom)["mean_mm"])
            back = results[(m, f)]
            cyc.append(consistency_error([res.transform, back.transform], geom)["mean_mm"])
        print(f"{model or 'default'}: inverse consistency {np.mean(inv):.3f} mm, cycle "
              f"consistency (swapped run) {np.mean(cyc):.3f} mm (mean over "
              f"{len(results)} pairs)")  # fmt: skip


def steps(models: list[str], count: int) -> None:
    from dio_benchmark import mean_dice, pairs

    from unireg.methods import create, options_for

    data = pairs("train")[:count]
    for model in models:
        dice = {}
        for k in STEP_COUNTS:
            options = {"model": model or None, "stage": "affine", "affine_steps": k}
            method = create("avsm", options_for("avsm", options))
            dice[k] = float(np.mean([mean_dice(fl, method.register(f, m).warp(ml))
                                     for f, m, fl, ml in data]))  # fmt: skip
            print(f"{model or 'default'}: {k} steps, Dice {dice[k]:.4f} ({len(data)} "
                  "training pairs)", flush=True)  # fmt: skip
        best = max(STEP_COUNTS, key=lambda k: (dice[k], -k))
        print(f"{model or 'default'}: highest mean Dice with {best} steps")


def heldout(subjects: list[str], out: Path, seed: int) -> None:
    import torch
    from dio_benchmark import DATA

    from unireg.data.manifest import Manifest
    from unireg.data.synthesis import LabelSynthesis
    from unireg.io.image import Image, load_labels, resample, save_image
    from unireg.spatial.filters import gaussian_blur
    from unireg.spatial.geometry import Geometry
    from unireg.training.base import _SYNTHSEG_NON_BRAIN

    manifest = Manifest.read(DATA / "manifest.csv")
    maps_of = {e.subject: e.labels for e in manifest if e.dataset == "synthseg"}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for subject in subjects:
        if maps_of.get(subject) is None:
            raise SystemExit(f"{subject}: not a SynthSeg subject of {DATA / 'manifest.csv'}")
    maps = [load_labels(maps_of[subject]) for subject in subjects]
    values = sorted(set().union(*(torch.unique(m.data).tolist() for m in maps)))
    for subject, labels in zip(subjects, maps, strict=True):
        # one seed and one list of labels for all: every image has the same contrast (the
        # same intensity per label), as scans of one protocol
        drawn = LabelSynthesis(deformation=0.0)(labels.data[None].long(), label_values=values,
                                                seed=seed)  # fmt: skip
        # air outside the head dark, as in a scan (the synthesis gives the background a
        # random intensity like every label; the networks place their grids on the image's
        # centre of mass); 2 mm voxels, each over 2^3 of the 1 mm ones, blurred first (FWHM
        # 2 mm)
        head = (labels.data[None] > 0).float()
        scale = np.diag([2.0, 2.0, 2.0, 1.0])
        scale[:3, 3] = 0.5
        grid = Geometry(tuple(n // 2 for n in labels.shape), labels.affine @ scale)
        smooth = gaussian_blur(drawn["image"].float() * head, 0.85)[0]
        image = resample(Image(smooth, labels.affine), grid)
        brain = resample(labels, grid)
        data = brain.data.clone()
        data[torch.isin(data, torch.tensor(sorted(_SYNTHSEG_NON_BRAIN)))] = 0
        paths = (out / f"{subject}.nii.gz", out / f"{subject}_labels.nii.gz")
        save_image(image, paths[0])
        save_image(brain.with_data(data, grid.affine), paths[1])
        written.append(paths)
        print(f"{subject}: {paths[0]}", flush=True)
    lines = ["fixed,moving,fixed_labels,moving_labels"]
    for (fi, fl), (mi, ml) in ((a, b) for a in written for b in written if a != b):
        lines.append(f"{fi.resolve()},{mi.resolve()},{fl.resolve()},{ml.resolve()}")
    (out / "pairs.csv").write_text("\n".join(lines) + "\n")
    print(f"{out / 'pairs.csv'}: {len(lines) - 1} ordered pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("command")
    p.add_argument("--method", default="avsm")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("steps")
    p.add_argument("--model", nargs="+", default=[""])
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("cycle")
    p.add_argument("--model", nargs="+", default=[""])
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("heldout")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--subjects", nargs="+", default=["synthseg_13", "synthseg_14",
                                                     "synthseg_15"])  # fmt: skip
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.what == "command":
        command(args.method, args.threads)
    elif args.what == "steps":
        steps(args.model, args.pairs)
    elif args.what == "heldout":
        heldout(args.subjects, args.output, args.seed)
    else:
        cycle(args.model)


if __name__ == "__main__":
    main()
