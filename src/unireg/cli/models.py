"""``unireg models``: the registered methods, their options and their shipped models."""

from __future__ import annotations

import argparse

from unireg.cli import VERBS
from unireg.methods.registry import entries


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``models`` subcommand's parser."""
    p = sub.add_parser(
        "models",
        help=VERBS["models"],
        description=(
            "Every registered method with its options (flag, spec key, default) and, for "
            "learned methods, the models shipped inside the package (the first is the "
            "default; name one with --model NAME or model=NAME in a spec string)."
        ),
    )
    p.add_argument("method", nargs="?", default=None, help="only this method")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the registry (reads no model file)."""
    from unireg.methods.registry import get, models_dir

    chosen = [get(args.method)] if args.method else list(entries().values())
    for entry in chosen:
        print(f"{entry.name}: {entry.summary}")
        for info in entry.options.infos():
            where = "positional in specs" if info.positional else f"spec key {info.spec}"
            choices = f", one of {'/'.join(map(str, info.choices))}" if info.choices else ""
            print(f"  {info.flag:<16} {where}, default {info.default}{choices}")
        for i, (name, file) in enumerate(entry.models.items()):
            path = models_dir() / file
            size = path.stat().st_size / 2**20 if path.exists() else 0
            tag = " (default)" if i == 0 else ""
            print(f"  model {name:<11} {file} {size:.1f} MB{tag}")
    if not args.method:
        from unireg.methods.extraction import MODEL_FILE

        path = models_dir() / MODEL_FILE
        size = path.stat().st_size / 2**20 if path.exists() else 0
        print("brain extraction (unireg strip; every method's --brain auto)")
        print(f"  model brainmask   {MODEL_FILE} {size:.1f} MB")
    return 0
