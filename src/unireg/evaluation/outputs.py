"""Files of an evaluation run: per-pair CSV, summary CSV and Markdown, and PNG plots."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unireg.evaluation.harness import markdown_table, summarize
from unireg.io.files import write_atomic


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                             for k, v in r.items()})  # fmt: skip
    return buf.getvalue()


def _label(row: dict[str, Any]) -> str:
    """A row's or summary entry's legend: the method, and the shift when there is one."""
    shift = row.get("shift", "none")
    return row["method"] if shift == "none" else f"{row['method']} [{shift}]"


def plot_dice_vs_angle(summary: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean Dice (± std) against the misalignment angle, one line per method (and shift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for line in dict.fromkeys(_label(s) for s in summary):
        pts = sorted((s["angle"], s["dice_mean_mean"], s["dice_mean_std"])
                     for s in summary if _label(s) == line)  # fmt: skip
        a, m, sd = (np.array(v, float) for v in zip(*pts, strict=True))
        ax.errorbar(a, m, yerr=sd, marker="o", capsize=3, label=line)
    ax.set_xlabel("rotation of the moving image (degrees)")
    ax.set_ylabel("mean Dice over labels")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_boxes(rows: Sequence[dict[str, Any]], path: Path, key: str = "dice_mean") -> None:
    """Box plot of one metric per method (all pairs and angles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(_label(r) for r in rows))
    data = [[float(r[key]) for r in rows if _label(r) == m and np.isfinite(float(r[key]))]
            for m in methods]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(methods) + 2), 4.2), dpi=120)
    ax.boxplot(data, tick_labels=methods)
    ax.set_ylabel(key.replace("_", " "))
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# the files an evaluation run writes into its folder
EVALUATION_OUTPUTS = ("pairs.csv", "summary.csv", "summary.md", "dice_vs_angle.png",
                      "dice_boxplot.png", "report.html", "case-*.html")  # fmt: skip


def write_outputs(rows: Sequence[dict[str, Any]], outdir: str | Path) -> dict[str, Path]:
    """Write ``pairs.csv``, ``summary.csv``, ``summary.md``, ``dice_vs_angle.png`` and
    ``dice_boxplot.png`` into ``outdir``; returns their paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {
        "pairs": out / "pairs.csv",
        "summary_csv": out / "summary.csv",
        "summary_md": out / "summary.md",
        "dice_vs_angle": out / "dice_vs_angle.png",
        "boxplot": out / "dice_boxplot.png",
    }
    write_atomic(paths["pairs"], lambda t: t.write_text(_csv_text(rows)))
    write_atomic(paths["summary_csv"], lambda t: t.write_text(_csv_text(summary)))
    note = "Label maps warped with nearest neighbour; Dice and HD95 on the fixed grid.\n\n"
    write_atomic(paths["summary_md"], lambda t: t.write_text(note + markdown_table(summary)))
    plot_dice_vs_angle(summary, paths["dice_vs_angle"])
    plot_boxes(rows, paths["boxplot"])
    return paths
