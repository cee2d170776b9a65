"""Start-up time of the command line: ``unireg --help`` and ``unireg register --help`` against
``python -c pass`` in the same run (median of N wall times each, as a user runs them).

    python bench/cli_benchmark.py [--repeats 10]

Target: within 5x of ``python -c pass``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall(argv: list[str], repeats: int) -> float:
    """Median wall time (s) of running ``argv`` ``repeats`` times (after one warm-up run)."""
    subprocess.run(argv, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    unireg = shutil.which("unireg") or f"{sys.executable} -m unireg"
    base = wall([sys.executable, "-c", "pass"], args.repeats)
    print(f"python -c pass: {base * 1000:.0f} ms (median of {args.repeats})")
    for extra in ([], ["register"]):
        argv = [*unireg.split(), *extra, "--help"]
        t = wall(argv, args.repeats)
        name = " ".join(["unireg", *extra, "--help"])
        print(f"{name}: {t * 1000:.0f} ms, {t / base:.1f}x python -c pass (target <= 5x)")


if __name__ == "__main__":
    main()
