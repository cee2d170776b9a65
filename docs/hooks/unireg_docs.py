"""MkDocs hooks: the command-line reference rendered from the parser itself; Sphinx roles in
docstrings shown as plain code."""

from __future__ import annotations

import re
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


_ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|exc):<code>~?([^<]*)</code>")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Docstrings cross-reference in Sphinx's roles (``:class:`~a.B```): show the name alone
    (the last part where the docstring asked for ``~``)."""

    def name(match: re.Match[str]) -> str:
        target = match.group(1)
        short = target.rsplit(".", 1)[-1] if match.group(0).find("~") >= 0 else target
        return f"<code>{short}</code>"

    return _ROLE.sub(name, html)
