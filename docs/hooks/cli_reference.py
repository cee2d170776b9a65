"""MkDocs hook: the command-line reference, rendered from the parser itself."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- unireg-cli-reference -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from unireg.cli import VERBS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    parts = ["```text", parser.format_help().rstrip(), "```"]
    for verb in VERBS:
        parts += [f"## unireg {verb}", "", "```text", sub.choices[verb].format_help().rstrip(),
                  "```", ""]  # fmt: skip
    return markdown.replace(MARKER, "\n".join(parts))
