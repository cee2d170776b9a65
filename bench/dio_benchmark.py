"""DIO numbers beside `unireg evaluate` (accuracy against peers and under domain shift is that
command with `dio` / `dio:diffeo` specs, see docs/methods/dio.md):

    python bench/dio_benchmark.py iterations [--model M] [--split train] [--max-pairs 10]
            [--settings I4,I2,I1 ...]
        # the solver's iteration caps on the first N ordered pairs of a split's IXI subjects:
        # Dice, seconds (affine stage, network, solver) per setting; the rule that picks the
        # default runs on the training pairs (the fastest setting within 0.005 Dice of the
        # best)
    python bench/dio_benchmark.py tolerance [--model M] [--split train] [--max-pairs 10]
        # the same for the share of feature variance the solver may leave out (principal
        # components per level); the rule: the fastest value within 0.003 Dice of the best
    python bench/dio_benchmark.py prompt [--model M] [--label 48] [--weight W ...]
        # a label prompt on one structure (default DLMUSE 48, left hippocampus, held out of
        # the shipped model's training loss) on the IXI test pairs: that structure's Dice and
        # the mean Dice of every other structure, without and with the prompt
    python bench/dio_benchmark.py device [--model M] [--device cuda]
        # network and solver time per test pair on a device, warm (second pass)
    python bench/dio_benchmark.py layout [--model M ...] [--repeats 6]
        # the network trunk of the first IXI training pair's two images in float32, default
        # layout against channels-last (FeatureNet.channels_last), interleaved repeats in one
        # process: the measurement behind unireg.methods.pipeline.channels_last_pays
    python bench/dio_benchmark.py invariance [--model M ...]
        # how alike a model's features of two contrasts of one subject are: the training
        # loss's invariance term between each IXI training subject's T1 and an image
        # synthesised from its label map (seeded), on the training grid, inside the brain

Needs ../shared/data (or $UNIREG_SHARED_DATA). Thread count: torch's default unless
--threads; the numbers in the docs were taken with --threads 2 on a quiet machine. Freed
memory is kept for reuse as the `unireg` command keeps it (`unireg.cpu.retain_freed_memory`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))
SETTINGS = ("200,100,20", "100,50,10", "200,100,0", "100,50,0", "50,25,0")
TOLERANCES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


def pairs(split: str) -> list[tuple]:
    """Every ordered pair of a split's IXI subjects: (fixed, moving, fixed labels, moving
    labels), loaded."""
    import csv

    from unireg.io import load_image, load_labels

    with open(DATA / "manifest.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] == "ixi" and r["split"] == split]
    subjects = [(load_image(DATA / r["image"]), load_labels(DATA / r["labels"])) for r in rows]
    return [(f[0], m[0], f[1], m[1]) for f, m in itertools.permutations(subjects, 2)]


def mean_dice(fixed_labels, warped, exclude=()) -> float:  # noqa: ANN001
    from unireg.metrics import dice

    values = [v for k, v in dice(fixed_labels, warped).items() if k not in exclude]
    return float(np.nanmean(values))


def sweep(
    model: str | None, split: str, max_pairs: int, name: str, settings: tuple, margin: float
) -> None:
    """Dice and seconds per pair of each value of the option ``name`` on the first
    ``max_pairs`` ordered pairs of ``split``; the rule's pick: the fastest value within
    ``margin`` Dice of the best."""
    from unireg.methods import create, options_for

    data = pairs(split)[:max_pairs]
    rows = []
    for setting in settings:
        method = create("dio", options_for("dio", {name: setting, "model": model}))
        dices, seconds = [], {"affine": 0.0, "network": 0.0, "solver": 0.0}
        channels: dict[float, int] = {}
        for fixed, moving, fl, ml in data:
            res = method.register(fixed, moving)
            dices.append(mean_dice(fl, res.warp(ml)))
            channels = res.extras.channels
            for k in seconds:
                seconds[k] += res.extras.stage_seconds[k] / len(data)
        rows.append((setting, float(np.mean(dices)), seconds))
        shown = ", ".join(f"1/{f:g}: {c}" for f, c in channels.items())
        print(f"{name} {setting}: Dice {np.mean(dices):.4f} +- {np.std(dices):.4f}; seconds "
              f"per pair: affine {seconds['affine']:.2f}, network {seconds['network']:.2f}, "
              f"solver {seconds['solver']:.2f}; channels (last pair) {shown}",
              flush=True)  # fmt: skip
    best = max(d for _, d, _ in rows)
    chosen = min((r for r in rows if r[1] >= best - margin), key=lambda r: sum(r[2].values()))
    print(f"rule (fastest within {margin} of the best Dice on {split}): {chosen[0]}")


def prompt(model: str | None, label: int, weights: list[float]) -> None:
    from unireg.methods import Prompts, create, options_for
    from unireg.metrics import dice

    method = create("dio", options_for("dio", {"model": model}))
    print(f"label {label} prompted; 'others' = mean Dice of every other label")
    for weight in [0.0, *weights]:
        target, others = [], []
        for fixed, moving, fl, ml in pairs("test"):
            prompts = None
            if weight > 0:
                only = [x.with_data(torch.where(x.data == label, x.data, 0)) for x in (fl, ml)]
                prompts = Prompts(only[0], only[1], label_weight=weight)
            res = method.register(fixed, moving, prompts=prompts)
            warped = res.warp(ml)
            target.append(dice(fl, warped, [label])[label])
            others.append(mean_dice(fl, warped, exclude=(label,)))
        print(f"weight {weight:g}: label {label} Dice {np.mean(target):.4f} +- "
              f"{np.std(target):.4f}; others {np.mean(others):.4f}", flush=True)  # fmt: skip


def device(model: str | None, name: str) -> None:
    from unireg.methods import create, options_for

    method = create("dio", options_for("dio", {"model": model}), device=name)
    data = pairs("test")
    for fixed, moving, _, _ in data[:1]:  # warm-up
        method.register(fixed, moving)
    totals = {"affine": [], "network": [], "solver": []}
    for fixed, moving, _, _ in data:
        if name.startswith("cuda"):
            torch.cuda.synchronize()
        res = method.register(fixed, moving)
        for k in totals:
            totals[k].append(res.extras.stage_seconds[k])
    print(f"{name}: " + ", ".join(f"{k} {np.mean(v):.3f} s" for k, v in totals.items())
          + f" per pair ({len(data)} pairs, warm)")  # fmt: skip


def layout(models: list[str | None], repeats: int) -> None:
    from unireg.methods.dio.inference import _trunk, feature_grid, network_input
    from unireg.methods.registry import load_model

    fixed, moving, _, _ = pairs("train")[0]
    for name in models:
        net, checkpoint = load_model("dio", name)
        spacing = float(checkpoint.preprocessing.get("spacing_mm", 2.0))
        images = [network_input(i, feature_grid(i, spacing)) for i in (fixed, moving)]
        nets = {"default": net.merged(), "channels-last": net.merged().channels_last()}
        times: dict[str, list[float]] = {k: [] for k in nets}
        for r in range(repeats + 1):  # the first round warms up
            for k, n in nets.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    for x in images:
                        _trunk(n, x, (4.0, 2.0, 1.0), torch.float32)
                if r:
                    times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"{name or 'default'}: trunk of a {tuple(fixed.shape)} pair, float32, median of "
              f"{repeats}: default {med['default']:.3f} s, channels-last "
              f"{med['channels-last']:.3f} s ({med['default'] / med['channels-last']:.2f}x; "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()})")  # fmt: skip


def invariance(models: list[str | None]) -> None:
    import tempfile

    from unireg.methods.dio.training import DIOConfig, DIOTrainer, level_invariance
    from unireg.methods.registry import load_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DIOConfig(output=tmp, manifest=str(DATA / "manifest.csv"), datasets=["ixi"],
                        cache_dir=str(Path(tmp) / "cache"), synthesis_probability=0.0)  # fmt: skip
        data = DIOTrainer(cfg)
    for name in models:
        net = load_model("dio", name)[0].eval()
        values = []
        for i, item in enumerate(data.volumes.items):
            g = torch.Generator().manual_seed(100 + i)
            synthesised = data.synth(item["labels"][None], generator=g)["image"]
            with torch.no_grad():
                feats = net(torch.cat([item["image"][None], synthesised]))
                first = {f: x[:1] for f, x in feats.items()}
                second = {f: x[1:] for f, x in feats.items()}
                values.append(float(level_invariance(first, second, item["brain"][None])))
        spread = f"{np.mean(values):.3f} +- {np.std(values):.3f}"
        print(f"{name or 'default'}: invariance term, T1 against synthesised, {spread} over "
              f"{len(values)} subjects")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["iterations", "tolerance", "prompt", "device", "layout",
                                    "invariance"])  # fmt: skip
    p.add_argument("--model", nargs="+", default=[None], help="layout, invariance: several")
    p.add_argument("--repeats", type=int, default=6, help="layout: timed rounds")
    p.add_argument("--split", default="train")
    p.add_argument("--max-pairs", type=int, default=10, help="iterations: the first N pairs")
    p.add_argument("--settings", nargs="+", default=None, help="iterations: the settings swept")
    p.add_argument("--label", type=int, default=48)
    p.add_argument("--weight", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    from unireg.cpu import retain_freed_memory

    retain_freed_memory()  # freed blocks kept for reuse, as the command line keeps them
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (DATA / "manifest.csv").is_file():
        raise SystemExit(f"{DATA}: no shared data (set UNIREG_SHARED_DATA)")
    t0 = time.perf_counter()
    if args.what == "iterations":
        settings = tuple(args.settings) if args.settings else SETTINGS
        sweep(args.model[0], args.split, args.max_pairs, "iterations", settings, 0.005)
    elif args.what == "tolerance":
        sweep(args.model[0], args.split, args.max_pairs, "feature_tolerance", TOLERANCES, 0.003)
    elif args.what == "prompt":
        prompt(args.model[0], args.label, args.weight)
    elif args.what == "device":
        device(args.model[0], args.device)
    elif args.what == "layout":
        layout(args.model, args.repeats)
    else:
        invariance(args.model)
    print(f"({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
