"""``unireg demo``: register two shipped brains and write a report."""

from __future__ import annotations

import argparse
from typing import Any

from unireg.cli import VERBS, add_threads_flag


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``demo`` subcommand's parser."""
    p = sub.add_parser(
        "demo",
        help=VERBS["demo"],
        description=(
            "Registers IXI013 onto IXI012 (2 mm T1 with skull, DLMUSE labels; shipped inside "
            "the package with their CC BY-SA 3.0 attribution) with the best available method, "
            "and writes the register outputs, report.png, report.html and a metrics table "
            "beside no registration and the affine stage."
        ),
    )
    p.add_argument("--output", "-o", default="unireg-demo", help="output folder")
    p.add_argument("--method", default="syn", help="unireg method (default syn)")
    add_threads_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Register two real brains shipped with unireg; write the outputs, a report and a table."""
    from unireg.cli._common import threads

    threads(args)
    from importlib import resources
    from pathlib import Path

    data = resources.files("unireg.demo_data")
    fixed_p = Path(str(data / "IXI012-HH-1211-T1_ds.nii.gz"))
    moving_p = Path(str(data / "IXI013-HH-1212-T1_ds.nii.gz"))
    fixed_l = Path(str(data / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz"))
    moving_l = Path(str(data / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz"))
    from unireg.cli._common import command_line
    from unireg.cli.register import OUTPUTS
    from unireg.io.outputs import OutputFolder

    folder = OutputFolder(args.output, (*OUTPUTS, "metrics.md"), command="unireg demo")
    with folder:
        out = folder.stage
        assert out is not None
        _demo(args, out, data, fixed_p, moving_p, fixed_l, moving_l)
        written = folder.commit({"command": command_line(args)})
    for name in written:
        print(f"wrote {folder.target / name}")
    return 0


def _demo(args: argparse.Namespace, out: Any, data: Any, *paths: Any) -> None:
    from unireg.cli._common import write_json
    from unireg.evaluation import Pair, evaluate, make_method, markdown_table, summarize
    from unireg.io.files import write_atomic
    from unireg.io.image import load_image, load_labels
    from unireg.metrics import json_ready, registration_metrics
    from unireg.report import registration_report

    fixed_p, moving_p, fixed_l, moving_l = paths
    print(f"unireg demo: registering {moving_p.name} onto {fixed_p.name} (IXI, CC BY-SA 3.0; "
          f"see {data / 'ATTRIBUTION.txt'})")  # fmt: skip
    fixed, moving = load_image(fixed_p), load_image(moving_p)
    flab, mlab = load_labels(fixed_l), load_labels(moving_l)
    spec = f"unireg:{args.method}"
    method = make_method(spec)
    result = method.register(fixed, moving, seed=0)
    metrics = registration_metrics(result, fixed_labels=flab, moving_labels=mlab)
    result.save(out, moving_labels=mlab)
    from unireg.io.outputs import file_record

    named = {"fixed": fixed_p, "moving": moving_p, "fixed_labels": fixed_l,
             "moving_labels": moving_l}  # fmt: skip
    inputs = {k: file_record(v) for k, v in named.items()}  # so that unireg view can reread them
    write_json(out / "metrics.json", json_ready({"method": spec, **metrics, "inputs": inputs}))
    title = f"unireg demo: {spec}, IXI013 onto IXI012"
    registration_report(result, fixed, moving, out / "report.png", metrics=metrics, title=title)
    from unireg.io.label_names import read_label_names
    from unireg.viewer.page import build_report, write_report

    page = build_report(
        fixed, moving, result.transform, metrics={"spec": spec, **metrics}, fixed_labels=flab,
        displacement=result.displacement(), title=title,
        label_names=read_label_names(str(data / "MUSE_listROIs.csv")),
    )  # fmt: skip
    write_report(out / "report.html", page)
    print("comparing with no registration and the affine stage alone ...")
    pair = Pair(fixed_p, moving_p, fixed_l, moving_l, "IXI012", "IXI013")
    others = [make_method(s) for s in ("none", "unireg:affine")]
    rows = evaluate([pair], others, [0.0], progress=False)
    from unireg.evaluation import METRIC_COLUMNS

    mine = {k: metrics.get(k, float("nan")) for k in METRIC_COLUMNS}
    mine["peak_memory_mb"] = (result.peak_memory or float("nan")) / 2**20
    table_rows = [*rows, {"method": spec, "angle": 0.0, **mine}]
    table = markdown_table(summarize(table_rows))
    write_atomic(out / "metrics.md", lambda tmp: tmp.write_text(table))
    print(table)
