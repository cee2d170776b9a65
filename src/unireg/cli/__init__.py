"""The ``unireg`` command line: one module per verb.

Building the parser imports only argparse and the method registry (plain Python), so
``unireg --help`` and ``unireg VERB --help`` start at once; each verb imports torch and the
code it runs only when it runs.

Exit codes: 0 success; 1 a named error (bad input, option or output path, or a read or write
the system refused: one line naming the file and the problem); 2 a command-line usage error;
3 an unexpected internal error (one line; ``--debug`` prints the traceback); 4 out of memory;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from unireg import __version__
from unireg.errors import UniregError

# verb (module unireg.cli.VERB) -> its line in ``unireg --help``, in that order
VERBS = {
    "register": "register a moving image onto a fixed image",
    "batch": "register every pair of a CSV in one process (resumable; torchrun-aware)",
    "apply": "apply saved transform(s) to an image or label map",
    "metrics": "Dice and HD95 between two label maps",
    "evaluate": "run methods side by side on pairs under misalignment; tables and plots",
    "train": "train a learned method from a config file",
    "models": "list the methods, their options and shipped models",
    "view": "write an interactive HTML report (NiiVue) of a register output folder",
    "demo": "register two real brains shipped with unireg and write a report",
    "synthesize": "draw a synthetic image of random contrast from a label map",
    "strip": "brain mask and brain-extracted image of an image of any contrast",
    "info": "print grid, orientation and range of image files",
}


EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_MEMORY, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def add_orientation_flag(p: argparse.ArgumentParser) -> None:
    """``--assume-orientation``: axis codes for input files that carry no orientation."""
    p.add_argument(
        "--assume-orientation",
        default=None,
        metavar="CODES",
        help="for NIfTI inputs with qform and sform codes 0 (no orientation), which are refused "
        "otherwise: the directions of the array axes, e.g. RAS or LPS (voxel sizes from the "
        "header, centred on the origin); files with an orientation keep theirs",
    )


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads``: CPU threads for the tensor work (default: the CPUs other processes left
    idle while the command started, or ``OMP_NUM_THREADS`` when set)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for the computation (default: OMP_NUM_THREADS when set, else the "
        "CPUs not kept busy by other processes while the command starts, so a shared machine "
        "does not slow it down several times)",
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags every image-writing verb ends with: ``--device``, ``--assume-orientation``,
    ``--quiet`` and ``--threads``."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_orientation_flag(p)
    p.add_argument("--quiet", "-q", action="store_true")
    add_threads_flag(p)


def add_report_options(p: argparse.ArgumentParser) -> None:
    """``--report-resolution`` and ``--label-names``: the report page's grid and names."""
    p.add_argument(
        "--report-resolution",
        type=float,
        default=2.0,
        metavar="MM",
        help="voxel size (mm) of the volumes report.html embeds; images finer than this are "
        "resampled, coarser ones kept (default 2: a few MB per page for 1 mm volumes)",
    )
    p.add_argument(
        "--label-names",
        default=None,
        metavar="FILE",
        help="names of the label values for report.html: a CSV with a header (an integer "
        "column and a name column, as DLMUSE's MUSE_listROIs.csv), FreeSurfer's colour table "
        "(FreeSurferColorLUT.txt) or a JSON object",
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``unireg`` command (no torch, no NumPy). With ``argv``, only
    the verb it names gets its full parser (the others a placeholder with their help line),
    so a command starts without building every verb's options."""
    parser = argparse.ArgumentParser(
        prog="unireg",
        description="unireg: learning-based medical image registration in physical space.",
    )
    parser.add_argument("--version", action="version", version=f"unireg {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback (may also be given after the verb)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = None if argv is None else next((a for a in argv if a in VERBS), "")
    for verb, line in VERBS.items():
        if named is not None and verb != named:
            sub.add_parser(verb, help=line, add_help=False)
            continue
        module = importlib.import_module(f"unireg.cli.{verb}")
        p = module.add_parser(sub)
        p.set_defaults(verb_module=module.__name__)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unireg`` console script."""
    from unireg import cpu

    cpu.start()  # measures how busy the CPUs are while the verb imports its libraries
    cpu.retain_freed_memory()  # large tensors reuse freed blocks (see its docstring)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.command_line = ["unireg", *argv]
    where = f"unireg {args.command}"
    pause_gc()  # until the verb has imported torch (see imports_done)
    try:
        return int(importlib.import_module(args.verb_module).run(args))
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return 0
    except UniregError as e:
        _report(where, f"{type(e).__name__}: {e}", debug)
        return EXIT_ERROR
    except OSError as e:  # the system refused a read or write (disk full, permissions, ...)
        _report(where, f"{type(e).__name__}: {e}", debug)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _report(where, "interrupted; no output was published", debug)
        return EXIT_INTERRUPTED
    except MemoryError as e:
        _report(where, f"out of memory ({e or 'allocation failed'}); try smaller images, "
                "--device cuda, or fewer threads", debug)  # fmt: skip
        return EXIT_MEMORY
    except Exception as e:
        _report(where, f"internal error ({type(e).__name__}: {e}); rerun with --debug for the "
                "traceback and report it", debug)  # fmt: skip
        return EXIT_INTERNAL
    finally:
        imports_done()  # a verb that never imported torch


_gc_paused = False


def pause_gc() -> None:
    """Turn Python's cyclic garbage collector off while a command imports its libraries:
    importing torch creates hundreds of thousands of objects, and the full collections that
    their growth triggers cost about 0.1 s of every command, for almost no garbage. A no-op
    when torch is already imported or the collector already off. :func:`imports_done` turns
    it back on."""
    global _gc_paused
    if gc.isenabled() and "torch" not in sys.modules:
        gc.disable()
        _gc_paused = True


def imports_done() -> None:
    """The command's libraries are imported: move every object alive now out of the
    collector's sight (:func:`gc.freeze`; they live as long as the process) and turn the
    collector back on, when :func:`pause_gc` turned it off. Called once torch is imported."""
    global _gc_paused
    if _gc_paused:
        gc.freeze()
        gc.enable()
        _gc_paused = False


def console() -> NoReturn:
    """The ``unireg`` console script and ``python -m unireg``: :func:`main`, then
    :func:`exit_now` with its exit code."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process with ``code``: the ``atexit`` handlers run and the standard streams are
    flushed, as at a normal exit, but the interpreter's finalisation is skipped when torch is
    loaded (tearing down torch's modules adds about 0.35 s to every command on a CPU). A
    normal :func:`sys.exit` when torch was not imported, when another non-daemon thread is
    still running (a normal exit waits for it) or when ``UNIREG_NO_FAST_EXIT`` is set."""
    import threading

    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]  # fmt: skip
    if "torch" not in sys.modules or others or os.environ.get("UNIREG_NO_FAST_EXIT"):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)


def _report(where: str, message: str, debug: bool) -> None:
    """One line on stderr; with ``--debug`` the traceback first."""
    if debug:
        import traceback

        traceback.print_exc()
    first = message.strip().splitlines()[0] if message.strip() else message
    print(f"{where}: error: {first}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    console()
