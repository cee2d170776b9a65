"""``unireg metrics``: Dice and HD95 between two label maps."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS, add_orientation_flag


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``metrics`` subcommand's parser."""
    p = sub.add_parser(
        "metrics",
        help=VERBS["metrics"],
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
    add_orientation_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Dice and HD95 between two label maps on disk (moving resampled to fixed if needed)."""
    import json

    from unireg.errors import DimensionalityError, UniregError
    from unireg.io.image import check_has_labels, load_labels, resample
    from unireg.metrics import json_ready, label_metrics

    fixed = load_labels(args.fixed_labels, assume_orientation=args.assume_orientation)
    moving = load_labels(args.moving_labels, assume_orientation=args.assume_orientation)
    check_has_labels(fixed, "fixed label map")
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
