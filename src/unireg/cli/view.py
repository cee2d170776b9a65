"""``unireg view``: the interactive HTML report (NiiVue) of a ``unireg register`` output
folder."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS, add_orientation_flag, add_report_options, add_threads_flag


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``view`` subcommand's parser."""
    p = sub.add_parser(
        "view",
        help=VERBS["view"],
        description=(
            "Write OUTDIR/report.html: one self-contained page (NiiVue inlined, no network "
            "request) with the fixed, moving and warped images in linked orthogonal views, a "
            "fade slider and checkerboard, the fixed label outlines with per-label Dice (worst "
            "first), the Jacobian determinant with folded voxels, the deformation grid, "
            "KeyMorph's keypoints, the metrics and the method's settings. The inputs are read "
            "from the paths metrics.json records unless given."
        ),
    )
    p.add_argument("outdir", metavar="OUTDIR", help="a unireg register output folder")
    p.add_argument("--fixed", default=None, help="the fixed image (default: as recorded)")
    p.add_argument("--moving", default=None, help="the moving image (default: as recorded)")
    p.add_argument("--fixed-labels", default=None,
                   help="the fixed label map (default: as recorded, if any)")  # fmt: skip
    p.add_argument("--output", "-o", default=None,
                   help="write the page here instead of OUTDIR/report.html")  # fmt: skip
    add_report_options(p)
    add_orientation_flag(p)
    add_threads_flag(p)
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Build the report page of OUTDIR and write it."""
    import sys
    from pathlib import Path

    from unireg.cli._common import command_line, threads
    from unireg.errors import UniregError

    threads(args)
    if args.report_resolution <= 0:
        raise UniregError(f"--report-resolution must be > 0 mm, got {args.report_resolution}")
    from unireg.cli._common import label_names
    from unireg.viewer.page import folder_report, write_report

    names = label_names(args)
    page, warnings = folder_report(
        args.outdir, fixed=args.fixed, moving=args.moving, fixed_labels=args.fixed_labels,
        resolution=args.report_resolution, assume_orientation=args.assume_orientation,
        label_names=names,
    )  # fmt: skip
    for line in warnings:
        print(f"unireg view: warning: {line}", file=sys.stderr)
    if args.output is not None:
        path = write_report(args.output, page)
    else:
        from unireg.cli.register import OUTPUTS
        from unireg.io.outputs import add_files

        written = add_files(
            args.outdir, OUTPUTS, {"report.html": lambda p: write_report(p, page)},
            command="unireg view", provenance={"report": {"command": command_line(args)}},
        )  # fmt: skip
        path = written["report.html"]
    if not args.quiet:
        print(f"wrote {Path(path)} ({Path(path).stat().st_size / 1e6:.1f} MB)")
    return 0
