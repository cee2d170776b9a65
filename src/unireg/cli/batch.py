"""``unireg batch``: register every pair of a CSV in one process, into one folder per pair.

The method (and its network) is created once; loader processes read and check the next pairs'
files while the current pair is registered. Each pair's folder is published as a whole (the
same transaction as ``unireg register -o``), so a pair whose folder holds a result of the same
method spec and inputs is complete and is skipped when the command is run again: an
interrupted run loses at most the pair it was computing. A pair whose input is bad is reported
in ``summary.csv`` and the others go on. Under ``torchrun`` each rank takes every
``WORLD_SIZE``-th pair and rank 0 writes the summary when all have finished.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from unireg.cli import VERBS
from unireg.cli.register import OUTPUTS, add_registration_arguments

SUMMARY = "summary.csv"
# columns of summary.csv (metrics.json's values where the pair is done)
COLUMNS = ("id", "status", "fixed", "moving", "method", "spec", "time_s", "dice_mean",
           "hd95_mean", "folding_percent", "quality_warning", "error")  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``batch`` subcommand's parser."""
    p = sub.add_parser(
        "batch",
        help=VERBS["batch"],
        description=(
            "Register every pair of PAIRS (a CSV with columns fixed, moving and optionally "
            "fixed_labels, moving_labels, id; paths relative to the CSV's folder) with one "
            "method loaded once, into OUTDIR/ID/ (the files of `unireg register`; ID is the id "
            "column, else the row number and the two file names) and OUTDIR/summary.csv (one "
            "row per pair: done, failed with the reason, or pending). Pairs already done with "
            "the same method spec and inputs are skipped, so rerunning an interrupted command "
            "finishes it. Exit status 1 when any pair failed. Runs under torchrun too: each "
            "rank takes its share of the pairs (rank r on cuda:LOCAL_RANK with --device cuda)."
        ),
    )
    p.add_argument("pairs", metavar="PAIRS", help="CSV of pairs")
    p.add_argument("--output", "-o", required=True, help="output folder (one folder per pair)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="loader processes reading the next pairs ahead (0: read in the main process)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="register N pairs with one network pass (learned methods that can: sitreg, "
        "keymorph, avsm; on a GPU this keeps the device busy); the others ignore it",
    )
    add_registration_arguments(p)
    return p


def pair_ids(pairs: list[Any]) -> list[str]:
    """Each pair's folder name: its ``id`` when the CSV gives one, else
    ``ROW_FIXED_MOVING`` (row number from 1, file names without extensions). Must be unique
    and plain file names."""
    ids = []
    for i, pair in enumerate(pairs, start=1):
        if pair.name:
            ids.append(pair.name)
            continue
        stems = [_stem(p) if p else "none" for p in (pair.fixed, pair.moving)]
        ids.append(f"{i:04d}_{stems[0]}_{stems[1]}")
    return ids


def _stem(path: Path) -> str:
    """A file's name without its image extension."""
    from unireg.io.image import IMAGE_SUFFIXES

    name = Path(path).name
    suffix = next((x for x in IMAGE_SUFFIXES if name.lower().endswith(x)), "")
    return name[: len(name) - len(suffix)]


def _check_ids(ids: list[str], path: str) -> None:
    from unireg.errors import ManifestError

    bad = [i for i in ids if i in ("", ".", "..", SUMMARY) or "/" in i or i.startswith(".")]
    if bad:
        raise ManifestError(f"pair id {bad[0]!r} cannot be a folder name", path)
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ManifestError(f"pair id {i!r} appears twice", path)
        seen.add(i)


def pair_arguments(args: argparse.Namespace, pair: Any, folder: Path) -> argparse.Namespace:
    """The arguments of ``unireg register`` for one pair of the batch."""
    values = {**vars(args), "fixed": pair.fixed, "moving": pair.moving,
              "fixed_labels": pair.fixed_labels, "moving_labels": pair.moving_labels,
              "fixed_mask": None, "landmarks": None, "landmark_weight": 1.0,
              "output": str(folder)}  # fmt: skip
    return argparse.Namespace(**values)


def completed(folder: Path, spec: str, pair: Any) -> dict[str, Any] | None:
    """The metrics of ``folder`` when it holds a published result of ``spec`` for ``pair``'s
    input files, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    inputs = manifest.get("inputs", {})
    wanted = {"fixed": pair.fixed, "moving": pair.moving, "fixed_labels": pair.fixed_labels,
              "moving_labels": pair.moving_labels}  # fmt: skip
    for key, path in wanted.items():
        given = inputs.get(key, {}).get("path")
        if (path is None) != (given is None):
            return None
        if path is not None and str(Path(path).resolve()) != given:
            return None
    spec_done = manifest.get("spec")
    asked = metrics.get("fallback") and metrics["fallback"].get("from")
    return metrics if spec in (spec_done, asked) else None


def summary_row(pid: str, pair: Any, status: str, metrics: dict[str, Any] | None = None,
                error: str = "") -> dict[str, Any]:  # fmt: skip
    """One row of ``summary.csv``."""
    row: dict[str, Any] = {"id": pid, "status": status, "fixed": str(pair.fixed or ""),
                           "moving": str(pair.moving or ""), "error": error}  # fmt: skip
    for key in COLUMNS:
        if metrics is not None and key in metrics and key not in row:
            row[key] = metrics[key]
    return row


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.csv``, atomically."""
    from unireg.io.files import write_atomic

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda tmp: tmp.write_text(text.getvalue()))


class _Loader:
    """Reads and checks one pair's files (run in the loader processes): ``(index, Inputs)``
    or ``(index, error message)``."""

    def __init__(self, jobs: list[tuple[int, argparse.Namespace]]) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        from unireg.cli.register import check_arguments, load_inputs
        from unireg.errors import UniregError

        index, pair_args = self.jobs[i]
        try:
            if pair_args.fixed is None or pair_args.moving is None:
                raise UniregError("the row names no fixed or no moving image")
            check_arguments(pair_args)
            return index, load_inputs(pair_args)
        except Exception as err:  # a bad pair is reported, never stops the others
            return index, f"{type(err).__name__}: {err}"


def _first(batch: list[Any]) -> Any:
    return batch[0]


def run(args: argparse.Namespace) -> int:
    """Register every pair of the CSV; write one folder per pair and ``summary.csv``."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from unireg.cli._common import device, label_names, threads
    from unireg.cli.register import check, compute, method_options, publish
    from unireg.errors import UniregError
    from unireg.evaluation.harness import pairs_from_csv
    from unireg.io.outputs import OutputFolder
    from unireg.methods import create
    from unireg.methods.registry import entries
    from unireg.training.distributed import Distributed

    threads(args)
    args.command = "batch"
    if args.workers < 0:
        raise UniregError(f"--workers must be >= 0, got {args.workers}")
    if args.batch_size < 1:
        raise UniregError(f"--batch-size must be >= 1, got {args.batch_size}")
    entry = entries()[args.method]
    options = method_options(args)  # before any file is read
    label_names(args)
    spec = options.to_spec(args.method)
    pairs = pairs_from_csv(args.pairs)
    ids = pair_ids(pairs)
    _check_ids(ids, args.pairs)
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise UniregError("exists and is not a folder; give a folder path", outdir)
    dist = Distributed.from_environment(args.device)
    dev = device(args.device) if dist.device is None else dist.device
    outdir.mkdir(parents=True, exist_ok=True)

    rows: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, argparse.Namespace]] = []
    for index, (pid, pair) in enumerate(zip(ids, pairs, strict=True)):
        if index % dist.world_size != dist.rank:
            continue
        done = completed(outdir / pid, spec, pair)
        if done is not None:
            rows[index] = summary_row(pid, pair, "done", done)
        else:
            todo.append((index, pair_arguments(args, pair, outdir / pid)))
    skipped = len(rows)
    pending = dict(todo)
    method = create(entry, options, device=str(dev)) if todo else None
    loader = DataLoader(_Loader(todo), batch_size=1, num_workers=args.workers,
                        collate_fn=_first, prefetch_factor=2 if args.workers else None)  # fmt: skip
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="pair", desc=f"{spec} ({skipped} done before)",
               disable=args.quiet or not dist.is_main)  # fmt: skip

    def record(index: int, row: dict[str, Any]) -> None:
        rows[index] = row
        bar.update(1)
        if dist.world_size == 1:
            write_summary(outdir / SUMMARY, _all_rows(rows, ids, pairs))

    def failure(index: int, err: BaseException | str) -> dict[str, Any]:
        text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        return summary_row(ids[index], pairs[index], "failed", error=text)

    def write(index: int, done: Any, inputs: Any) -> dict[str, Any]:
        # metrics and files of a computed pair, published as one folder
        try:
            with OutputFolder(outdir / ids[index], OUTPUTS, command="unireg batch") as folder:
                metrics, _ = publish(pending[index], done, inputs, folder)
            return summary_row(ids[index], pairs[index], "done", metrics)
        except Exception as err:  # one pair's failure never stops the others
            return failure(index, err)

    # a pair's metrics and files are written in a background thread while the next pair is
    # registered; at most one pair is being written at a time
    writing: tuple[int, Future[dict[str, Any]]] | None = None

    def settle() -> None:
        nonlocal writing
        if writing is not None:
            index, future = writing
            writing = None
            record(index, future.result())

    def start_writing(index: int, done: Any, inputs: Any) -> None:
        nonlocal writing
        settle()
        writing = (index, writer.submit(write, index, done, inputs))

    def run_group(group: list[tuple[int, Any]]) -> None:
        # several pairs in one network pass; a failure of the pass fails those pairs only
        try:
            results = method.register_many([(x.fixed, x.moving) for _, x in group])
        except Exception as err:
            for index, _ in group:
                record(index, failure(index, err))
            return
        for (index, inputs), result in zip(group, results, strict=True):
            try:
                done = check(pending[index], options, result, inputs, device=str(dev))
            except Exception as err:
                record(index, failure(index, err))
                continue
            start_writing(index, done, inputs)

    grouped = args.batch_size > 1 and hasattr(method, "register_many")
    group: list[tuple[int, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        try:
            for index, inputs in loader:
                if isinstance(inputs, str):
                    record(index, failure(index, inputs))
                    continue
                if grouped:
                    group.append((index, inputs))
                    if len(group) == args.batch_size:
                        run_group(group)
                        group = []
                    continue
                try:
                    done = compute(pending[index], options, method, inputs, device=str(dev))
                except Exception as err:  # one pair's failure never stops the others
                    record(index, failure(index, err))
                    continue
                start_writing(index, done, inputs)
            if group:
                run_group(group)
        finally:
            settle()  # the pair being written is finished, even on Ctrl-C
            bar.close()
            if dist.world_size == 1:
                write_summary(outdir / SUMMARY, _all_rows(rows, ids, pairs))
    failed = sum(1 for r in rows.values() if r["status"] == "failed")
    elapsed = time.perf_counter() - t0
    computed = len(todo)
    if dist.world_size > 1:
        gathered = dist.gather_objects(rows)
        computed, skipped = int(dist.sum(computed)), int(dist.sum(skipped))
        if dist.is_main:
            merged = {k: v for part in gathered for k, v in part.items()}
            write_summary(outdir / SUMMARY, _all_rows(merged, ids, pairs))
            failed = sum(1 for r in merged.values() if r["status"] == "failed")
        dist.close()
    if not args.quiet and dist.is_main:
        rate = f", {computed / elapsed:.2f} pairs/s" if computed and elapsed > 0 else ""
        print(f"{computed} pairs registered in {elapsed:.1f} s{rate} ({dist.world_size} "
              f"process{'es' if dist.world_size > 1 else ''}); {skipped} already done; "
              f"{failed} failed; summary {outdir / SUMMARY}")  # fmt: skip
    if failed and dist.is_main:
        raise UniregError(f"{failed} of {len(pairs)} pairs failed; see {outdir / SUMMARY}")
    return 0


def _all_rows(rows: dict[int, dict[str, Any]], ids: list[str], pairs: list[Any]) -> list[dict]:
    """Every pair's row in CSV order; pairs not yet reached are ``pending``."""
    return [rows.get(i) or summary_row(pid, pair, "pending")
            for i, (pid, pair) in enumerate(zip(ids, pairs, strict=True))]  # fmt: skip
