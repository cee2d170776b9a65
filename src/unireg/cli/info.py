"""``unireg info``: print the grid, orientation and value range of image files."""

from __future__ import annotations

import argparse

from unireg.cli import add_orientation_flag


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``info`` subcommand's parser."""
    p = sub.add_parser("info", help="print grid, orientation and range of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_orientation_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the grid, orientation and value range of image files."""
    import nibabel as nib

    from unireg.io.image import load_image

    for p in args.images:
        img = load_image(p, channels=True, assume_orientation=args.assume_orientation)
        data = img.data
        codes = "".join(nib.aff2axcodes(img.affine))
        print(
            f"{p}: {img.ndim}D shape={img.shape} channels={data.shape[0]} "
            f"spacing={tuple(round(s, 4) for s in img.spacing)} mm orientation={codes} "
            f"range=[{float(data.min()):.4g}, {float(data.max()):.4g}]"
        )
    return 0
