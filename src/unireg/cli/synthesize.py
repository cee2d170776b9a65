"""``unireg synthesize``: draw a synthetic image of random contrast from a label map."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS, add_run_flags


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
    add_run_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Draw synthetic images of random contrast from a label map (SynthSeg-style)."""
    from unireg.cli._common import threads

    threads(args)
    import time

    from unireg.cli._common import check_output_file, device
    from unireg.data.synthesis import LabelSynthesis
    from unireg.errors import UniregError
    from unireg.io.image import Image, LabelMap, check_has_labels, load_labels, save_image
    from unireg.io.outputs import publish_files

    out = check_output_file(args.output)
    labels_out = None
    if args.labels_output is not None:
        labels_out = check_output_file(args.labels_output, "--labels-output")
        if labels_out.absolute() == out.absolute():
            raise UniregError("--labels-output and --output name the same file", out)
    dev = device(args.device)
    labels = load_labels(args.labels, assume_orientation=args.assume_orientation)
    check_has_labels(labels, "label map")
    synth = LabelSynthesis(deformation=0.0 if args.no_deformation else 3.0)
    start = time.perf_counter()
    result = synth(labels.data[None].to(dev), seed=args.seed)
    elapsed = time.perf_counter() - start
    image = Image(result["image"][0].cpu(), labels.affine)
    jobs = [(out, lambda tmp: save_image(image, tmp))]
    if labels_out is not None:
        deformed = LabelMap(result["labels"][0].cpu(), labels.affine)
        jobs.append((labels_out, lambda tmp: save_image(deformed, tmp)))
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    publish_files(jobs)  # both files appear, or neither
    if not args.quiet:
        k = result["label_values"].numel()
        print(f"wrote {out}: {k} labels, seed {args.seed}, {elapsed:.2f} s")
    return 0
