"""`unireg batch` against one `unireg register` process per pair, on the ordered pairs of the
IXI training subjects, and a killed batch run restarted to completion.

    python bench/batch_benchmark.py [--method sitreg] [--split train] [--no-kill]
    python bench/batch_benchmark.py --device cuda --batch-size 8 --no-single --no-kill  # GPU

1. Per-pair CLI: `unireg register F M -o DIR --method M --fixed-labels .. --moving-labels ..
   --no-hd95`, one process per pair, all pairs: pairs/s.
2. Batch: `unireg batch PAIRS.csv -o OUT --method M --no-hd95` (same pairs, one process):
   pairs/s, and the ratio against 1.
3. Kill and resume: the batch command again into a new folder, killed (SIGKILL) once a third of
   the pairs are done, then run again to the end; every pair is done once (the restart computes
   only the pairs left) and its files are byte-identical to the uninterrupted run's
   (`metrics.json` aside, which holds timings).

Thread settings: unireg's defaults (no OMP_NUM_THREADS: the CPUs left idle). Needs
../shared/data (or $UNIREG_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import csv
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from command_benchmark import test_pairs  # bench/ is on sys.path

COMPARED = ("warped.nii.gz", "warped_labels.nii.gz", "transform.nii.gz",
            "inverse_transform.nii.gz", "affine.mat")  # fmt: skip


def write_pairs(split: str, path: Path) -> int:
    """The ordered pairs of a split's IXI T1 subjects as a pairs CSV; returns their number."""
    pairs = test_pairs(split)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        out.writerows(pairs)
    return len(pairs)


def batch_command(pairs: Path, out: Path, method: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "unireg", "batch", str(pairs), "-o", str(out), "--method",
            method, "--no-hd95", *extra, "--quiet"]  # fmt: skip


def done_folders(out: Path) -> int:
    return sum(1 for p in out.glob("*/manifest.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sitreg")
    parser.add_argument("--split", default="train")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill-and-resume check")
    parser.add_argument("--no-single", action="store_true", help="skip the per-pair CLI runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per network pass")
    args = parser.parse_args()
    extra = ["--device", args.device, "--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n = write_pairs(args.split, tmp / "pairs.csv")
        with open(tmp / "pairs.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        t0 = time.perf_counter()
        for i, r in enumerate([] if args.no_single else rows):
            subprocess.run([sys.executable, "-m", "unireg", "register", r["fixed"], r["moving"],
                            "-o", str(tmp / "single" / str(i)), "--method", args.method,
                            "--fixed-labels", r["fixed_labels"], "--moving-labels",
                            r["moving_labels"], "--no-hd95", "--device", args.device, "--quiet"],
                           check=True, capture_output=True)  # fmt: skip
        single = time.perf_counter() - t0
        if not args.no_single:
            print(f"{n} pairs, per-pair CLI: {single:.1f} s, {n / single:.3f} pairs/s", flush=True)
        t0 = time.perf_counter()
        whole = batch_command(tmp / "pairs.csv", tmp / "whole", args.method, extra)
        subprocess.run(whole, check=True, capture_output=True)
        batch = time.perf_counter() - t0
        ratio = "" if args.no_single else f", {single / batch:.2f}x the per-pair CLI"
        print(f"{n} pairs, unireg batch ({args.device}, batch size {args.batch_size}): "
              f"{batch:.1f} s, {n / batch:.3f} pairs/s{ratio} (the whole command, start-up "
              "and model loading included)", flush=True)  # fmt: skip
        if args.no_kill:
            return
        cut = tmp / "cut"
        proc = subprocess.Popen(batch_command(tmp / "pairs.csv", cut, args.method, extra))
        while done_folders(cut) < n // 3 and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = done_folders(cut)
        finish = subprocess.run(batch_command(tmp / "pairs.csv", cut, args.method, extra)[:-1],
                                check=True, capture_output=True, text=True)  # fmt: skip
        last = finish.stdout.strip().splitlines()[-1]
        print(f"killed with {before} pairs done; the restart: {last}")
        with open(cut / "summary.csv", newline="") as fh:
            statuses = [r["status"] for r in csv.DictReader(fh)]
        folders = sorted(p.name for p in (tmp / "whole").iterdir() if p.is_dir())
        same = sum(
            all((cut / f / name).read_bytes() == (tmp / "whole" / f / name).read_bytes()
                for name in COMPARED if (tmp / "whole" / f / name).exists())
            for f in folders
        )  # fmt: skip
        leftovers = [p.name for p in cut.iterdir() if p.name.startswith(".")]
        print(f"after the restart: {statuses.count('done')} of {n} done, {same} of "
              f"{len(folders)} pairs byte-identical to the uninterrupted run "
              f"({', '.join(COMPARED)}); leftovers {leftovers or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
