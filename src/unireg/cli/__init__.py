"""The ``unireg`` command line: one module per verb.

Building the parser imports only argparse and the method registry (plain Python), so
``unireg --help`` and ``unireg VERB --help`` start at once; each verb imports torch and the
code it runs only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from unireg import __version__
from unireg.errors import UniregError

# verb -> module, in the order ``--help`` lists them
VERBS = ("register", "apply", "metrics", "evaluate", "train", "models", "demo", "synthesize",
         "info")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``unireg`` command (no torch, no NumPy)."""
    parser = argparse.ArgumentParser(
        prog="unireg",
        description="unireg: learning-based medical image registration in physical space.",
    )
    parser.add_argument("--version", action="version", version=f"unireg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        module = importlib.import_module(f"unireg.cli.{verb}")
        p = module.add_parser(sub)
        p.set_defaults(verb_module=module.__name__)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unireg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args.verb_module).run(args))
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return 0
    except UniregError as e:
        print(f"unireg {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
