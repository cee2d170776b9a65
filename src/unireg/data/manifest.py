"""Dataset manifests: one CSV row per volume.

Columns (header required, order free): ``dataset, subject, modality, image, labels, split``.
``image`` or ``labels`` may be empty (a label-only row, as SynthSeg's label maps), not both.
Paths are relative to the manifest's folder unless absolute. ``split`` is free text; the
shared data uses ``train``, ``test`` and ``template``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from unireg.errors import ManifestError

COLUMNS = ("dataset", "subject", "modality", "image", "labels", "split")


@dataclass(frozen=True)
class ManifestEntry:
    """One volume: its dataset, subject, modality, image and/or label-map path, and split."""

    dataset: str
    subject: str
    modality: str
    image: Path | None
    labels: Path | None
    split: str


def _as_set(value: str | Sequence[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


class Manifest(Sequence[ManifestEntry]):
    """An ordered, filterable list of :class:`ManifestEntry`."""

    def __init__(self, entries: Iterable[ManifestEntry], path: Path | None = None) -> None:
        self.entries = list(entries)
        self.path = path

    @classmethod
    def read(cls, path: str | Path, *, check_files: bool = True) -> Manifest:
        """Read a manifest CSV. With ``check_files``, every listed file must exist.

        Raises :class:`ManifestError` naming the file and line of any problem.
        """
        path = Path(path)
        if not path.is_file():
            raise ManifestError("no such manifest file", path)
        root = path.parent
        entries = []
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(
                    f"missing column(s) {', '.join(missing)}; "
                    f"a manifest needs {', '.join(COLUMNS)}",
                    path,
                )
            for line, row in enumerate(reader, start=2):
                values = {c: (row.get(c) or "").strip() for c in COLUMNS}
                if not values["subject"]:
                    raise ManifestError(f"line {line}: empty subject", path)
                files: dict[str, Path | None] = {}
                for col in ("image", "labels"):
                    if values[col]:
                        p = Path(values[col])
                        files[col] = p if p.is_absolute() else root / p
                        if check_files and not files[col].is_file():  # type: ignore[union-attr]
                            raise ManifestError(
                                f"line {line}: {col} file {files[col]} does not exist", path
                            )
                    else:
                        files[col] = None
                if files["image"] is None and files["labels"] is None:
                    raise ManifestError(f"line {line}: neither an image nor a label map", path)
                entries.append(
                    ManifestEntry(
                        values["dataset"],
                        values["subject"],
                        values["modality"],
                        files["image"],
                        files["labels"],
                        values["split"],
                    )
                )
        return cls(entries, path)

    def select(
        self,
        *,
        dataset: str | Sequence[str] | None = None,
        split: str | Sequence[str] | None = None,
        modality: str | Sequence[str] | None = None,
        subject: str | Sequence[str] | None = None,
        with_image: bool = False,
        with_labels: bool = False,
    ) -> Manifest:
        """The entries matching every given filter (each a value or a list of values)."""
        wanted = {
            "dataset": _as_set(dataset),
            "split": _as_set(split),
            "modality": _as_set(modality),
            "subject": _as_set(subject),
        }
        out = [
            e
            for e in self.entries
            if all(v is None or getattr(e, k) in v for k, v in wanted.items())
            and (not with_image or e.image is not None)
            and (not with_labels or e.labels is not None)
        ]
        return Manifest(out, self.path)

    def subjects(self) -> list[str]:
        """Distinct subjects, in order of first appearance."""
        return list(dict.fromkeys(e.subject for e in self.entries))

    def __getitem__(self, index):  # type: ignore[override]
        return self.entries[index]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ManifestEntry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"Manifest({len(self)} entries, path={self.path})"
