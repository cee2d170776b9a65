"""Brain masks of images of any contrast, and pairs matched in brain extraction.

A brain-extracted image (zero outside the brain) registered against a whole head defeats
intensity similarities: the head's scalp, skull and neck have nothing to match, and the
linear stage aligns the brain with the head. :func:`match_extraction` finds such pairs and
strips the whole head with the network's brain mask, so that both images show a brain.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unireg.errors import UniregError
from unireg.io.image import Image, LabelMap, resample
from unireg.io.preprocessing import Preprocessing
from unireg.methods.base import Method, Prompts, models_dir
from unireg.methods.extraction import MODEL_FILE
from unireg.methods.extraction.model import BrainMaskNet
from unireg.methods.pipeline import network_grid, network_input
from unireg.result import RegistrationResult
from unireg.spatial.geometry import Geometry, apply_matrix_np
from unireg.training.checkpoint import Checkpoint, read_checkpoint

# an image may be brain-extracted only if at least this share of its voxels hold its minimum
# exactly (extraction tools zero the background; scanners leave noise, and heads padded with
# zeros keep less: 0.33-0.49 for the IXI training T1s, whose background is zeroed)
MIN_SHARE = 0.6
# ... and it is, if fewer than this share of its other voxels lie beyond MARGIN_MM of its
# predicted brain mask (a head has scalp, skull and neck there: 0.62-0.71 of the IXI training
# heads, 0.83-0.87 of whole heads drawn from SynthSeg maps; images stripped by their labels
# 0.004-0.06)
OUTSIDE_SHARE = 0.25
MARGIN_MM = 8.0
# a head registered against a brain-extracted image keeps this margin (mm) around its brain
# mask, as extraction tools leave one (on the first 6 IXI training pairs with a brain-only
# synthetic moving image, the affine solver's Dice 0.291 with the mask itself, 0.402 with
# one 2 mm voxel around it, 0.385 with two)
STRIP_MARGIN_MM = 2.0


def load_brain_model(
    path: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[BrainMaskNet, Checkpoint]:
    """The brain-mask network of checkpoint ``path`` (the shipped ``brainmask_4mm.pt`` when
    None), in eval mode on ``device``; a :class:`~unireg.errors.UniregError` naming the file
    when it is missing or not a brain-mask checkpoint."""
    file = Path(path) if path is not None else models_dir() / MODEL_FILE
    if not file.is_file():
        raise UniregError("no brain-mask model (train one: unireg train brainmask ...)", file)
    try:
        checkpoint = read_checkpoint(file)
    except (FileNotFoundError, ValueError) as err:
        raise UniregError(str(err)) from err
    if checkpoint.method != "brainmask":
        raise UniregError(f"a {checkpoint.method} checkpoint, not a brain-mask one", file)
    model = BrainMaskNet.from_config(checkpoint.model_config)
    model.load_state_dict(checkpoint.float_state())
    return model.to(device).eval(), checkpoint


@functools.lru_cache(maxsize=2)
def _shipped(device: torch.device) -> tuple[BrainMaskNet, Checkpoint]:
    return load_brain_model(device=device)


def brain_probability(
    image: Image,
    model: tuple[BrainMaskNet, Checkpoint] | None = None,
    device: torch.device | str = "cpu",
) -> Image:
    """The network's probability that each voxel of ``image`` is brain, on ``image``'s grid.

    The image (first channel) is seen on the network's grid (its training spacing and shape,
    RAS, intensities to [0, 1]) twice: centred on the image's centre of mass, then on the
    brain that pass found (a head with its neck in view has its centre of mass low enough that
    the first grid may cut the top of the brain). The sigmoid of the second pass's logits is
    resampled back (linear; zero beyond the grid). ``model``: a loaded model and its
    checkpoint (the shipped one when None)."""
    dev = torch.device(device)
    net, checkpoint = model if model is not None else _shipped(dev)

    def run(grid: Geometry) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(net(network_input(image, grid).to(dev)))[0].float().cpu()

    grid = network_grid(checkpoint, image)
    prob = run(grid)
    inside = (prob[0] >= 0.5).nonzero().double()
    if len(inside):  # the training grid placed on the brain's centre, in the image's voxels
        centre = apply_matrix_np(grid.voxel_to_world, inside.mean(0).numpy()[None])
        voxel = apply_matrix_np(image.geometry.world_to_voxel, centre)[0]
        grid = Preprocessing.from_settings(checkpoint.preprocessing, image.ndim).target_geometry(
            image, voxel
        )
        prob = run(grid)
    return resample(Image(prob, grid.voxel_to_world), image.geometry)


def brain_mask(
    image: Image,
    model: tuple[BrainMaskNet, Checkpoint] | None = None,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
) -> LabelMap:
    """The brain mask of ``image`` on its grid (uint8, 1 inside): :func:`brain_probability`
    at ``threshold``, its largest connected component with the holes filled. With the shipped
    model, the masks of the last few images asked for are kept: the same image object, its
    data unchanged and on the same grid, is not run through the network again (a method that
    reads the pair its ``brain = "auto"`` wrapper has just read)."""
    from scipy import ndimage  # imported on first use: 0.1 s the plain pairs need not pay

    key = None
    if model is None:
        key = (image.data._version, image.affine.tobytes(), str(device), threshold)
        kept = _MASKS.get(id(image.data))
        if kept is not None and kept[0]() is image.data and kept[1] == key:
            return kept[2]
    prob = brain_probability(image, model, device).data[0].numpy()
    inside = prob >= threshold
    out = np.zeros(inside.shape, dtype=np.uint8)
    if inside.any():  # within the mask's box and one voxel more: the same components and holes
        box = _box(inside, [1] * inside.ndim)
        seen = inside[box]
        parts, count = ndimage.label(seen)
        if count > 1:
            sizes = np.bincount(parts.ravel())[1:]
            seen = parts == 1 + int(np.argmax(sizes))
        out[box] = ndimage.binary_fill_holes(seen)
    mask = LabelMap(torch.from_numpy(out)[None], image.affine)
    if key is not None:
        _MASKS[id(image.data)] = (weakref.ref(image.data), key, mask)
        while len(_MASKS) > 4:
            _MASKS.pop(next(iter(_MASKS)))
    return mask


# the shipped model's last masks, by the identity of the image's data: (a weak reference to
# the data, its version, grid, device and threshold, the mask)
_MASKS: dict[int, tuple[weakref.ref, tuple, LabelMap]] = {}


def _box(inside: np.ndarray, pad: Sequence[int]) -> tuple[slice, ...]:
    """The slices of the bounding box of ``inside`` (not empty) grown by ``pad`` voxels per
    axis, within the array."""
    box = []
    for axis, (size, grow) in enumerate(zip(inside.shape, pad, strict=True)):
        others = tuple(a for a in range(inside.ndim) if a != axis)
        hit = np.flatnonzero(inside.any(axis=others))
        box.append(slice(max(int(hit[0]) - grow, 0), min(int(hit[-1]) + 1 + grow, size)))
    return tuple(box)


def _margin_voxels(spacing: Sequence[float], margin_mm: float) -> list[int]:
    """Voxels per axis beyond which a point is farther than ``margin_mm`` along that axis."""
    return [int(np.ceil(margin_mm / s)) + 1 for s in spacing]


def background_share(image: Image) -> float:
    """The share of ``image``'s voxels (first channel) that hold its minimum exactly."""
    data = image.data[0]
    return float((data == data.min()).float().mean())


def outside_share(image: Image, mask: LabelMap, margin_mm: float = MARGIN_MM) -> float:
    """The share of ``image``'s voxels above its minimum that lie farther than ``margin_mm``
    (world mm) from ``mask``."""
    from scipy import ndimage  # imported on first use: 0.1 s the plain pairs need not pay

    data = image.data[0]
    foreground = (data > data.min()).numpy()
    if not foreground.any():
        return 0.0
    inside = mask.data[0].numpy() > 0
    if not inside.any():
        return 1.0
    # distances only within the mask's box grown by the margin: beyond it every voxel is
    # farther than the margin
    box = _box(inside, _margin_voxels(image.spacing, margin_mm))
    distance = ndimage.distance_transform_edt(~inside[box], sampling=image.spacing)
    far = foreground.copy()
    far[box] &= distance > margin_mm
    return float(far.sum() / foreground.sum())


def is_brain_extracted(
    image: Image,
    mask: LabelMap | None = None,
    model: tuple[BrainMaskNet, Checkpoint] | None = None,
    device: torch.device | str = "cpu",
) -> bool:
    """Whether ``image`` shows a brain alone: at least :data:`MIN_SHARE` of its voxels at its
    minimum and fewer than :data:`OUTSIDE_SHARE` of the rest beyond :data:`MARGIN_MM` of its
    brain mask (``mask``, or :func:`brain_mask` with ``model`` on ``device``)."""
    if background_share(image) < MIN_SHARE:
        return False
    mask = mask if mask is not None else brain_mask(image, model, device)
    return outside_share(image, mask) < OUTSIDE_SHARE


def dilated(mask: LabelMap, margin_mm: float) -> LabelMap:
    """``mask`` grown by every voxel within ``margin_mm`` (world mm) of it."""
    from scipy import ndimage  # imported on first use: 0.1 s the plain pairs need not pay

    inside = mask.data[0].numpy() > 0
    if margin_mm <= 0 or not inside.any():
        return mask
    box = _box(inside, _margin_voxels(mask.spacing, margin_mm))
    distance = ndimage.distance_transform_edt(~inside[box], sampling=mask.spacing)
    grown = np.zeros(inside.shape, dtype=np.uint8)
    grown[box] = distance <= margin_mm
    return LabelMap(torch.from_numpy(grown)[None], mask.affine)


def strip(image: Image, mask: LabelMap) -> Image:
    """``image`` set to its minimum outside ``mask`` (same grid; each channel)."""
    inside = (mask.data > 0).to(image.data.device)
    low = image.data.flatten(1).min(dim=1).values.view(-1, *[1] * image.ndim)
    return image.with_data(torch.where(inside, image.data, low))


def match_extraction(
    fixed: Image,
    moving: Image,
    model: tuple[BrainMaskNet, Checkpoint] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Image, Image, str]:
    """``(fixed, moving, stripped)``: when exactly one of the two images is brain-extracted
    (:func:`is_brain_extracted`), the other stripped to its brain mask and a margin of
    :data:`STRIP_MARGIN_MM` (``stripped`` names it: ``"fixed"`` or ``"moving"``); otherwise
    both as given and ``""``. The network runs only on images that may be brain-extracted
    (:data:`MIN_SHARE`) and, when one is, on the other."""
    images = [fixed, moving]
    masks: list[LabelMap | None] = [None, None]
    extracted = [False, False]
    for i, image in enumerate(images):
        if background_share(image) >= MIN_SHARE:
            mask = masks[i] = brain_mask(image, model, device)
            extracted[i] = is_brain_extracted(image, mask)
    if extracted[0] == extracted[1]:
        return fixed, moving, ""
    head = 0 if extracted[1] else 1
    known = masks[head]
    mask = known if known is not None else brain_mask(images[head], model, device)
    images[head] = strip(images[head], dilated(mask, STRIP_MARGIN_MM))
    return images[0], images[1], ("fixed", "moving")[head]


class ExtractionMatched:
    """A :class:`~unireg.methods.base.Method` run on the pair :func:`match_extraction` makes
    of its inputs (``brain = "auto"``): the transform is the method's; the warped image is the
    given moving image's, and the time includes the masks. Other attributes are the method's."""

    def __init__(self, method: Method, device: str = "cpu") -> None:
        self.method, self.device = method, device
        self.entry, self.options = method.entry, method.options

    def register(
        self,
        fixed: Image,
        moving: Image,
        *,
        prompts: Prompts | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> RegistrationResult:
        t0 = time.perf_counter()
        seen_f, seen_m, stripped = match_extraction(fixed, moving, device=self.device)
        seconds = time.perf_counter() - t0
        if stripped and progress is not None:
            progress(f"brain-extracted against a whole head: the {stripped} image stripped")
        result = self.method.register(seen_f, seen_m, prompts=prompts, seed=seed,
                                      progress=progress)  # fmt: skip
        return _given(result, moving, fixed, stripped, seconds)

    def __getattr__(self, name: str) -> Any:
        # everything else is the method's (its model, ...); its batch registration
        # (``register_many``), where it has one, runs on the matched pairs
        if name == "method":  # not set yet
            raise AttributeError(name)
        found = getattr(self.method, name)
        return self._register_many if name == "register_many" else found

    def _register_many(self, pairs: Sequence[tuple[Image, Image]]) -> list[RegistrationResult]:
        matched, seconds = [], []
        for fixed, moving in pairs:
            t0 = time.perf_counter()
            matched.append(match_extraction(fixed, moving, device=self.device))
            seconds.append(time.perf_counter() - t0)
        results = self.method.register_many([(f, m) for f, m, _ in matched])
        rows = zip(results, pairs, matched, seconds, strict=True)
        return [_given(r, moving, fixed, m[2], t) for r, (fixed, moving), m, t in rows]


def _given(
    result: RegistrationResult, moving: Image, fixed: Image, stripped: str, seconds: float
) -> RegistrationResult:
    """``result`` of the matched pair as a result of the given one: the given moving image
    warped when it was the one stripped, the masks' ``seconds`` in its time."""
    changes: dict[str, Any] = {"extras": dataclasses.replace(result.extras,
                                                             brain_stripped=stripped)}  # fmt: skip
    if result.elapsed is not None:
        changes["elapsed"] = result.elapsed + seconds
    if stripped == "moving":
        changes["warped"] = resample(moving, fixed.geometry, result.transform)
    return dataclasses.replace(result, **changes)
