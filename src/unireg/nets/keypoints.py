"""KeyMorph's keypoint detector: a CNN with one activation map per keypoint, turned into points
by a centre-of-mass layer (or, for the paper's ablation, a fully-connected head).

Keypoints are returned in the normalised coordinates ``[-1, 1]`` (``align_corners=True``,
tensor axis order) of the *input* grid, whatever padding the network needed; convert them to
world mm with the image's :class:`~unireg.spatial.Geometry` (``normalized_to_world``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unireg.nets.blocks import ConvBlock, conv_nd, upsample_mass, upsample_strided
from unireg.spatial.grid import axis_coordinates


class CenterOfMass(nn.Module):
    """Centre of mass of each channel of non-negative maps ``(B, K, *spatial)``: points
    ``(B, K, d)`` in the coordinates given per axis by ``coordinates`` (default: normalised
    coordinates of the map's own grid). Translation-equivariant: shifting a map shifts its
    centre by the same amount. An all-zero map gives the centre of the coordinate ranges."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(
        self, maps: torch.Tensor, coordinates: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        d = maps.ndim - 2
        if coordinates is None:
            coordinates = [
                axis_coordinates(n, device=maps.device, dtype=maps.dtype) for n in maps.shape[2:]
            ]
        total = maps.flatten(2).sum(-1)  # (B, K)
        points = []
        for axis, coords in enumerate(coordinates):
            dims = [a + 2 for a in range(d) if a != axis]
            marginal = maps.sum(dim=dims) if dims else maps  # (B, K, n_axis)
            mass = (marginal * coords.to(maps)).sum(-1)
            mid = 0.5 * (coords.min() + coords.max()).to(maps)
            points.append((mass + self.eps * mid) / (total + self.eps))
        return torch.stack(points, dim=-1)


class DecoderLevel(nn.Module):
    """One finer level of activation maps. The coarser maps are upsampled by 2
    (:func:`upsample_mass`: each map's centre of mass stays where it was, on a grid one voxel
    wider on each side than the one before) and corrected by a residual computed from the
    upsampled coarser features and the backbone's features of the finer stage (a conv block
    on their concatenation, then a convolution to one residual per map, zero outside that
    stage's grid; ReLU after the sum). The residual's convolution starts at zero, so a new
    level starts with exactly the keypoints of the coarser maps: fine-tuning a trained
    detector starts from what it did."""

    def __init__(self, ndim: int, channels: int, skip: int, num_keypoints: int):
        super().__init__()
        self.block = ConvBlock(ndim, channels + skip, skip)
        self.out = conv_nd(ndim)(skip, num_keypoints, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, maps: torch.Tensor, origin: int, features: torch.Tensor, skip: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(maps, origin, features)`` one level finer. ``origin`` is the index, on the grid
        of the stage's features, of the maps' first voxel (0 for the deepest stage; negative
        once maps extend past the features' grid)."""
        shape = skip.shape[2:]
        features = self.block(torch.cat([upsample_strided(features, shape), skip], dim=1))
        maps, origin = upsample_mass(maps), 2 * origin - 1
        pads: list[int] = []  # the residual, on the stage's grid, placed on the maps' grid
        for n, m in zip(reversed(list(shape)), reversed(maps.shape[2:]), strict=True):
            pads += [-origin, origin + m - n]
        return F.relu(maps + F.pad(self.out(features), pads)), origin, features


class KeypointDetector(nn.Module):
    """Keypoint detector: ``levels`` stages of two conv blocks (conv, instance norm, ReLU),
    each stage but the last followed by a strided conv block halving the grid, then a 1x1
    convolution to ``num_keypoints`` maps and a ReLU; :class:`CenterOfMass` turns each map into
    a point (``head="com"``). ``decoder`` > 0 makes the maps finer: each :class:`DecoderLevel`
    brings them back up one stage, corrected from the backbone's features of that stage (a
    U-Net-like decoder), so the maps have ``2**(levels - 1 - decoder)`` times fewer voxels per
    axis than the input instead of ``2**(levels - 1)``. ``head="fc"`` replaces the maps with
    average pooling to ``fc_grid`` voxels per axis and two fully-connected layers (tanh
    output), the ablation of KeyMorph.

    Any input size: the input is zero-padded to a multiple of ``2**(levels - 1)`` (split
    evenly) and keypoints are expressed in the unpadded input's normalised coordinates.
    The constructor arguments are kept in ``self.config`` so a checkpoint can rebuild it.
    """

    def __init__(
        self,
        ndim: int = 3,
        in_channels: int = 1,
        num_keypoints: int = 128,
        channels: Sequence[int] = (16, 32, 64, 128),
        head: str = "com",
        fc_grid: int = 4,
        decoder: int = 0,
    ):
        super().__init__()
        if not 1 <= num_keypoints <= 4096:
            raise ValueError(f"num_keypoints must be in 1..4096, got {num_keypoints}")
        if head not in ("com", "fc"):
            raise ValueError(f"head must be 'com' or 'fc', got {head!r}")
        if not 0 <= decoder < len(channels) or (decoder and head != "com"):
            msg = f"decoder must be in 0..{len(channels) - 1} with the 'com' head, got {decoder}"
            raise ValueError(msg)
        self.config = {
            "ndim": ndim, "in_channels": in_channels, "num_keypoints": num_keypoints,
            "channels": list(channels), "head": head, "fc_grid": fc_grid,
        }  # fmt: skip
        if decoder:  # only when set: checkpoints without a decoder keep their config
            self.config["decoder"] = decoder
        self.ndim, self.num_keypoints, self.head = ndim, num_keypoints, head
        self.stride = 2 ** (len(channels) - 1)
        self.map_stride = 2 ** (len(channels) - 1 - decoder)
        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of each stage's last layer in the backbone
        cin = in_channels
        for i, c in enumerate(channels):
            if i > 0:
                layers.append(ConvBlock(ndim, cin, c, stride=2))
                cin = c
            layers += [ConvBlock(ndim, cin, c), ConvBlock(ndim, c, c)]
            self.stage_ends.append(len(layers) - 1)
            cin = c
        self.backbone = nn.Sequential(*layers)
        # decoder level r joins the stage r + 1 levels below the deepest
        self.decoder = nn.ModuleList(
            DecoderLevel(ndim, channels[-1 - r], channels[-2 - r], num_keypoints)
            for r in range(decoder)
        )
        if head == "com":
            self.maps = conv_nd(ndim)(cin, num_keypoints, 1)
            self.com = CenterOfMass()
        else:
            self.pool_shape = (fc_grid,) * ndim
            self.fc = nn.Sequential(
                nn.Flatten(),
                nn.Linear(cin * fc_grid**ndim, 512),
                nn.ReLU(inplace=True),
                nn.Linear(512, num_keypoints * ndim),
                nn.Tanh(),
            )

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        before, pads = [], []
        for n in reversed(x.shape[2:]):  # F.pad lists the last axis first
            extra = (-n) % self.stride
            pads += [extra // 2, extra - extra // 2]
        for n in x.shape[2:]:
            before.append(((-n) % self.stride) // 2)
        return F.pad(x, pads), before

    def activation_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Non-negative maps ``(B, K, *coarse)`` and, per axis, the input-normalised
        coordinate of each coarse voxel (output voxel ``j`` is centred on padded input voxel
        ``(j + origin) * map_stride``, ``origin`` 0 without a decoder)."""
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected a {self.ndim}D batch (B, C, ...), got {tuple(x.shape)}")
        shape = x.shape[2:]
        padded, before = self._pad(x)
        maps, origin = self._maps(padded)
        coords = []
        for n, b, m in zip(shape, before, maps.shape[2:], strict=True):
            vox = (torch.arange(m, device=x.device, dtype=x.dtype) + origin) * self.map_stride - b
            coords.append(2 * vox / max(n - 1, 1) - 1 if n > 1 else vox * 0)
        return maps, coords

    def _maps(self, padded: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Maps of the deepest stage, brought up by the decoder levels, and the index
        (in map voxels, from padded input voxel 0) of their first voxel."""
        if not len(self.decoder):
            return F.relu(self.maps(self.backbone(padded))), 0
        stages, out = [], padded
        for i, layer in enumerate(self.backbone):
            out = layer(out)
            if i in self.stage_ends:
                stages.append(out)
        maps, origin = F.relu(self.maps(out)), 0
        for r, level in enumerate(self.decoder):
            maps, origin, out = level(maps, origin, out, stages[-2 - r])
        return maps, origin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keypoints ``(B, K, d)`` in the input's normalised coordinates (tensor axis order)."""
        if self.head == "com":
            maps, coords = self.activation_maps(x)
            # the centres in float32 even when the maps came from bfloat16 convolutions
            with torch.autocast(x.device.type, enabled=False):
                return self.com(maps.float(), coords)
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected a {self.ndim}D batch (B, C, ...), got {tuple(x.shape)}")
        features = self.backbone(self._pad(x)[0])
        pooled = F.adaptive_avg_pool3d if self.ndim == 3 else F.adaptive_avg_pool2d
        out = self.fc(pooled(features, self.pool_shape)).float()
        return out.view(x.shape[0], self.num_keypoints, self.ndim)
