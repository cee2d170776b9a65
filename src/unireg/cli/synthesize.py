"""``unireg synthesize``: draw a synthetic image of random contrast from a label map."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``synthesize`` subcommand's parser."""
    p = sub.add_parser(
        "synthesize",
        help=VERBS["synthesize"],
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
    return p


def run(args: argparse.Namespace) -> int:
    """Draw synthetic images of random contrast from a label map (SynthSeg-style)."""
    import time
    from pathlib import Path

    from unireg.cli._common import device
    from unireg.data.synthesis import LabelSynthesis
    from unireg.io.image import Image, LabelMap, image_suffix, load_labels, save_image

    out = Path(args.output)
    image_suffix(out)
    labels_out = None if args.labels_output is None else Path(args.labels_output)
    if labels_out is not None:
        image_suffix(labels_out)
    dev = device(args.device)
    labels = load_labels(args.labels)
    synth = LabelSynthesis(deformation=0.0 if args.no_deformation else 3.0)
    start = time.perf_counter()
    result = synth(labels.data[None].to(dev), seed=args.seed)
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
