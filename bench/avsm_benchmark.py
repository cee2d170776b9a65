"""AVSM numbers beside `unireg evaluate` (accuracy against peers, the affine steps and vSVF
passes swept, at 0 and 45 degrees, is that command with `avsm` specs; registration time
against ANTs SyN is `bench/registration_benchmark.py`; see docs/methods/avsm.md):

    python bench/avsm_benchmark.py command [--method avsm] [--threads 2]
        # the whole command as a user runs it, on each IXI test pair: `unireg register F M -o
        # DIR --method avsm --no-hd95` against a script doing the same with ANTsPy SyN (import,
        # read, register, write the warped image and the transforms), wall time per pair and
        # the ratio
    python bench/avsm_benchmark.py steps --config C --model M [--views 40]
        # the rule behind the test-time affine steps, on training data only: on seeded views
        # of pairs of the config's training subjects (augmented as in training: the moving view
        # rotated up to `rotation`, the fixed up to `fixed_rotation`), the corner distance
        # (mm, RMS over the grid's 8 corners) between the network's affine after 1..9 steps and
        # the affine the augmentations imply; the default is the step count with the lowest
        # mean
    python bench/avsm_benchmark.py cycle [--model M ...]
        # consistency in mm on the IXI test pairs: each registration's transform against its
        # own inverse, and against the registration run the other way (cycle), per model

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


def steps(config: str, model: str, views: int) -> None:
    import torch

    from unireg.methods import registry
    from unireg.methods.avsm.training import AVSMConfig, AVSMTrainer

    cfg = AVSMConfig.from_file(config, output=tempfile.mkdtemp())
    trainer = AVSMTrainer(cfg)
    trainer.model, _ = registry.load_checkpoint(model)
    counts = list(range(1, 10))
    errors: dict[int, list[float]] = {k: [] for k in [0, *counts]}
    for view in range(views):
        g = torch.Generator().manual_seed(10_000 + view)
        ia, ib = trainer._pair_items(g)
        a, b = trainer._view(ia, g), trainer._view(ib, g, rotation=cfg.fixed_rotation)
        frame = trainer._frame(ia)
        with torch.no_grad():
            chain = trainer.model.affine(a["image"], b["image"], frame, max(counts))
        eye = torch.eye(4)[None]
        for k in errors:
            m = eye if k == 0 else chain[k - 1]
            dist = trainer._guide(m, a["matrix"], b["matrix"], frame)
            errors[k].append(cfg.length_mm * float(dist) ** 0.5)
    for k, values in errors.items():
        print(f"{k} steps: corner distance {np.mean(values):.1f} mm mean, "
              f"{np.median(values):.1f} median ({views} views)")  # fmt: skip
    best = min(counts, key=lambda k: float(np.mean(errors[k])))
    print(f"lowest mean: {best} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("command")
    p.add_argument("--method", default="avsm")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("steps")
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--views", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("cycle")
    p.add_argument("--model", nargs="+", default=[""])
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.what == "command":
        command(args.method, args.threads)
    elif args.what == "steps":
        steps(args.config, args.model, args.views)
    else:
        cycle(args.model)


if __name__ == "__main__":
    main()
