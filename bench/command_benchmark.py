"""The whole `unireg register` command as a user runs it, against ANTsPy SyN in one process,
on the IXI test pairs, in one run; then the same commands again beside a busy process.

    python bench/command_benchmark.py [--methods syn sitreg] [--pairs 6] [--no-busy]

For each ordered pair of IXI test subjects: the wall time of `unireg register F M -o DIR
--method M` (a fresh process: imports, reading, registration, metrics, writing every file), and
of a Python script doing the same with ANTsPy (import, read, `ants.registration(...,
"SyN")`, write the warped image and copy the transforms). Then, with one other process keeping
a CPU busy (a Python busy loop), the unireg commands again: the slowdown against the idle run.
Thread settings are the defaults a user gets (no OMP_NUM_THREADS: unireg picks its threads
from the CPUs left idle; ITK uses all CPUs); they are printed.

Targets: `syn` >= 3x and `sitreg` >= 8x faster than ANTsPy SyN (median over pairs); busy
<= 1.5x idle. Needs ../shared/data (or $UNIREG_SHARED_DATA) and antspyx.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))

ANTS_SCRIPT = """
import shutil, sys
from pathlib import Path
import ants
fixed, moving, out = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2]), sys.argv[3]
reg = ants.registration(fixed, moving, type_of_transform="SyN")
ants.image_write(reg["warpedmovout"], out + "/warped.nii.gz")
for i, path in enumerate(reg["fwdtransforms"] + reg["invtransforms"]):
    shutil.copy(path, out + f"/t{i}" + "".join(Path(path).suffixes))
"""


def test_pairs(split: str = "test") -> list[tuple[Path, Path, Path, Path]]:
    """Ordered pairs of a split's IXI T1 subjects: (fixed, moving, fixed labels, moving
    labels)."""
    with open(DATA / "manifest.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] == "ixi" and r["split"] == split
                and r["modality"] == "T1"]  # fmt: skip
    subjects = [(DATA / r["image"], DATA / r["labels"]) for r in rows]
    return [(f[0], m[0], f[1], m[1]) for f, m in itertools.permutations(subjects, 2)]


def wall(argv: list[str]) -> float:
    """Wall time (s) of running ``argv`` to completion."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """One other process keeping a CPU busy for the duration."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield
    finally:
        proc.kill()
        proc.wait()


def unireg_command(f: Path, m: Path, out: str, method: str) -> list[str]:
    return [sys.executable, "-m", "unireg", "register", str(f), str(m), "-o", out,
            "--method", method, "--quiet"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["syn", "sitreg"])
    parser.add_argument("--pairs", type=int, default=6, help="first N ordered test pairs")
    parser.add_argument("--no-busy", action="store_true", help="skip the busy-CPU rerun")
    args = parser.parse_args()
    if "OMP_NUM_THREADS" in os.environ:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set", flush=True)
    pairs = test_pairs()[: args.pairs]
    idle: dict[str, list[float]] = {m: [] for m in [*args.methods, "ANTsPy SyN"]}
    busy: dict[str, list[float]] = {m: [] for m in args.methods}
    threads: dict[str, set[int]] = {m: set() for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (f, m, _, _) in enumerate(pairs):
            for method in args.methods:
                out = f"{tmp}/{method}{i}"
                idle[method].append(wall(unireg_command(f, m, out, method)))
                threads[method].add(json.loads(Path(out, "metrics.json").read_text())["threads"])
            Path(f"{tmp}/ants{i}").mkdir()
            peer = wall([sys.executable, "-c", ANTS_SCRIPT, str(f), str(m), f"{tmp}/ants{i}"])
            idle["ANTsPy SyN"].append(peer)
            times = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in idle.items())
            print(f"pair {i} idle: {times}", flush=True)
        if not args.no_busy:
            with busy_process():
                for i, (f, m, _, _) in enumerate(pairs):
                    for method in args.methods:
                        out = f"{tmp}/busy-{method}{i}"
                        busy[method].append(wall(unireg_command(f, m, out, method)))
                        used = json.loads(Path(out, "metrics.json").read_text())["threads"]
                        threads[method].add(used)
                    times = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in busy.items())
                    print(f"pair {i} with a busy process: {times}", flush=True)
    peer = statistics.median(idle["ANTsPy SyN"])
    print(f"\n{len(pairs)} IXI test pairs, {os.cpu_count()} CPUs; median whole command:")
    print(f"  ANTsPy SyN (in one process): {peer:.2f} s")
    for method in args.methods:
        t = statistics.median(idle[method])
        line = f"  unireg {method}: {t:.2f} s, {peer / t:.1f}x faster than ANTsPy SyN"
        if busy[method]:
            b = statistics.median(busy[method])
            line += f"; beside a busy process {b:.2f} s ({b / t:.2f}x idle)"
        line += f"; threads used {sorted(threads[method])}"
        print(line)


if __name__ == "__main__":
    main()
