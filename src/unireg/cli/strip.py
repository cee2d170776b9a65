"""``unireg strip``: the brain mask of an image of any contrast, and the brain-extracted
image."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS, add_run_flags


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``strip`` subcommand's parser."""
    p = sub.add_parser(
        "strip",
        help=VERBS["strip"],
        description=(
            "Brain extraction with the brain-mask network (a U-Net at 4 mm trained on images of "
            "random contrast synthesised from whole-head label maps and on IXI T1s; "
            "unireg.methods.extraction): writes the brain mask (uint8, 1 inside, on the "
            "image grid) and, with --output, the image set to its minimum outside it. Also "
            "says whether the image looks brain-extracted already."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="image (.nii.gz, .mgz)")
    p.add_argument("--mask", "-m", required=True, help="brain mask to write")
    p.add_argument("--output", "-o", default=None, help="also write the brain-extracted image")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="brain probability above which a voxel is brain (default 0.5)")  # fmt: skip
    p.add_argument("--model", default=None, help="a brain-mask checkpoint (default: shipped)")
    add_run_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Write the brain mask (and the stripped image) of one image."""
    from unireg.cli._common import threads

    threads(args)
    import time

    from unireg.cli._common import check_output_file, device
    from unireg.errors import UniregError
    from unireg.io.image import load_image, save_image
    from unireg.io.outputs import publish_files
    from unireg.methods.extraction.inference import (
        brain_mask,
        is_brain_extracted,
        load_brain_model,
        strip,
    )

    if not 0.0 < args.threshold < 1.0:
        raise UniregError(f"--threshold must be in (0, 1), got {args.threshold}")
    mask_out = check_output_file(args.mask, "--mask")
    image_out = None
    if args.output is not None:
        image_out = check_output_file(args.output)
        if image_out.absolute() == mask_out.absolute():
            raise UniregError("--mask and --output name the same file", image_out)
    dev = device(args.device)
    model = load_brain_model(args.model, dev)
    image = load_image(args.image, assume_orientation=args.assume_orientation)
    start = time.perf_counter()
    mask = brain_mask(image, model, dev, threshold=args.threshold)
    elapsed = time.perf_counter() - start
    jobs = [(mask_out, lambda tmp: save_image(mask, tmp))]
    if image_out is not None:
        stripped = strip(image, mask)
        jobs.append((image_out, lambda tmp: save_image(stripped, tmp)))
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    publish_files(jobs)  # every file appears, or none
    if not args.quiet:
        import numpy as np

        ml = float(mask.data.sum()) * abs(float(np.linalg.det(mask.affine[:-1, :-1]))) / 1000
        already = is_brain_extracted(image, mask)
        seen = "looks brain-extracted already" if already else "shows more than a brain"
        print(f"wrote {mask_out}: brain {ml:.0f} ml, {elapsed:.2f} s; the image {seen}")
    return 0
