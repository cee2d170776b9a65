"""Volumes from a manifest, preprocessed to a fixed grid and cached on disk; pairs of them.

:class:`~unireg.io.preprocessing.Preprocessing` resamples every volume (in world space,
through its own affine) onto an RAS-aligned grid of a chosen spacing and shape centred on the
head, and normalises intensities.
:class:`VolumeDataset` serves the results as tensors, reading each NIfTI once: the first access
writes a ``.pt`` file to ``cache_dir`` (atomically), later accesses (and later runs) read it.
The cache key covers the source files (path, size, modification time) and the preprocessing
settings, so a changed file or setting is never served stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from unireg.data.manifest import Manifest, ManifestEntry
from unireg.io.files import write_atomic
from unireg.io.image import (
    Image,
    LabelMap,
    load_image,
    load_labels,
)
from unireg.io.preprocessing import Preprocessing

CACHE_VERSION = 1


def _file_key(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _compact_labels(labels: torch.Tensor) -> torch.Tensor:
    lo, hi = int(labels.min()), int(labels.max())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return labels.to(dtype)
    return labels


class VolumeDataset(Dataset):
    """Preprocessed volumes of a manifest, as dicts of tensors.

    Each item: ``image`` ``(1, *shape)`` float32 (when the entry has one), ``labels``
    ``(1, *shape)`` int64 (when it has them), ``affine`` ``(d+1, d+1)`` float64 voxel-to-world
    (mm, RAS+) of the output grid, and ``dataset``, ``subject``, ``modality``, ``index``.
    With a fixed ``Preprocessing.shape`` items batch with the default ``DataLoader`` collate.
    """

    def __init__(
        self,
        entries: Manifest | Sequence[ManifestEntry],
        preprocessing: Preprocessing | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.entries = list(entries)
        self.preprocessing = preprocessing or Preprocessing()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.entries)

    def cache_path(self, index: int) -> Path | None:
        """The cache file of entry ``index`` (``None`` without a cache folder)."""
        if self.cache_dir is None:
            return None
        e = self.entries[index]
        key = json.dumps(
            {
                "version": CACHE_VERSION,
                "image": _file_key(e.image),
                "labels": _file_key(e.labels),
                "preprocessing": self.preprocessing.key(),
            },
            sort_keys=True,
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{e.dataset}_{e.subject}_{e.modality}_{digest}.pt"

    def _compute(self, index: int) -> dict[str, Any]:
        e = self.entries[index]
        d = self.preprocessing.ndim
        image = None if e.image is None else load_image(e.image, ndim=d)
        labels = None if e.labels is None else load_labels(e.labels, ndim=d)
        image, labels = self.preprocessing(image, labels)
        ref = image if image is not None else labels
        assert ref is not None
        out: dict[str, Any] = {"affine": torch.from_numpy(ref.affine.copy())}
        if image is not None:
            out["image"] = image.data.float().contiguous()
        if labels is not None:
            out["labels"] = _compact_labels(labels.data)
        return out

    def load(self, index: int) -> dict[str, Any]:
        """The preprocessed tensors of entry ``index`` (from the cache when present)."""
        path = self.cache_path(index)
        if path is not None and path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # a corrupt cache file is recomputed, never trusted
                path.unlink(missing_ok=True)
        out = self._compute(index)
        if path is not None:
            write_atomic(path, lambda tmp: torch.save(out, tmp))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = self.entries[index]
        item = dict(self.load(index))
        if "labels" in item:
            item["labels"] = item["labels"].long()
        item.update(dataset=e.dataset, subject=e.subject, modality=e.modality, index=index)
        return item

    def image(self, index: int) -> Image:
        """Entry ``index``'s preprocessed image as an :class:`Image` with its world affine."""
        item = self.load(index)
        if "image" not in item:
            raise KeyError(f"entry {index} ({self.entries[index].subject}) has no image")
        return Image(item["image"], item["affine"].numpy())

    def labels(self, index: int) -> LabelMap:
        """Entry ``index``'s preprocessed label map as a :class:`LabelMap`."""
        item = self.load(index)
        if "labels" not in item:
            raise KeyError(f"entry {index} ({self.entries[index].subject}) has no label map")
        return LabelMap(item["labels"].long(), item["affine"].numpy())


def inter_subject_pairs(
    entries: Sequence[ManifestEntry], *, ordered: bool = True, same_modality: bool = True
) -> list[tuple[int, int]]:
    """Index pairs ``(fixed, moving)`` of different subjects (all ordered pairs, or each
    unordered pair once), of the same modality unless ``same_modality=False``."""
    out = []
    for i, j in permutations(range(len(entries)), 2):
        a, b = entries[i], entries[j]
        if a.subject == b.subject or (same_modality and a.modality != b.modality):
            continue
        if ordered or i < j:
            out.append((i, j))
    return out


def same_subject_pairs(
    entries: Sequence[ManifestEntry], *, ordered: bool = True
) -> list[tuple[int, int]]:
    """Index pairs ``(fixed, moving)`` of one subject in two different modalities."""
    out = []
    for i, j in permutations(range(len(entries)), 2):
        a, b = entries[i], entries[j]
        if a.subject == b.subject and a.modality != b.modality and (ordered or i < j):
            out.append((i, j))
    return out


class PairDataset(Dataset):
    """Pairs of items of a :class:`VolumeDataset`: ``{"fixed": item, "moving": item}``.

    Shuffle it reproducibly with ``DataLoader(..., shuffle=True, generator=...)``.
    """

    def __init__(self, volumes: VolumeDataset, pairs: Sequence[tuple[int, int]]) -> None:
        if not pairs:
            raise ValueError("no pairs: check the manifest selection")
        self.volumes = volumes
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.pairs[index]
        return {"fixed": self.volumes[i], "moving": self.volumes[j]}
