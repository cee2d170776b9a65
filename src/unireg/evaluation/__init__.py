"""Evaluation: methods (unireg's and peers') behind one interface, the misalignment protocol,
per-pair metrics, summary tables and plots."""

from unireg.evaluation.harness import (
    METRIC_COLUMNS,
    Pair,
    covering_geometry,
    evaluate,
    markdown_table,
    misalign,
    misalignment,
    pairs_from_csv,
    pairs_from_manifest,
    summarize,
)
from unireg.evaluation.methods import (
    AntsMethod,
    Method,
    MethodSpec,
    MissingPeerError,
    NoRegistration,
    RegisteredMethod,
    make_method,
)
from unireg.evaluation.outputs import write_outputs

__all__ = [
    "METRIC_COLUMNS",
    "AntsMethod",
    "Method",
    "MethodSpec",
    "MissingPeerError",
    "NoRegistration",
    "Pair",
    "RegisteredMethod",
    "covering_geometry",
    "evaluate",
    "make_method",
    "markdown_table",
    "misalign",
    "misalignment",
    "pairs_from_csv",
    "pairs_from_manifest",
    "summarize",
    "write_outputs",
]
