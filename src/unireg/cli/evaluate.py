"""``unireg evaluate``: methods side by side on pairs under misalignment."""

from __future__ import annotations

import argparse
from typing import Any

from unireg.cli import VERBS, add_report_options, add_threads_flag


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand's parser."""
    p = sub.add_parser(
        "evaluate",
        help=VERBS["evaluate"],
        description=(
            "Run every method on the same pairs in the same run. Pairs come from a CSV "
            "(fixed,moving[,fixed_labels,moving_labels]) or from a manifest (all ordered pairs "
            "of a dataset's split). Each angle rotates the moving image and its labels about "
            "its centre about 1-3 random axes (seeded; --axes fixes the count), optionally "
            "with translation and scaling (KeyMorph's robustness protocol). Methods: none, "
            "unireg:METHOD[:key=value...] (e.g. unireg:syn:preset=accurate), "
            "ants:TYPE[:init=search] (needs pip install 'unireg[peers]'). Writes pairs.csv, "
            "summary.csv, summary.md, dice_vs_angle.png and dice_boxplot.png (and report.html "
            "with --report html) into OUTDIR."
        ),
    )
    p.add_argument("--pairs", default=None, help="CSV of pairs")
    p.add_argument("--manifest", default=None, help="manifest CSV (unireg.data format)")
    p.add_argument("--dataset", default=None, help="dataset of the manifest")
    p.add_argument("--split", default="test", help="split of the manifest (default test)")
    p.add_argument("--modality", default=None, help="modality of the manifest")
    p.add_argument("--max-pairs", type=int, default=None, help="only the first N pairs")
    p.add_argument("--methods", nargs="+", default=["none", "unireg:affine", "unireg:syn"])
    p.add_argument("--angles", nargs="+", type=float, default=[0.0], help="degrees")
    p.add_argument("--axes", type=int, choices=[1, 2, 3], default=None,
                   help="rotation axes per case (default: 1 to 3 at random)")  # fmt: skip
    p.add_argument("--translation", type=float, default=0.0, help="max translation, mm")
    p.add_argument("--scale", type=float, default=0.0, help="max relative scaling")
    p.add_argument(
        "--shift",
        nargs="+",
        default=["none"],
        metavar="NAME",
        help="domain shifts, each run at every angle (chain with +, e.g. skullstrip+synth): "
        "none, skullstrip, synth, aniso, iso1, iso3, bias, rescale, selfwarp (the moving subject "
        "against a copy of itself under a known map: end-point error in mm); default none",
    )
    p.add_argument(
        "--device", default="cpu",
        help="device of unireg's methods (cpu, cuda, cuda:1); the peers run on the CPU. On a "
        "GPU each method first registers the first pair once, untimed, so the times per pair "
        "are warm",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument(
        "--report",
        choices=["html"],
        default=None,
        help="also write report.html (the summary, the plots and every registration, each "
        "linked to its own interactive page case-NNNN.html, see unireg view; a few MB per "
        "registration)",
    )
    add_report_options(p)
    p.add_argument("--quiet", "-q", action="store_true")
    add_threads_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run methods side by side on pairs under misalignments; write tables and plots."""
    from unireg.cli._common import device, threads

    threads(args)
    dev = str(device(args.device))
    import sys
    import time

    from unireg.cli._common import command_line
    from unireg.errors import UniregError
    from unireg.evaluation import (
        MissingPeerError,
        evaluate,
        make_method,
        markdown_table,
        pairs_from_csv,
        pairs_from_manifest,
        summarize,
        write_outputs,
    )
    from unireg.evaluation.outputs import EVALUATION_OUTPUTS
    from unireg.evaluation.shifts import check_shift
    from unireg.io.outputs import OutputFolder

    if (args.pairs is None) == (args.manifest is None):
        raise UniregError("give either --pairs CSV or --manifest with --dataset")
    for name in args.shift:
        check_shift(name)
    if args.manifest is not None:
        if args.dataset is None:
            raise UniregError("--manifest needs --dataset")
        pairs = pairs_from_manifest(args.manifest, args.dataset, args.split, args.modality)
    else:
        pairs = pairs_from_csv(args.pairs)
    if args.max_pairs is not None:
        pairs = pairs[: args.max_pairs]
    methods = []
    for spec in args.methods:
        try:
            methods.append(make_method(spec, dev))
        except MissingPeerError as e:
            print(f"unireg evaluate: skipping {spec}: {e}", file=sys.stderr)
    if not methods:
        raise UniregError("no method left to run")
    if args.report_resolution <= 0:
        raise UniregError(f"--report-resolution must be > 0 mm, got {args.report_resolution}")
    from unireg.cli._common import label_names

    names = label_names(args)
    start = time.perf_counter()
    with OutputFolder(args.output, EVALUATION_OUTPUTS, command="unireg evaluate") as folder:
        assert folder.stage is not None
        pages = CasePages(folder.stage, args.report_resolution, names) if args.report else None
        rows = evaluate(
            pairs, methods, args.angles, axes=args.axes, translation=args.translation,
            scale=args.scale, seed=args.seed, hd95=not args.no_hd95, progress=not args.quiet,
            shifts=args.shift, on_result=pages, warmup=dev.startswith("cuda"),
        )  # fmt: skip
        write_outputs(rows, folder.stage)
        if pages is not None:
            run = {"command": command_line(args), "methods": list(args.methods),
                   "shifts": list(args.shift), "angles": list(args.angles)}  # fmt: skip
            pages.index(rows, run)
        written = folder.commit({"command": command_line(args), "methods": list(args.methods),
                                 "shifts": list(args.shift)})  # fmt: skip
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(markdown_table(summarize(rows)))
        print(f"{len(pairs)} pairs x {len(args.shift)} shifts x {len(args.angles)} angles x "
              f"{len(methods)} methods in "
              f"{elapsed:.0f} s")  # fmt: skip
        for name in written:
            print(f"wrote {folder.target / name}")
    return 0


class CasePages:
    """``--report html``: each registration's page (``case-NNNN.html``) written into the
    staging folder as it is made, then ``report.html``, the index that links them."""

    def __init__(self, stage: Any, resolution: float, names: dict[int, str] | None) -> None:
        self.stage = stage
        self.resolution = resolution
        self.names = names
        self.links: list[str | None] = []

    def __call__(self, done: Any) -> None:
        from unireg.viewer.page import build_report, write_report

        row = done.row
        name = f"case-{len(self.links) + 1:04d}.html"
        title = (f"{row['method']}: {row['moving']} onto {row['fixed']} (shift {row['shift']}, "
                 f"{row['angle']:g} deg)")  # fmt: skip
        metrics = {"method": row["method"], **done.metrics}
        fixed = done.fixed.with_data(done.fixed.data.cpu())
        page = build_report(
            fixed, done.moving.with_data(done.moving.data.cpu()), done.result.transform,
            metrics=metrics, fixed_labels=done.fixed_labels,
            displacement=done.result.displacement(), resolution=self.resolution, title=title,
            label_names=self.names,
        )  # fmt: skip
        write_report(self.stage / name, page)
        self.links.append(name)

    def index(self, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
        from unireg.evaluation import summarize
        from unireg.viewer.page import build_index, write_report

        plots = {p: (self.stage / p).read_bytes() for p in ("dice_vs_angle.png",
                                                             "dice_boxplot.png")}  # fmt: skip
        page = build_index(rows, summarize(rows), plots=plots, links=self.links,
                           settings=settings, title="unireg evaluate")  # fmt: skip
        write_report(self.stage / "report.html", page)
