"""``unireg apply``: apply saved transforms to an image or label map."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS, add_run_flags


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``apply`` subcommand's parser."""
    p = sub.add_parser(
        "apply",
        help=VERBS["apply"],
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
    add_run_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Apply saved transform(s) to an image or label map, onto the reference grid."""
    from unireg.cli._common import threads

    threads(args)
    import time

    from unireg.cli._common import check_output_file, device
    from unireg.errors import DimensionalityError, UniregError
    from unireg.io.image import load_image, resample, save_image
    from unireg.io.transforms import load_transforms

    out = check_output_file(args.output)  # a bad output path fails before any work
    dev = device(args.device)
    transform = load_transforms(args.transforms)
    orient = args.assume_orientation
    reference = load_image(args.reference, channels=True, assume_orientation=orient)
    moving = load_image(
        args.image, label=args.labels, channels=not args.labels, assume_orientation=orient
    )
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
    moving = moving.with_data(moving.data.to(dev))
    start = time.perf_counter()
    warped = resample(moving, reference.geometry, transform, mode=mode)
    elapsed = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(warped, out)
    if not args.quiet:
        kind = f"label map ({mode})" if args.labels else f"image ({mode})"
        print(f"wrote {out}: {kind} on {reference.geometry!r}, warp {elapsed:.2f} s")
    return 0
