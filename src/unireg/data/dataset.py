"""Volumes from a manifest, preprocessed to a fixed grid and cached on disk; pairs of them.

:class:`Preprocessing` resamples every volume (in world space, through its own affine) onto an
RAS-aligned grid of a chosen spacing and shape centred on the head, and normalises intensities.
:class:`VolumeDataset` serves the results as tensors, reading each NIfTI once: the first access
writes a ``.pt`` file to ``cache_dir`` (atomically), later accesses (and later runs) read it.
The cache key covers the source files (path, size, modification time) and the preprocessing
settings, so a changed file or setting is never served stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import permutations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from unireg.data.manifest import Manifest, ManifestEntry
from unireg.io.files import write_atomic
from unireg.io.image import (
    Image,
    LabelMap,
    check_same_grid,
    load_image,
    load_labels,
    normalize_intensity,
    resample,
)
from unireg.spatial.geometry import Geometry, apply_matrix_np

CACHE_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """How volumes are brought to a common grid.

    Attributes:
        spacing: output voxel size in mm (one value or one per axis).
        shape: output grid shape; ``None`` covers the whole input field of view.
        center: ``"fov"`` centres the grid on the input's field of view, ``"mass"`` on the
            centre of mass of the intensity above the image's minimum (of the label map's
            foreground for label-only volumes).
        normalize: rescale intensities to [0, 1] by the 0.5/99.5 percentiles.
        ndim: 2 or 3.
    """

    spacing: float | tuple[float, ...] = 2.0
    shape: tuple[int, ...] | None = None
    center: Literal["fov", "mass"] = "mass"
    normalize: bool = True
    ndim: int = 3

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], ndim: int = 3) -> Preprocessing:
        """The grid a checkpointed network was trained on (its payload's ``preprocessing``)."""
        pre = payload.get("preprocessing", {})
        return cls(
            spacing=float(pre.get("spacing_mm", 2.0)), shape=tuple(pre.get("shape", (96, 112, 96))),
            center=pre.get("center", "mass"), ndim=ndim,
        )  # fmt: skip

    def spacing_tuple(self) -> tuple[float, ...]:
        sp = self.spacing
        out = (float(sp),) * self.ndim if isinstance(sp, int | float) else tuple(map(float, sp))
        if len(out) != self.ndim or min(out) <= 0:
            raise ValueError(f"spacing must be {self.ndim} positive values, got {sp}")
        return out

    def target_geometry(self, source: Image) -> Geometry:
        """The RAS-aligned output grid for a volume on ``source``'s grid."""
        geom = source.geometry
        d = self.ndim
        spacing = np.array(self.spacing_tuple())
        if self.center == "mass":
            if source.is_label:
                weights = (source.data[0] > 0).double()
            else:  # intensity above the image minimum (air in MRI and in CT alike)
                weights = source.data.double().sum(0)
                weights = weights - weights.min()
            total = float(weights.sum())
            if total <= 0:
                center = geom.center_world
            else:
                idx = torch.meshgrid(
                    *[torch.arange(n, dtype=torch.float64) for n in geom.shape], indexing="ij"
                )
                vox = np.array([float((weights * i).sum()) / total for i in idx])
                center = apply_matrix_np(geom.voxel_to_world, vox[None])[0]
        elif self.center == "fov":
            center = geom.center_world
        else:
            raise ValueError(f"center must be 'fov' or 'mass', got {self.center!r}")
        if self.shape is None:
            corners = np.array(np.meshgrid(*[[0, n - 1] for n in geom.shape], indexing="ij"))
            world = apply_matrix_np(geom.voxel_to_world, corners.reshape(d, -1).T)
            extent = world.max(0) - world.min(0)
            shape = tuple(
                int(np.ceil(e / s - 1e-6)) + 1 for e, s in zip(extent, spacing, strict=True)
            )
        else:
            shape = tuple(int(n) for n in self.shape)
            if len(shape) != d:
                raise ValueError(f"shape {shape} is not {d}D")
        affine = np.eye(d + 1)
        affine[:d, :d] = np.diag(spacing)
        affine[:d, d] = center - spacing * (np.array(shape) - 1) / 2
        return Geometry(shape, affine)

    def __call__(
        self, image: Image | None, labels: LabelMap | None = None
    ) -> tuple[Image | None, LabelMap | None]:
        """Resample an image and/or its label map (on the image's grid) onto the output grid."""
        if image is None and labels is None:
            raise ValueError("nothing to preprocess")
        if image is not None and labels is not None:
            check_same_grid(image, labels)
        source = image if image is not None else labels
        assert source is not None
        geom = self.target_geometry(source)
        out_image = out_labels = None
        if image is not None:
            out_image = resample(image, geom)
            if self.normalize:
                out_image = normalize_intensity(out_image)
        if labels is not None:
            out = resample(labels, geom, mode="nearest")
            assert isinstance(out, LabelMap)
            out_labels = out
        return out_image, out_labels

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(self.spacing_tuple())
        return d


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
