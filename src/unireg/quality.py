"""Never silently worse than doing nothing: a registration's result scored against no
registration (and, for a deformable result, against its own linear stage).

The score is the mutual information (nats, 32-bin Parzen histogram, every voxel) between the
fixed image and the moving image resampled onto the fixed grid, over the fixed image's
foreground (normalised intensity above 0.05). Mutual information serves any pair of contrasts,
so one check covers every method. The moving image is normalised once, before resampling, so
the three candidates differ only by the map:

- ``identity``: the moving image where its header puts it (no registration);
- ``linear``: through the result's linear part (deformable results only);
- ``result``: through the whole transform.

A result whose score is below a candidate's by more than ``margin`` (relative, 1 % by default)
gets a ``quality_warning``. The margin was fixed before any evaluation: it only absorbs
interpolation differences between nearly equal maps.
"""

from __future__ import annotations

from typing import Any

import torch

from unireg.io.image import Image, normalize_intensity, resample
from unireg.losses import mutual_information
from unireg.spatial.transform import AffineTransform, Transform

MARGIN = 0.01  # relative: a result may score up to 1 % below a baseline without a warning


def _first_channel(image: Image) -> Image:
    return image if image.data.shape[0] == 1 else image.with_data(image.data[:1])


def similarity_scores(
    fixed: Image, moving: Image, maps: dict[str, Transform | None]
) -> dict[str, float]:
    """Mutual information (nats) of ``fixed`` with ``moving`` through each map (None: the
    identity world map), over the fixed image's foreground."""
    f = normalize_intensity(_first_channel(fixed))
    m = normalize_intensity(_first_channel(moving))
    mask = (f.data > 0.05).float()[None]
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    out = {}
    for name, transform in maps.items():
        warped = resample(m, f.geometry, transform).data[None].to(f.data)
        out[name] = float(-mutual_information(f.data[None], warped, mask=mask))
    return out


def quality_check(
    result: Any, fixed: Image, moving: Image, *, margin: float = MARGIN
) -> dict[str, Any]:
    """Score ``result`` (a :class:`~unireg.result.RegistrationResult`) against no
    registration and, when deformable, its own linear stage; returns ``quality_mi_*`` scores
    and ``quality_warning`` (None when the result is at least as good as each baseline)."""
    maps: dict[str, Transform | None] = {"identity": None}
    linear = result.affine
    deformable = not isinstance(result.transform, AffineTransform)
    if deformable and linear is not None:
        maps["linear"] = linear
    maps["result"] = result.transform
    scores = similarity_scores(fixed, moving, maps)
    warning = None
    for name, what in (("identity", "no registration"), ("linear", "its own linear stage")):
        if name in scores and scores["result"] < scores[name] * (1.0 - margin):
            warning = (
                f"the result aligns the images worse than {what} (mutual information "
                f"{scores['result']:.4f} < {scores[name]:.4f} nats)"
            )
            break
    out: dict[str, Any] = {f"quality_mi_{k}": v for k, v in scores.items()}
    out["quality_warning"] = warning
    return out
