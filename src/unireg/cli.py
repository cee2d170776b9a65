"""The ``unireg`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from unireg import __version__
from unireg.errors import DimensionalityError, UniregError
from unireg.io.image import image_suffix, load_image, resample, save_image
from unireg.io.transforms import load_transforms


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UniregError("--device cuda was asked for but CUDA is not available here")
    return torch.device(name)


def cmd_apply(args: argparse.Namespace) -> int:
    """Apply saved transform(s) to an image or label map, onto the reference grid."""
    out = Path(args.output)
    image_suffix(out)  # fail on a bad output name before any work
    device = _device(args.device)
    transform = load_transforms(args.transforms)
    reference = load_image(args.reference, channels=True)
    moving = load_image(args.image, label=args.labels, channels=not args.labels)
    for what, img in (("reference", reference), ("image", moving)):
        if img.ndim != transform.ndim:
            raise DimensionalityError(
                f"{what} is {img.ndim}D but the transform is {transform.ndim}D", img.path
            )
    if args.interpolation is None:
        mode = "nearest" if args.labels else "linear"
    else:
        mode = args.interpolation
    if mode == "onehot" and not args.labels:
        raise UniregError("--interpolation onehot is for label maps (add --labels)")
    if args.labels and mode == "linear":
        raise UniregError(
            "label maps are never warped with plain linear interpolation; use nearest or onehot"
        )
    moving = moving.with_data(moving.data.to(device))
    start = time.perf_counter()
    warped = resample(moving, reference.geometry, transform, mode=mode)
    elapsed = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(warped, out)
    if not args.quiet:
        kind = f"label map ({mode})" if args.labels else f"image ({mode})"
        print(f"wrote {out}: {kind} on {reference.geometry!r}, warp {elapsed:.2f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print the grid, orientation and value range of image files."""
    import nibabel as nib

    for p in args.images:
        img = load_image(p, channels=True)
        data = img.data
        codes = "".join(nib.aff2axcodes(img.affine))
        print(
            f"{p}: {img.ndim}D shape={img.shape} channels={data.shape[0]} "
            f"spacing={tuple(round(s, 4) for s in img.spacing)} mm orientation={codes} "
            f"range=[{float(data.min()):.4g}, {float(data.max()):.4g}]"
        )
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """Dice and HD95 between two label maps on disk (moving resampled to fixed if needed)."""
    import json

    from unireg.io.image import load_labels
    from unireg.metrics import json_ready, label_metrics

    fixed = load_labels(args.fixed_labels)
    moving = load_labels(args.moving_labels)
    if fixed.ndim != moving.ndim:
        raise DimensionalityError(
            f"is {moving.ndim}D but the fixed label map is {fixed.ndim}D", moving.path
        )
    resampled = not fixed.geometry.same_grid(moving.geometry)
    if resampled:
        moving = resample(moving, fixed.geometry, mode="nearest")
    labels = None
    if args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError as e:
            raise UniregError(
                f"--labels must be comma-separated integers, got {args.labels!r}"
            ) from e
    out = label_metrics(fixed, moving, labels=labels, hd95=not args.no_hd95)
    out = {
        "fixed_labels": str(args.fixed_labels),
        "moving_labels": str(args.moving_labels),
        "resampled_to_fixed_grid": resampled,
        "label_interpolation": "nearest" if resampled else "none (same grid)",
        **out,
    }
    if args.json:
        print(json.dumps(json_ready(out), indent=2))
        return 0
    if resampled:
        print(
            f"note: {args.moving_labels} is on another grid than {args.fixed_labels}; it was "
            "resampled onto the fixed grid with nearest neighbour in world space"
        )
    print(f"labels compared: {out['num_labels']} (present in the fixed map, background 0 left out)")
    print(f"mean Dice: {out['dice_mean']:.4f}")
    if "hd95_mean" in out:
        print(f"mean HD95: {out['hd95_mean']:.3f} mm")
    print("label      Dice     HD95 (mm)")
    for key, value in out.items():
        if key.startswith("dice_") and key != "dice_mean":
            k = key[5:]
            h = out.get(f"hd95_{k}")
            hs = "" if h is None else f"{h:9.3f}"
            print(f"{k:>5}  {value:9.4f}  {hs}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    """Draw synthetic images of random contrast from a label map (SynthSeg-style)."""
    from unireg.data.synthesis import LabelSynthesis
    from unireg.io.image import Image, LabelMap, load_labels

    out = Path(args.output)
    image_suffix(out)
    labels_out = None if args.labels_output is None else Path(args.labels_output)
    if labels_out is not None:
        image_suffix(labels_out)
    device = _device(args.device)
    labels = load_labels(args.labels)
    synth = LabelSynthesis(deformation=0.0 if args.no_deformation else 3.0)
    start = time.perf_counter()
    result = synth(labels.data[None].to(device), seed=args.seed)
    elapsed = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(Image(result["image"][0].cpu(), labels.affine), out)
    if labels_out is not None:
        labels_out.parent.mkdir(parents=True, exist_ok=True)
        save_image(LabelMap(result["labels"][0].cpu(), labels.affine), labels_out)
    if not args.quiet:
        k = result["label_values"].numel()
        print(f"wrote {out}: {k} labels, seed {args.seed}, {elapsed:.2f} s")
    return 0


def _write_json(path: Path, data: dict) -> None:
    import json

    from unireg.io.files import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def cmd_register(args: argparse.Namespace) -> int:
    """Register MOVING onto FIXED and write the contract's files into OUTDIR."""
    from unireg.evaluation.harness import Pair, load_pair
    from unireg.io.image import check_same_grid, load_labels
    from unireg.metrics import json_ready, registration_metrics
    from unireg.solvers import register

    device = _device(args.device)
    case = load_pair(
        Pair(args.fixed, args.moving, args.fixed_labels, args.moving_labels), channels=True
    )
    fixed, moving = case.fixed, case.moving
    fixed_labels, moving_labels = case.fixed_labels, case.moving_labels
    mask = None if args.fixed_mask is None else load_labels(args.fixed_mask)
    if mask is not None:
        check_same_grid(fixed, mask)
    if args.label_prompt > 0 and (fixed_labels is None or moving_labels is None):
        raise UniregError("--label-prompt needs --fixed-labels and --moving-labels")
    if args.refine != "none":
        from unireg.methods.keymorph import check_refinement

        if args.method != "keymorph":
            raise UniregError("--refine refines KeyMorph's affine (--method keymorph)")
        try:
            check_refinement(args.transform, args.refine)
        except ValueError as err:
            raise UniregError(f"--refine: {err}") from err
    if args.rotations is not None and (args.method != "keymorph" or args.rotations < 1):
        raise UniregError("--rotations is KeyMorph's number of test-time rotations (>= 1)")
    progress = None if args.quiet else (lambda line: print(line, flush=True))
    if args.method in ("keymorph", "sitreg"):
        from unireg.training.checkpoint import load_user_model

        model, payload = load_user_model(args.method, args.model, device=device)
    if args.method == "keymorph":
        from unireg.methods.keymorph import DEFAULT_ROTATIONS, register_keymorph

        rotations = DEFAULT_ROTATIONS if args.rotations is None else args.rotations
        result = register_keymorph(
            fixed, moving, model=model, payload=payload, transform=args.transform,
            lam=args.tps_lambda, refine=args.refine, rotations=rotations, device=device,
        )  # fmt: skip
        setting = {"transform": args.transform, "refine": args.refine, "rotations": rotations}
        if args.transform == "tps":
            setting["tps_lambda"] = args.tps_lambda
    elif args.method == "sitreg":
        from unireg.methods.sitreg import register_sitreg

        result = register_sitreg(
            fixed, moving, model=model, payload=payload, affine=args.affine_stage,
            preset=args.preset, inference=args.inference, device=device,
        )  # fmt: skip
        setting = {"affine_stage": args.affine_stage, "inference": result.extras["inference"]}
    else:
        result = register(
            fixed, moving, args.method, preset=args.preset, multimodal=args.multimodal,
            init=args.init, deformable=args.deformable, fixed_labels=fixed_labels,
            moving_labels=moving_labels, label_weight=args.label_prompt, mask=mask,
            device=device, seed=args.seed, progress=progress,
        )  # fmt: skip
        setting = {"preset": args.preset}
    metrics = registration_metrics(
        result, fixed_labels=fixed_labels, moving_labels=moving_labels, hd95=not args.no_hd95
    )
    metrics = {"method": args.method, **setting, **metrics}
    out = Path(args.output)
    written = result.save(out, moving_labels=moving_labels)
    try:
        _write_json(out / "metrics.json", json_ready(metrics))
        written["metrics"] = out / "metrics.json"
        if "keypoints_fixed" in result.extras:
            from unireg.methods.keymorph import write_keypoints_csv

            written["keypoints"] = write_keypoints_csv(result, out / "keypoints.csv")
        if args.report:
            from unireg.report import registration_report

            fixed_img = fixed.with_data(fixed.data.to("cpu"))
            registration_report(result, fixed_img, moving, out / "report.png", metrics=metrics)
            written["report"] = out / "report.png"
            if "keypoints_fixed" in result.extras:
                from unireg.report import keypoint_figure

                kps = {k: result.extras[f"keypoints_{k}"] for k in ("fixed", "moving", "aligned")}
                written["keypoint_figure"] = keypoint_figure(
                    fixed_img, moving, kps, out / "keypoints.png", warped=result.warped,
                    title=f"{result.extras['method']}: {len(kps['fixed'])} keypoints (world mm)",
                )  # fmt: skip
    except BaseException:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    if not args.quiet:
        line = f"{args.method} ({', '.join(map(str, setting.values()))}) in {result.elapsed:.1f} s"
        if "dice_mean" in metrics:
            line += f", mean Dice {metrics['dice_mean']:.4f}"
        line += f", folding {metrics['folding_percent']:.3f} %"
        print(line)
        for path in written.values():
            print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run methods side by side on pairs under misalignments; write tables and plots."""
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

    if (args.pairs is None) == (args.manifest is None):
        raise UniregError("give either --pairs CSV or --manifest with --dataset")
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
            methods.append(make_method(spec))
        except MissingPeerError as e:
            print(f"unireg evaluate: skipping {spec}: {e}", file=sys.stderr)
    if not methods:
        raise UniregError("no method left to run")
    start = time.perf_counter()
    rows = evaluate(
        pairs, methods, args.angles, axes=args.axes, translation=args.translation,
        scale=args.scale, seed=args.seed, hd95=not args.no_hd95, progress=not args.quiet,
    )  # fmt: skip
    paths = write_outputs(rows, args.output)
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(markdown_table(summarize(rows)))
        print(f"{len(pairs)} pairs x {len(args.angles)} angles x {len(methods)} methods in "
              f"{elapsed:.0f} s")  # fmt: skip
        for path in paths.values():
            print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a learned method from a config file (TOML); resumes from OUTPUT/last.pt."""
    if args.method == "keymorph":
        from unireg.training.keymorph import KeyMorphConfig as Config
        from unireg.training.keymorph import KeyMorphTrainer as TrainerClass
    else:
        from unireg.training.sitreg import SITRegConfig as Config
        from unireg.training.sitreg import SITRegTrainer as TrainerClass

    overrides = {}
    if args.output:
        overrides["output"] = str(Path(args.output).resolve())
    if args.steps is not None:
        overrides["steps"] = args.steps
    try:
        cfg = Config.from_file(args.config, **overrides)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"unireg train: error: {err}", file=sys.stderr)
        return 2
    trainer = TrainerClass(cfg)
    if trainer.step:
        print(f"resuming {cfg.output}/last.pt at step {trainer.step}", file=sys.stderr)
    losses = trainer.run(progress=not args.quiet)
    final = trainer.save("final.pt")
    tail = losses[-20:]
    mean = sum(tail) / len(tail) if tail else float("nan")
    print(f"trained to step {trainer.step}; mean loss of the last {len(tail)} steps "
          f"{mean:.4f}; checkpoint {final}")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Register two real brains shipped with unireg; write the outputs, a report and a table."""
    from importlib import resources

    from unireg.evaluation import Pair, evaluate, make_method, markdown_table, summarize
    from unireg.io.files import write_atomic
    from unireg.io.image import load_labels
    from unireg.metrics import json_ready, registration_metrics
    from unireg.report import registration_report

    data = resources.files("unireg.demo_data")
    fixed_p = Path(str(data / "IXI012-HH-1211-T1_ds.nii.gz"))
    moving_p = Path(str(data / "IXI013-HH-1212-T1_ds.nii.gz"))
    fixed_l = Path(str(data / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz"))
    moving_l = Path(str(data / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(f"unireg demo: registering {moving_p.name} onto {fixed_p.name} (IXI, CC BY-SA 3.0; "
          f"see {data / 'ATTRIBUTION.txt'})")  # fmt: skip
    fixed, moving = load_image(fixed_p), load_image(moving_p)
    flab, mlab = load_labels(fixed_l), load_labels(moving_l)
    spec = f"unireg:{args.method}"
    method = make_method(spec)
    result = method.register(fixed, moving, seed=0)
    metrics = registration_metrics(result, fixed_labels=flab, moving_labels=mlab)
    written = result.save(out, moving_labels=mlab)
    _write_json(out / "metrics.json", json_ready({"method": spec, **metrics}))
    registration_report(result, fixed, moving, out / "report.png", metrics=metrics,
                        title=f"unireg demo: {spec}, IXI013 onto IXI012")  # fmt: skip
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
    for path in [*written.values(), out / "metrics.json", out / "metrics.md", out / "report.png"]:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``unireg`` command."""
    parser = argparse.ArgumentParser(
        prog="unireg",
        description="unireg: learning-based medical image registration in physical space.",
    )
    parser.add_argument("--version", action="version", version=f"unireg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "apply",
        help="apply saved transform(s) to an image or label map",
        description=(
            "Resample IMAGE onto the grid of --reference through TRANSFORM(s): ITK/ANTs affines "
            "(.mat, .txt, .tfm) or displacement fields (.nii.gz). Several transforms are "
            "chained in ANTs order: the first is applied first to a reference point, as in "
            "ants.apply_transforms(transformlist=[...]). Write '[affine.mat,1]' to use an "
            "affine's inverse, as antsApplyTransforms does."
        ),
    )
    p.add_argument("transforms", nargs="+", metavar="TRANSFORM", help="transform file(s)")
    p.add_argument("image", metavar="IMAGE", help="moving image or label map (.nii.gz, .mgz)")
    p.add_argument("--reference", "-r", required=True, help="fixed image defining the output grid")
    p.add_argument("--output", "-o", required=True, help="output file (.nii.gz, .nii, .mgz)")
    p.add_argument(
        "--labels",
        action="store_true",
        help="IMAGE is a label map: nearest-neighbour (or --interpolation onehot), values kept",
    )
    p.add_argument(
        "--interpolation",
        choices=["linear", "nearest", "onehot"],
        default=None,
        help="default: linear for images, nearest for label maps",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "metrics",
        help="Dice and HD95 between two label maps",
        description=(
            "Dice per label and its mean over the labels present in the fixed map (0 is "
            "background), and the 95th-percentile Hausdorff distance in mm (voxel spacing "
            "respected). A moving map on another grid is resampled onto the fixed grid with "
            "nearest neighbour in world space, and the output says so."
        ),
    )
    p.add_argument("--fixed-labels", required=True, help="reference label map")
    p.add_argument("--moving-labels", required=True, help="label map to score (e.g. warped)")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: all in fixed)")
    p.add_argument("--no-hd95", action="store_true", help="Dice only (faster)")
    p.add_argument("--json", action="store_true", help="print JSON (NaN as null)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "synthesize",
        help="draw a synthetic image of random contrast from a label map",
        description=(
            "SynthSeg-style synthesis: random smooth deformation, a random mean and standard "
            "deviation per label, blur, lower resolution, bias field, noise and gamma. The image "
            "(and with --labels-output the deformed label map) is written on the label map's "
            "grid. The same --seed gives the same image."
        ),
    )
    p.add_argument("labels", metavar="LABELS", help="label map (.nii.gz, .mgz)")
    p.add_argument("--output", "-o", required=True, help="synthetic image to write")
    p.add_argument("--labels-output", default=None, help="also write the deformed label map")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deformation", action="store_true", help="keep the anatomy as it is")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser(
        "register",
        help="register a moving image onto a fixed image",
        description=(
            "Register MOVING onto FIXED in world space and write into OUTDIR: warped.nii.gz, "
            "transform.nii.gz (the whole forward map as an ITK/ANTs displacement field on the "
            "fixed grid: ants.apply_transforms(fixed, moving, [transform.nii.gz]) reproduces "
            "warped.nii.gz), affine.mat (the linear part), inverse_transform.nii.gz (when the "
            "method gives an inverse), warped_labels.nii.gz (with --moving-labels), "
            "metrics.json (Dice/HD95 with both label maps; folding and Jacobian always) and "
            "report.png (with --report). Methods: rigid, affine (rigid then affine, MI), syn "
            "(affine then diffeomorphic, LNCC; MI with --multimodal), bspline, ffd, keymorph "
            "(learned keypoints, closed-form rigid/affine/TPS; writes keypoints.csv), sitreg "
            "(learned symmetric, inverse-consistent deformation after an affine stage; writes "
            "inverse_transform.nii.gz)."
        ),
    )
    p.add_argument("fixed", metavar="FIXED", help="fixed (target) image")
    p.add_argument("moving", metavar="MOVING", help="moving (source) image")
    p.add_argument("--output", "-o", required=True, help="output folder")
    from unireg.methods.sitreg import AFFINE_STAGES, INFERENCE
    from unireg.solvers.api import METHODS, PRESETS

    p.add_argument("--method", choices=[*METHODS, "keymorph", "sitreg"], default="syn")
    p.add_argument("--preset", choices=PRESETS, default="fast")
    p.add_argument(
        "--transform",
        choices=["rigid", "affine", "tps"],
        default="affine",
        help="keymorph: the closed form from the keypoints (default affine)",
    )
    p.add_argument("--tps-lambda", type=float, default=0.1, help="keymorph: TPS lambda")
    p.add_argument(
        "--rotations",
        type=int,
        default=None,
        help="keymorph: test-time rotations; each image's keypoints are averaged over that many "
        "turned copies (default 8; 1: one detection per image)",
    )
    p.add_argument(
        "--refine",
        choices=["none", "affine-gn"],
        default="none",
        help="keymorph (affine): refine the keypoint affine on the intensities with affine-gn "
        "(same modality; the keypoints give robustness to any orientation, the refinement "
        "accuracy)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="keymorph, sitreg: checkpoint (default: the shipped one; for sitreg that is the "
        "lite model, and 'standard' names the shipped full-resolution one; for keymorph it is "
        "the two-stage model 'upright', and 'anatomical' (its first stage alone), 'decoder', "
        "'dice' and 'selfsup' name the other shipped models)",
    )
    p.add_argument(
        "--affine-stage",
        choices=list(AFFINE_STAGES),
        default="affine-gn",
        help="sitreg: the unireg linear method run first (default 'affine-gn': Gauss-Newton, "
        "same modality, about 10x faster than 'affine'; 'keymorph': KeyMorph's keypoints "
        "then affine-gn, for heads in any orientation; 'none' for pre-aligned pairs)",
    )
    p.add_argument(
        "--inference",
        choices=list(INFERENCE),
        default=None,
        help="sitreg: 'complete' evaluates every update on the full grid (slower, closer "
        "inverse); 'fast' keeps the finest update on its own half-resolution grid (default: "
        "the one the model was trained with: fast for the default lite model, standard for "
        "--model standard)",
    )
    p.add_argument(
        "--deformable",
        choices=["greedy", "svf"],
        default="greedy",
        help="syn's model: greedy compositive (default) or symmetric SVF (gives the inverse)",
    )
    p.add_argument("--multimodal", action="store_true", help="MI for the deformable stage")
    p.add_argument(
        "--init",
        choices=["moments", "search"],
        default="moments",
        help="linear initialisation; 'search' also tries a grid of rotations (large rotations)",
    )
    p.add_argument("--fixed-labels", default=None, help="label map on the fixed grid")
    p.add_argument("--moving-labels", default=None, help="label map on the moving grid")
    p.add_argument(
        "--label-prompt",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="also align the label maps (soft Dice term of this weight)",
    )
    p.add_argument("--fixed-mask", default=None, help="restrict the similarity to this mask")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 in metrics.json")
    p.add_argument("--report", action="store_true", help="also write report.png")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "evaluate",
        help="run methods side by side on pairs under misalignment; tables and plots",
        description=(
            "Run every method on the same pairs in the same run. Pairs come from a CSV "
            "(fixed,moving[,fixed_labels,moving_labels]) or from a manifest (all ordered pairs "
            "of a dataset's split). Each angle rotates the moving image and its labels about "
            "its centre about 1-3 random axes (seeded; --axes fixes the count), optionally "
            "with translation and scaling (KeyMorph's robustness protocol). Methods: none, "
            "unireg:METHOD[:key=value...] (e.g. unireg:syn:preset=accurate), "
            "ants:TYPE[:init=search] (needs pip install 'unireg[peers]'). Writes pairs.csv, "
            "summary.csv, summary.md, dice_vs_angle.png and dice_boxplot.png into OUTDIR."
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "demo",
        help="register two real brains shipped with unireg and write a report",
        description=(
            "Registers IXI013 onto IXI012 (2 mm T1 with skull, DLMUSE labels; shipped inside "
            "the package with their CC BY-SA 3.0 attribution) with the best available method, "
            "and writes the register outputs, report.png and a metrics table beside no "
            "registration and the affine stage."
        ),
    )
    p.add_argument("--output", "-o", default="unireg-demo", help="output folder")
    p.add_argument("--method", default="syn", help="unireg method (default syn)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a learned method from a config file",
        description=(
            "Train a method from a TOML config (settings: unireg.training.keymorph."
            "KeyMorphConfig, unireg.training.sitreg.SITRegConfig). Checkpoints (with their "
            "config) go to OUTPUT/last.pt every checkpoint_every steps and OUTPUT/final.pt at "
            "the end; a run resumes from last.pt."
        ),
    )
    p.add_argument("method", choices=["keymorph", "sitreg"])
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--output", "-o", default=None, help="override the config's output folder")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="print grid, orientation and range of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unireg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return 0
    except UniregError as e:
        print(f"unireg {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
