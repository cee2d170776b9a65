"""``unireg train``: train a registered method (or the brain-mask network) from a TOML
config."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS, add_threads_flag
from unireg.methods.registry import trainable


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``train`` subcommand's parser."""
    p = sub.add_parser(
        "train",
        help=VERBS["train"],
        description=(
            "Train a method from a TOML config (its settings: the method's training config, "
            "e.g. unireg.methods.keymorph.training.KeyMorphConfig). Checkpoints (with their "
            "config) go to OUTPUT/last.pt every checkpoint_every steps and OUTPUT/final.pt at "
            "the end; a run resumes from last.pt (with any number of processes). Under torchrun "
            "(torchrun --nproc-per-node N -m unireg train ...) each process computes its share "
            "of the global batch and the gradients are summed; rank 0 writes the checkpoints."
        ),
    )
    p.add_argument(
        "method",
        choices=[*trainable(), "brainmask"],
        help="a method, or brainmask: the brain-mask network (unireg.methods.extraction)",
    )
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--output", "-o", default=None, help="override the config's output folder")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_threads_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Train a learned method from a config file (TOML); resumes from OUTPUT/last.pt."""
    from unireg.cli._common import threads

    threads(args)
    import sys
    from pathlib import Path

    from unireg.errors import UniregError
    from unireg.methods.base import import_object
    from unireg.methods.registry import get

    if args.method == "brainmask":
        from unireg.methods.extraction import TRAINER

        config_name, trainer_name = TRAINER
    else:
        entry = get(args.method)
        assert entry.config is not None and entry.trainer is not None
        config_name, trainer_name = entry.config, entry.trainer
    config_class, trainer_class = import_object(config_name), import_object(trainer_name)
    overrides: dict[str, object] = {}
    if args.output:
        overrides["output"] = str(Path(args.output).resolve())
    if args.steps is not None:
        overrides["steps"] = args.steps
    try:
        cfg = config_class.from_file(args.config, **overrides)
    except UniregError:
        raise
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise UniregError(f"bad training config ({err})", args.config) from err
    trainer = trainer_class(cfg)
    main = trainer.dist.is_main
    if trainer.resumed_from is not None and main:
        print(f"resuming {trainer.resumed_from} at step {trainer.step}", file=sys.stderr)
    losses = trainer.run(progress=not args.quiet)
    final = trainer.save("final.pt")  # rank 0 only
    # (on an error the process exits without waiting, and torchrun stops the other ranks)
    trainer.dist.close()
    if main:
        tail = losses[-20:]
        mean = sum(tail) / len(tail) if tail else float("nan")
        procs = trainer.dist.world_size
        print(f"trained to step {trainer.step}; mean loss of the last {len(tail)} steps "
              f"{mean:.4f}; global batch {trainer.global_batch} over {procs} process"
              f"{'es' if procs > 1 else ''}; checkpoint {final}")  # fmt: skip
    return 0
