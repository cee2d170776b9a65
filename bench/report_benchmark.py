"""The HTML report's cost: page size, the time ``unireg view`` takes to write it (the whole
command), and the time headless Chromium takes to first draw it, for a 2 mm and a 1 mm pair.

    python bench/report_benchmark.py [--loads 3] [--screenshot docs/img/report-demo.png]

- 2 mm: the IXI demo pair shipped with unireg (IXI013 onto IXI012, 120x120x90, DLMUSE labels),
  registered by ``syn``.
- 1 mm: Colin27 (``ch2``, 181x217x181) onto MNI152 (182x218x182) from ``../shared/data/antspy``,
  registered by ``syn``; the page shows the MNI atlas (``mnia``, 116 regions) as the fixed
  labels.

Each page is written at the default report resolution (2 mm) and at the images' own (1 mm for
the 1 mm pair). Time to first draw is ``window.unireg.firstDrawMs``: from navigation start to
the frame after NiiVue drew all three views, in Debian's Chromium with software WebGL
(SwiftShader: no GPU), median of ``--loads`` fresh loads; a browser with a GPU draws faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from command_benchmark import DATA as SHARED  # bench/ is on sys.path


def unireg(*args: str) -> float:
    """Run a unireg command; its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unireg", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def first_draw(page_path: Path, loads: int, screenshot: Path | None = None) -> float:
    """Median time to first draw (ms) over fresh loads of the page."""
    from unireg.viewer.browser import headless_chromium, open_report

    times = []
    with headless_chromium() as browser:
        for i in range(loads):
            page, log = open_report(browser, page_path, timeout_ms=300_000)
            errors = page.evaluate("window.unireg.errors") + [
                m for m in log["console"] if m[0] in ("error", "pageerror")
            ]
            if errors:
                raise SystemExit(f"{page_path}: {errors}")
            times.append(page.evaluate("window.unireg.firstDrawMs"))
            if screenshot is not None and i == 0:
                page.screenshot(path=str(screenshot), full_page=True)
            page.close()
    return float(statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save the 2 mm demo page's screenshot here")  # fmt: skip
    args = parser.parse_args()
    demo = resources.files("unireg.demo_data")
    pairs = {
        "2 mm (IXI demo)": (
            demo / "IXI012-HH-1211-T1_ds.nii.gz", demo / "IXI013-HH-1212-T1_ds.nii.gz",
            ["--fixed-labels", str(demo / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz"),
             "--moving-labels", str(demo / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz")],
            ["--label-names", str(demo / "MUSE_listROIs.csv")], [2.0],
        ),
        "1 mm (Colin27 onto MNI152)": (
            SHARED / "antspy" / "mni.nii.gz", SHARED / "antspy" / "ch2.nii.gz", [],
            ["--fixed-labels", str(SHARED / "antspy" / "mnia.nii.gz")], [2.0, 1.0],
        ),
    }  # fmt: skip
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| pair | report grid | page MB | unireg view s | first draw s (headless, software GL) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fixed, moving, reg_extra, view_extra, resolutions) in pairs.items():
            if not Path(str(fixed)).exists():
                print(f"| {name} | skipped: {fixed} not found | | | |")
                continue
            out = Path(tmp) / name.split()[0].replace(" ", "")
            unireg("register", str(fixed), str(moving), "-o", str(out), "--method", "syn", "-q",
                   "--no-hd95", *reg_extra)  # fmt: skip
            for res in resolutions:
                page = Path(tmp) / f"{out.name}-{res:g}.html"
                seconds = unireg("view", str(out), "-o", str(page), "-q",
                                 "--report-resolution", str(res), *view_extra)  # fmt: skip
                shot = args.screenshot if (args.screenshot and name.startswith("2 mm")) else None
                draw = first_draw(page, args.loads, shot)
                print(f"| {name} | {res:g} mm | {page.stat().st_size / 1e6:.1f} | "
                      f"{seconds:.1f} | {draw / 1000:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
