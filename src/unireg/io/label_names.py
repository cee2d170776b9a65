"""Label-name tables: which structure each value of a label map is.

Three formats are read:

- CSV with a header: the label value from the first column whose values are all integers
  (``Index``, ``label``, ...), the name from a column called ``name``/``Name``/``label_name``
  (else the next text column). DLMUSE's ``MUSE_listROIs.csv`` is one.
- FreeSurfer's colour table (``FreeSurferColorLUT.txt``): ``value name R G B A`` per line,
  ``#`` comments.
- JSON: an object from value to name.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from unireg.errors import UnreadableFileError
from unireg.io.files import check_input_file


def _is_int(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True


def read_label_names(path: str | Path) -> dict[int, str]:
    """The names of a label table, by label value. A named
    :class:`~unireg.errors.UnreadableFileError` when the file is none of the formats, a
    value is not an integer, or the table is empty."""
    path = Path(path)
    check_input_file(path, "label names")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableFileError(f"cannot read the label-name table ({err})", path) from err
    names: dict[int, str] = {}
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
            names = {int(k): str(v) for k, v in table.items()}
        except (ValueError, AttributeError) as err:
            raise UnreadableFileError(f"not a JSON object of value: name ({err})", path) from err
    elif path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
        if len(rows) < 2:
            raise UnreadableFileError("a label-name CSV needs a header and rows", path)
        header, body = [h.strip() for h in rows[0]], rows[1:]
        width = min(len(r) for r in body)
        integer = [i for i in range(min(width, len(header))) if all(_is_int(r[i]) for r in body)]
        if not integer:
            raise UnreadableFileError("no column of integer label values", path)
        value = integer[0]
        lowered = [h.lower() for h in header]
        named = [i for i, h in enumerate(lowered) if h in ("name", "label_name", "structure")]
        text_cols = [i for i in range(min(width, len(header))) if i not in integer]
        column = named[0] if named else (text_cols[0] if text_cols else None)
        if column is None:
            raise UnreadableFileError("no column of names", path)
        names = {int(r[value]): r[column].strip() for r in body}
    else:  # FreeSurfer colour table
        for number, line in enumerate(text.splitlines(), start=1):
            cells = line.split("#", 1)[0].split()
            if not cells:
                continue
            if len(cells) < 2 or not _is_int(cells[0]):
                raise UnreadableFileError(
                    f"line {number} is not 'value name [R G B A]': {line.strip()!r}", path
                )
            names[int(cells[0])] = cells[1]
    if not names:
        raise UnreadableFileError("the label-name table is empty", path)
    return names
