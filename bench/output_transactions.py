"""Output folders under kills and concurrent runs, end to end with the real command.

    python bench/output_transactions.py [--kills 50] [--pairs 20] [--seed 0]

1. **Kills**: ``unireg register`` (the shipped demo pair; ``--method syn --report``, the run
   with the most files) is killed with SIGKILL at a random moment of its run, half of the
   trials into a folder that already holds an earlier ``--method affine`` result. After each,
   the folder must be absent (a fresh trial killed before publishing), the earlier result
   unchanged, or a complete new result: its manifest matches its files, and its
   ``transform.nii.gz`` reproduces its ``warped.nii.gz`` through ``unireg apply`` and through
   ANTsPy's ``apply_transforms`` (when installed).
2. **Concurrent runs**: two ``unireg register`` runs (affine and syn) start together into one
   folder (half with an earlier result), ``--pairs`` times. The folder must never mix them.

Prints a table of outcomes; exits 1 if any folder was inconsistent.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from unireg.cli import main as unireg_main
from unireg.cli.register import OUTPUTS
from unireg.io.image import load_image
from unireg.io.outputs import OutputFolder, manifest_problems

print = functools.partial(print, flush=True)  # progress lines appear while it runs
DATA = Path(str(resources.files("unireg.demo_data")))
FIXED = DATA / "IXI012-HH-1211-T1_ds.nii.gz"
MOVING = DATA / "IXI013-HH-1212-T1_ds.nii.gz"
LABELS = ["--fixed-labels", str(DATA / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz"),
          "--moving-labels", str(DATA / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz")]  # fmt: skip


def command(out: Path, method: str) -> list[str]:
    extra = ["--report"] if method == "syn" else []
    return [sys.executable, "-m", "unireg", "register", str(FIXED), str(MOVING), "-o", str(out),
            "--method", method, "-q", *LABELS, *extra]  # fmt: skip


def reproduces(folder: Path, scratch: Path) -> tuple[float, float]:
    """(max |unireg apply - warped| / range, ANTs correlation with warped inside the head)."""
    warped = load_image(folder / "warped.nii.gz").data[0].numpy()
    again = scratch / "again.nii.gz"
    code = unireg_main(["apply", str(folder / "transform.nii.gz"), str(MOVING), "-r", str(FIXED),
                        "-o", str(again), "-q"])  # fmt: skip
    assert code == 0
    ours = load_image(again).data[0].numpy()
    rel = float(np.abs(ours - warped).max() / (warped.max() - warped.min()))
    try:
        import ants
    except ImportError:
        return rel, float("nan")
    fixed_a, moving_a = ants.image_read(str(FIXED)), ants.image_read(str(MOVING))
    by_ants = ants.apply_transforms(fixed_a, moving_a, [str(folder / "transform.nii.gz")]).numpy()
    inside = warped > 0.05 * warped.max()
    return rel, float(np.corrcoef(warped[inside], by_ants[inside])[0, 1])


def state(folder: Path, earlier: dict | None, scratch: Path) -> tuple[str, str]:
    """(outcome, problem or '') of a folder after a trial."""
    if not folder.exists():
        return ("absent", "" if earlier is None else "the earlier result vanished")
    problems = manifest_problems(folder)
    if problems:
        return ("MIXED", "; ".join(problems))
    manifest = json.loads((folder / "manifest.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    if metrics["method"] != manifest["method"]:
        return ("MIXED", "metrics.json from another run than the manifest")
    rel, corr = reproduces(folder, scratch)
    WORST["rel"] = max(WORST["rel"], rel)
    WORST["corr"] = min(WORST["corr"], corr)
    if rel > 1e-3 or not (np.isnan(corr) or corr > 0.999):
        return ("MIXED", f"transform does not reproduce warped (rel {rel:.2e}, ANTs r {corr:.5f})")
    return ("earlier" if manifest == earlier else f"new ({manifest['method']})", "")


def staged_files(parent: Path) -> int:
    """Files in the running trial's staging folder; -1 when there is none (not yet opened, or
    already published)."""
    for q in parent.iterdir():
        if ".unireg-stage-" in q.name:
            try:
                return len(list(q.iterdir()))
            except FileNotFoundError:  # published (or swapped) at this instant
                return -1
    return -1


WORST = {"rel": 0.0, "corr": 1.0}  # over every folder checked


def leftovers(parent: Path) -> int:
    return sum(1 for p in parent.iterdir() if ".unireg-" in p.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="unireg-transactions-"))
    scratch = work / "scratch"
    scratch.mkdir()
    earlier = work / "earlier"
    subprocess.run(command(earlier, "affine"), check=True)
    earlier_manifest = json.loads((earlier / "manifest.json").read_text())
    t0 = time.perf_counter()
    subprocess.run(command(work / "timing", "syn"), check=True)
    full = time.perf_counter() - t0
    print(f"a whole syn --report run takes {full:.1f} s; kills at uniform moments in "
          f"[0.3, 1.2] x that")  # fmt: skip
    outcomes: dict[str, int] = {}
    bad = []
    trials = work / "kills"
    trials.mkdir()
    for i in range(args.kills):
        folder = trials / f"k{i:02d}"
        over = i % 2 == 1
        if over:
            shutil.copytree(earlier, folder)
        proc = subprocess.Popen(command(folder, "syn"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.3, 1.2) * full)
        staged = staged_files(trials)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        stale = leftovers(trials)
        with OutputFolder(folder, OUTPUTS):  # what the next run does first: clean up, put back
            pass
        outcome, problem = state(folder, earlier_manifest if over else None, scratch)
        if code == 0:
            phase = "finished before the kill"
        elif staged >= 0:
            phase = "killed while staging"
        elif outcome.startswith("new"):
            phase = "killed after publishing"
        else:
            phase = "killed before the folder was opened"
        key = f"{'over earlier' if over else 'fresh'}, {phase}: {outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if problem:
            bad.append(f"kill {i}: {problem}")
        print(f"kill {i:2d}: {key}; {max(staged, 0)} files staged; stale entries {stale}")
    after = leftovers(trials)
    print(f"stale staging folders or locks left after the clean-ups: {after}")
    pairs = work / "pairs"
    pairs.mkdir()
    concurrent: dict[str, int] = {}
    for i in range(args.pairs):
        folder = pairs / f"p{i:02d}"
        over = i % 2 == 1
        if over:
            shutil.copytree(earlier, folder)
        procs = [subprocess.Popen(command(folder, m), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for m in ("affine", "syn")]  # fmt: skip
        codes = [p.wait() for p in procs]
        errors = [p.stderr.read() for p in procs]
        refused = sum("OutputInUseError" in e for e in errors)
        outcome, problem = state(folder, earlier_manifest if over else None, scratch)
        key = f"exit codes {sorted(codes)}, {refused} refused as in use: {outcome.split(' ')[0]}"
        concurrent[key] = concurrent.get(key, 0) + 1
        if problem or 0 not in codes:
            bad.append(f"pair {i}: {problem or 'neither run succeeded'}")
        print(f"pair {i:2d}: codes {codes}; {outcome}")
    print("\n| kills | trials |\n|---|---|")
    for key, n in sorted(outcomes.items()):
        print(f"| {key} | {n} |")
    print("\n| two concurrent runs | trials |\n|---|---|")
    for key, n in sorted(concurrent.items()):
        print(f"| {key} | {n} |")
    print(f"\nworst over the published folders: unireg apply max |diff| / range "
          f"{WORST['rel']:.2e}; ANTs correlation {WORST['corr']:.6f}")  # fmt: skip
    print(f"inconsistent folders: {len(bad)}")
    for line in bad:
        print("  " + line)
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad or after else 0)


if __name__ == "__main__":
    main()
