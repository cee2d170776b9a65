"""``unireg register``: register MOVING onto FIXED with any registered method and write the
command-line contract's files.

The method flags are derived from the registry: every option of every method's options
dataclass is a flag (``--tps-lambda`` is KeyMorph's ``lam``); a flag given to a method that
does not have it is refused before any work."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unireg.cli import VERBS, add_orientation_flag, add_report_options, add_threads_flag
from unireg.methods.base import OptionInfo
from unireg.methods.registry import entries


def method_flags() -> dict[str, list[tuple[str, OptionInfo]]]:
    """Every method option by command-line flag: the (method, option) pairs that share it."""
    out: dict[str, list[tuple[str, OptionInfo]]] = {}
    for name, entry in entries().items():
        for info in entry.options.infos():
            out.setdefault(info.flag, []).append((name, info))
    return out


def _dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``register`` subcommand's parser."""
    methods = entries()
    listing = "; ".join(f"{name}: {e.summary}" for name, e in methods.items())
    p = sub.add_parser(
        "register",
        help=VERBS["register"],
        description=(
            "Register MOVING onto FIXED in world space and write into OUTDIR: warped.nii.gz, "
            "transform.nii.gz (the whole forward map as an ITK/ANTs displacement field on the "
            "fixed grid: ants.apply_transforms(fixed, moving, [transform.nii.gz]) reproduces "
            "warped.nii.gz), affine.mat (the linear part), inverse_transform.nii.gz (when the "
            "method gives an inverse), warped_labels.nii.gz (with --moving-labels), "
            "metrics.json (Dice/HD95 with both label maps; folding and Jacobian always) and "
            f"report.png or report.html (with --report). Methods: {listing}."
        ),
    )
    p.add_argument("fixed", metavar="FIXED", help="fixed (target) image")
    p.add_argument("moving", metavar="MOVING", help="moving (source) image")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--fixed-labels", default=None, help="label map on the fixed grid")
    p.add_argument("--moving-labels", default=None, help="label map on the moving grid")
    p.add_argument("--fixed-mask", default=None, help="restrict the similarity to this mask")
    p.add_argument("--landmarks", nargs=2, metavar=("FIXED_CSV", "MOVING_CSV"), default=None,
                   help="matched points (one x,y,z row each, world RAS mm): steer the "
                   "registration towards them and report the TRE")  # fmt: skip
    p.add_argument(
        "--landmark-weight",
        type=float,
        default=1.0,
        metavar="WEIGHT",
        help="weight of the landmark term (mean squared distance / (10 mm)^2)",
    )
    add_registration_arguments(p)
    return p


def add_registration_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``register`` and ``batch`` share: the method and its options, the label
    prompt, metrics, outputs, device, threads and the quality fallback."""
    methods = entries()
    p.add_argument("--method", choices=list(methods), default="syn")
    group = p.add_argument_group("method options (each names the methods that take it)")
    for flag, users in method_flags().items():
        info = users[0][1]
        kinds = {(i.name, i.type) for _, i in users}
        if len(kinds) > 1:
            raise RuntimeError(f"{flag} means different options for {[m for m, _ in users]}")
        # methods sharing a flag may differ in their help, default and choices: all are
        # listed (each method checks its own choices when its options are built)
        helps = []
        for _, i in users:
            text = i.help + (f" (default {i.default})" if i.default is not None else "")
            if text not in helps:
                helps.append(text)
        kw: dict[str, Any] = {"dest": _dest(flag), "default": argparse.SUPPRESS,
                              "help": "; ".join(helps)}  # fmt: skip
        if info.type is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = info.type
            choices = [c for _, i in users for c in (i.choices or ())]
            if all(i.choices is not None for _, i in users):
                kw["choices"] = list(dict.fromkeys(choices))
            else:
                kw["metavar"] = info.type.__name__.upper()
        group.add_argument(flag, **kw)
    p.add_argument("--label-prompt", type=float, default=0.0, metavar="WEIGHT",
                   help="also align the label maps (soft Dice term of this weight)")  # fmt: skip
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 in metrics.json")
    p.add_argument(
        "--report",
        nargs="?",
        const="png",
        choices=["png", "html", "both"],
        default=None,
        help="also write report.png (the default when no format is given), report.html (an "
        "interactive page built on NiiVue that works offline; see unireg view) or both",
    )
    add_report_options(p)
    p.add_argument(
        "--compression",
        type=int,
        choices=range(10),
        default=None,
        metavar="LEVEL",
        help="gzip level 0-9 of the NIfTI outputs (default: 1 for images and label maps, 0 "
        "for displacement fields, which compress by only about 12 %% at any level)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--options",
        default=None,
        metavar="TOML",
        help="the method's options from a TOML file (its [METHOD] table, or the top level; "
        "keys as in spec strings); flags given override it",
    )
    p.add_argument(
        "--fallback",
        choices=["none", "solver"],
        default="none",
        help="when a learned method's result aligns the images worse than no registration (or "
        "than its own linear stage), rerun with the training-free solver (syn for deformable "
        "methods, affine for linear ones) and keep that; the check runs and warns either way",
    )
    p.add_argument("--seed", type=int, default=0)
    add_orientation_flag(p)
    p.add_argument("--quiet", "-q", action="store_true")
    add_threads_flag(p)


def method_options(args: argparse.Namespace) -> Any:
    """The chosen method's validated options from ``--options`` (a TOML file) and the flags
    given, which override it; a flag of another method, or a bad file or value, is an
    :class:`~unireg.methods.base.OptionError`."""
    from unireg.methods.base import OptionError

    entry = entries()[args.method]
    mine = {i.flag: i for i in entry.options.infos()}
    values: dict[str, Any] = {}
    if getattr(args, "options", None):
        values.update(_options_file(args.options, entry.name))
    for flag, users in method_flags().items():
        dest = _dest(flag)
        if not hasattr(args, dest):
            continue
        if flag not in mine:
            takers = ", ".join(sorted({m for m, _ in users}))
            raise OptionError(f"{flag} is not an option of --method {args.method} ({takers})")
        values[mine[flag].name] = getattr(args, dest)
    return entry.options.from_mapping(values, where=f"--method {args.method}", method=entry.name)


def _options_file(path: str, method: str) -> dict[str, Any]:
    """A method's option table from a TOML file: its ``[METHOD]`` table if it has one, else
    the file's top level."""
    import tomllib

    from unireg.methods.base import OptionError

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise OptionError(f"{path}: not a readable TOML options file ({err})") from err
    chosen = table.get(method, table)
    if not isinstance(chosen, dict):
        raise OptionError(f"{path}: [{method}] is not a table")
    return chosen


# the files `unireg register` may write into OUTDIR (the command-line contract)
OUTPUTS = (
    "warped.nii.gz", "warped_labels.nii.gz", "transform.nii.gz", "affine.mat",
    "inverse_transform.nii.gz", "metrics.json", "keypoints.csv", "report.png", "keypoints.png",
    "report.html",
)  # fmt: skip


def check_arguments(args: argparse.Namespace) -> Any:
    """Everything about the command line that can be checked before the inputs are read: the
    method's options, the combinations of flags and the label-name table. Returns the
    validated options."""
    from unireg.errors import UniregError

    entry = entries()[args.method]
    options = method_options(args)
    if args.fixed_labels is not None and args.moving_labels is None:
        raise UniregError(
            "--fixed-labels needs --moving-labels (Dice compares the warped moving labels "
            "with the fixed ones)"
        )
    if args.label_prompt > 0 and (args.fixed_labels is None or args.moving_labels is None):
        raise UniregError("--label-prompt needs --fixed-labels and --moving-labels")
    if args.label_prompt < 0:
        raise UniregError(f"--label-prompt must be >= 0, got {args.label_prompt}")
    if args.report_resolution <= 0:
        raise UniregError(f"--report-resolution must be > 0 mm, got {args.report_resolution}")
    from unireg.cli._common import label_names

    label_names(args)  # a small table: refused here when bad, before any heavy work
    if args.landmark_weight <= 0:
        raise UniregError(f"--landmark-weight must be > 0, got {args.landmark_weight}")
    steering = [n for n, given in (("labels", args.label_prompt > 0),
                                   ("landmarks", args.landmarks is not None),
                                   ("mask", args.fixed_mask is not None)) if given]  # fmt: skip
    refused = [n for n in steering if n not in entry.prompts]
    if refused:
        raise UniregError(f"--method {args.method} takes no {' or '.join(refused)} prompt")
    return options


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """What made this result: the command line and each input file's path, size and
    SHA-256 (recorded in metrics.json and manifest.json)."""
    from unireg.cli._common import command_line
    from unireg.io.outputs import file_record

    named = {"fixed": args.fixed, "moving": args.moving, "fixed_labels": args.fixed_labels,
             "moving_labels": args.moving_labels, "fixed_mask": args.fixed_mask,
             "options": args.options}  # fmt: skip
    if args.landmarks is not None:
        named["fixed_landmarks"], named["moving_landmarks"] = args.landmarks
    return {
        "command": command_line(args),
        "inputs": {k: file_record(v) for k, v in named.items() if v is not None},
    }


@dataclass
class Inputs:
    """One registration's inputs, read and checked (see :func:`load_inputs`)."""

    fixed: Any
    moving: Any
    fixed_labels: Any = None
    moving_labels: Any = None
    mask: Any = None
    points: tuple[Any, Any] = (None, None)
    provenance: dict[str, Any] = field(default_factory=dict)


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Read and check every input file the arguments name (images, label maps, mask,
    landmarks) and record their provenance: the I/O before the work, which ``batch`` runs in
    loader processes ahead of the registration."""
    from unireg.io.image import check_registrable, check_same_grid, load_labels, load_pair

    fixed, moving, fixed_labels, moving_labels = load_pair(
        args.fixed, args.moving, args.fixed_labels, args.moving_labels, channels=True,
        assume_orientation=args.assume_orientation,
    )  # fmt: skip
    mask = None
    if args.fixed_mask is not None:
        mask = load_labels(args.fixed_mask, assume_orientation=args.assume_orientation)
        check_same_grid(fixed, mask)
    points: tuple[Any, Any] = (None, None)
    if args.landmarks is not None:
        from unireg.io.landmarks import read_landmark_pair

        points = read_landmark_pair(*args.landmarks, ndim=fixed.ndim)
    check_registrable(fixed, moving, fixed_labels, moving_labels, mask)
    return Inputs(fixed, moving, fixed_labels, moving_labels, mask, points, provenance(args))


@dataclass
class Computed:
    """A registration done and checked, before its files are written (see
    :func:`compute`)."""

    result: Any
    method: str  # the registry name of the method that made ``result`` (the fallback's)
    spec: str
    setting: dict[str, Any]
    quality: dict[str, Any]
    fallback: dict[str, Any] | None


def _prompts(args: argparse.Namespace, inputs: Inputs) -> Any:
    from unireg.methods import Prompts

    points = inputs.points
    return Prompts(inputs.fixed_labels, inputs.moving_labels, args.label_prompt, points[0],
                   points[1], args.landmark_weight, mask=inputs.mask)  # fmt: skip


def _progress(args: argparse.Namespace) -> Any:
    return None if args.quiet else (lambda line: print(line, flush=True))


def compute(
    args: argparse.Namespace, options: Any, method: Any, inputs: Inputs, device: str = "cpu"
) -> Computed:
    """Run ``method`` on ``inputs``, then :func:`check` the result."""
    result = method.register(inputs.fixed, inputs.moving, prompts=_prompts(args, inputs),
                             seed=args.seed, progress=_progress(args))  # fmt: skip
    return check(args, options, result, inputs, device)


def check(
    args: argparse.Namespace, options: Any, result: Any, inputs: Inputs, device: str = "cpu"
) -> Computed:
    """Check a result's quality against no registration (and its own linear stage); with
    ``--fallback solver`` a result that fails the check is replaced by the training-free
    solver's (run on ``device``)."""
    import sys

    from unireg.methods import create
    from unireg.quality import quality_check
    from unireg.spatial.transform import AffineTransform

    entry = entries()[args.method]
    verb = getattr(args, "command", None) or "register"
    fixed, moving = inputs.fixed, inputs.moving
    spec = options.to_spec(args.method)
    quality = quality_check(result, fixed, moving)
    fallback = None
    if quality["quality_warning"] is not None:
        print(f"unireg {verb}: warning: {spec}: {quality['quality_warning']}", file=sys.stderr)
        if args.fallback == "solver" and entry.family != "unireg":
            name = "affine" if isinstance(result.transform, AffineTransform) else "syn"
            fallback = {"from": spec, "warning": quality["quality_warning"], "to": name}
            print(f"unireg {verb}: --fallback solver: rerunning with {name}", file=sys.stderr)
            entry = entries()[name]
            options = entry.options()
            solver = create(entry, options, device=device)
            result = solver.register(fixed, moving, prompts=_prompts(args, inputs),
                                     seed=args.seed, progress=_progress(args))  # fmt: skip
            spec = options.to_spec(name)
            quality = quality_check(result, fixed, moving)
    kept = kept_start_note(result)
    if kept is not None:
        print(f"unireg {verb}: note: {spec}: {kept}", file=sys.stderr)
    return Computed(result, entry.name, spec, options.to_dict(), quality, fallback)


def kept_start_note(result: Any) -> str | None:
    """One line saying when the solver kept the identity instead of its linear result, or
    naming its deformable stage when that kept its start (its result is then the linear one),
    and why; None otherwise. Printed even with ``--quiet``."""
    from unireg.result import SolverExtras

    if not isinstance(result.extras, SolverExtras):
        return None
    from unireg.solvers.api import CONTRAST_R
    from unireg.solvers.solver import DENSE

    if result.extras.kept_identity():
        return ("the linear stages aligned the images worse than their headers do (mutual "
                "information), so the result keeps their placement (no linear registration); "
                "look at the inputs (one brain-extracted, the other not?) or try --init search or "
                "another method")  # fmt: skip
    dense = next((m for m in result.extras.kept_start() if m in DENSE), None)
    if dense is None:
        return None
    r = result.extras.contrast_r()
    if r is not None and r < CONTRAST_R:
        return (f"the images do not look like one contrast (intensity correlation {r:.2f} "
                f"< {CONTRAST_R}): the {dense} stage was skipped and the linear result kept; "
                "--multimodal registers two contrasts")  # fmt: skip
    return (f"the {dense} stage aligned the images worse than the linear stage and kept its "
            "start: the result is the linear one")  # fmt: skip


def publish(
    args: argparse.Namespace, done: Computed, inputs: Inputs, folder: Any
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Compute the metrics of a :class:`Computed` registration while its files are written
    (a background thread), and publish the contract's files into ``folder`` (an open
    :class:`~unireg.io.outputs.OutputFolder`). Returns the metrics and the published files."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from unireg import __version__
    from unireg.cli._common import write_json
    from unireg.metrics import json_ready, registration_metrics
    from unireg.result import KeyMorphExtras, SolverExtras

    result, points = done.result, inputs.points
    stage = folder.stage
    assert stage is not None
    with ThreadPoolExecutor(max_workers=1) as pool:
        saving = pool.submit(result.save, stage, moving_labels=inputs.moving_labels,
                             compresslevel=args.compression)  # fmt: skip
        metrics = registration_metrics(
            result, fixed_labels=inputs.fixed_labels, moving_labels=inputs.moving_labels,
            hd95=not args.no_hd95, fixed_landmarks=points[0], moving_landmarks=points[1],
        )  # fmt: skip
        saving.result()
    made = inputs.provenance
    metrics = {"method": done.method, "spec": done.spec, **done.setting, **metrics,
               **done.quality, "fallback": done.fallback, "threads": torch.get_num_threads(),
               "unireg_version": __version__, **made}  # fmt: skip
    metrics["brain_stripped"] = result.extras.brain_stripped or None
    if isinstance(result.extras, SolverExtras):  # stages that kept their start, and why
        metrics["stages_kept_start"] = result.extras.kept_start()
        metrics["contrast_r"] = result.extras.contrast_r()
        metrics["kept_identity"] = result.extras.kept_identity()
    write_json(stage / "metrics.json", json_ready(metrics))
    extras = result.extras
    keypoints = isinstance(extras, KeyMorphExtras) and extras.keypoints_fixed is not None
    if keypoints:
        from unireg.methods.keymorph.inference import write_keypoints_csv

        write_keypoints_csv(result, stage / "keypoints.csv")
    if args.report in ("html", "both"):
        write_html_report(args, done, inputs, metrics, stage / "report.html")
    if args.report in ("png", "both"):
        from unireg.report import keypoint_figure, registration_report

        fixed = inputs.fixed
        fixed_img = fixed.with_data(fixed.data.to("cpu"))
        registration_report(result, fixed_img, inputs.moving, stage / "report.png",
                            metrics=metrics)  # fmt: skip
        if keypoints:
            assert isinstance(extras, KeyMorphExtras)
            kps = {"fixed": extras.keypoints_fixed, "moving": extras.keypoints_moving,
                   "aligned": extras.keypoints_aligned}  # fmt: skip
            keypoint_figure(
                fixed_img, inputs.moving, kps, stage / "keypoints.png", warped=result.warped,
                title=f"{extras.method}: {len(kps['fixed'])} keypoints (world mm)",
            )  # fmt: skip
    written = folder.commit({"method": done.method, "spec": done.spec, **made})
    return metrics, written


def write_html_report(
    args: argparse.Namespace, done: Computed, inputs: Inputs, metrics: dict[str, Any], path: Path
) -> None:
    """``report.html`` of a registration (:mod:`unireg.viewer.page`)."""
    import numpy as np

    from unireg.cli._common import label_names
    from unireg.result import KeyMorphExtras
    from unireg.spatial.transform import DisplacementFieldTransform
    from unireg.viewer.page import Keypoints, build_report, write_report

    result, extras = done.result, done.result.extras
    # the map as written to transform.nii.gz, on the CPU: the page unireg view makes from it
    displacement = result.displacement().detach().float().cpu()
    transform = DisplacementFieldTransform(displacement, result.fixed)
    keypoints = None
    if isinstance(extras, KeyMorphExtras) and extras.keypoints_fixed is not None:
        keypoints = Keypoints(np.asarray(extras.keypoints_fixed),
                              np.asarray(extras.keypoints_moving),
                              np.asarray(extras.keypoints_aligned))  # fmt: skip
    fixed = inputs.fixed
    page = build_report(
        fixed.with_data(fixed.data.cpu()), inputs.moving.with_data(inputs.moving.data.cpu()),
        transform, metrics=metrics, fixed_labels=inputs.fixed_labels,
        displacement=displacement, keypoints=keypoints, label_names=label_names(args),
        resolution=args.report_resolution,
        title=f"{done.spec}: {Path(args.moving).name} onto {Path(args.fixed).name}",
    )  # fmt: skip
    write_report(path, page)


def run(args: argparse.Namespace) -> int:
    """Register MOVING onto FIXED and write the contract's files into OUTDIR, all at once."""
    from unireg.cli._common import device, threads
    from unireg.io.outputs import OutputFolder
    from unireg.methods import create

    threads(args)
    entry = entries()[args.method]
    options = check_arguments(args)  # before any file is read
    dev = device(args.device)
    with OutputFolder(args.output, OUTPUTS, command="unireg register") as folder:
        inputs = load_inputs(args)
        method = create(entry, options, device=str(dev))
        done = compute(args, options, method, inputs, device=str(dev))
        metrics, written = publish(args, done, inputs, folder)
        result = done.result
    if not args.quiet:
        line = f"{metrics['spec']} in {result.elapsed:.1f} s"
        if "dice_mean" in metrics:
            line += f", mean Dice {metrics['dice_mean']:.4f}"
        line += f", folding {metrics['folding_percent']:.3f} %"
        print(line)
        print(f"wrote {folder.target}: {', '.join(written)}")
    return 0
