"""Turn a training checkpoint into a shipped model: float16 weights, no optimiser state; the
network config, preprocessing, training config, step and extras kept.

    python tools/ship_model.py METHOD RUN/final.pt src/unireg/models/NAME.pt
    python tools/ship_model.py brainmask RUN/final.pt src/unireg/models/brainmask_4mm.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unireg.methods.registry import load_model
from unireg.training.checkpoint import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.method == "brainmask":  # the brain-mask network is no registration method
        from unireg.methods.extraction.inference import load_brain_model

        model, checkpoint = load_brain_model(args.source)
    else:
        model, checkpoint = load_model(args.method, model=args.source)
    path = save_checkpoint(
        args.target, args.method, model, preprocessing=checkpoint.preprocessing,
        train_config=checkpoint.train_config, step=checkpoint.step, extra=checkpoint.extra,
        half=True,
    )  # fmt: skip
    print(f"{path}: {path.stat().st_size / 2**20:.2f} MB, step {checkpoint.step}")


if __name__ == "__main__":
    main()
