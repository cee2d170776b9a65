"""Linear transform models (rigid, similarity, affine) and their initialisation.

A model holds a batch of fixed-world -> moving-world maps (mm) parameterised about a centre
``c`` in the fixed image::

    M(x) = expm(skew(r)) (I + L) M0_lin (x - c) + M0(c) + t * extent

with ``M0`` the initial map (moments or rotation search), ``r`` the rotation (axis-angle in 3D,
an angle in 2D; radians), ``L`` the free linear part (affine only; for similarity an isotropic
log-scale) and ``t`` the translation in units of ``extent`` (half the fixed image's diagonal, so
one learning rate suits all parameters). Rigid stays rigid in world mm on anisotropic grids.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from unireg.spatial.field import world_points
from unireg.spatial.geometry import Geometry

Kind = Literal["rigid", "similarity", "affine"]


def _rotation(r: torch.Tensor, d: int) -> torch.Tensor:
    """Rotation matrices ``(B, d, d)`` from axis-angle ``(B, 3)`` (3D) or angles ``(B, 1)``."""
    if d == 2:
        c, s = torch.cos(r[:, 0]), torch.sin(r[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    z = torch.zeros_like(r[:, 0])
    skew = torch.stack(
        [
            torch.stack([z, -r[:, 2], r[:, 1]], -1),
            torch.stack([r[:, 2], z, -r[:, 0]], -1),
            torch.stack([-r[:, 1], r[:, 0], z], -1),
        ],
        -2,
    )
    rot: torch.Tensor = torch.linalg.matrix_exp(skew)
    return rot


class LinearModel(nn.Module):
    """A batch of rigid/similarity/affine world maps, see the module docstring.

    Args:
        fixed, moving: grids of the two images (world mm).
        kind: ``"rigid"``, ``"similarity"`` or ``"affine"``.
        init: initial world maps ``(B, d+1, d+1)`` or ``(d+1, d+1)`` (default identity).
        center: rotation centre in fixed world mm (default the fixed grid's centre).
    """

    # buffers
    m0_linear: torch.Tensor
    m0_center: torch.Tensor
    center: torch.Tensor

    def __init__(
        self,
        fixed: Geometry,
        moving: Geometry,
        kind: Kind = "affine",
        *,
        init: torch.Tensor | np.ndarray | None = None,
        center: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("rigid", "similarity", "affine"):
            raise ValueError(f"kind must be rigid, similarity or affine, got {kind!r}")
        d = fixed.ndim
        self.fixed, self.moving, self.kind, self.ndim = fixed, moving, kind, d
        # built on the CPU (candidates may come from any device); ``.to(device)`` moves it
        m0 = torch.eye(d + 1, dtype=torch.float64) if init is None else torch.as_tensor(init)
        m0 = m0.detach().to("cpu", torch.float64)
        m0 = m0.unsqueeze(0) if m0.ndim == 2 else m0
        b = m0.shape[0]
        c = torch.as_tensor(fixed.center_world if center is None else center, dtype=torch.float64)
        world = fixed.corners_world
        self.extent = float(np.linalg.norm(world.max(0) - world.min(0)) / 2)
        self.register_buffer("m0_linear", m0[:, :d, :d].clone())
        self.register_buffer("m0_center", (m0[:, :d, :d] @ c + m0[:, :d, d]).clone())
        self.register_buffer("center", c)
        self.rotation = nn.Parameter(torch.zeros(b, 3 if d == 3 else 1, dtype=torch.float64))
        self.translation = nn.Parameter(torch.zeros(b, d, dtype=torch.float64))
        if kind == "affine":
            self.linear = nn.Parameter(torch.zeros(b, d, d, dtype=torch.float64))
        elif kind == "similarity":
            self.log_scale = nn.Parameter(torch.zeros(b, 1, dtype=torch.float64))

    @property
    def batch(self) -> int:
        return self.rotation.shape[0]

    def world_matrix(self) -> torch.Tensor:
        """Fixed world -> moving world maps ``(B, d+1, d+1)``, float64, differentiable."""
        d = self.ndim
        lin = _rotation(self.rotation, d)
        eye = torch.eye(d, dtype=torch.float64, device=lin.device)
        if self.kind == "affine":
            lin = lin @ (eye + self.linear)
        elif self.kind == "similarity":
            lin = lin * torch.exp(self.log_scale)[:, :, None]
        lin = lin @ self.m0_linear
        trans = self.m0_center + self.translation * self.extent - lin @ self.center
        top = torch.cat([lin, trans[:, :, None]], dim=2)
        bottom = torch.zeros(self.batch, 1, d + 1, dtype=torch.float64, device=lin.device)
        bottom[:, 0, d] = 1
        return torch.cat([top, bottom], dim=1)

    def normalized_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The maps between normalised grid coordinates, fixed -> moving ``(B, d+1, d+1)``."""
        dev = self.rotation.device
        to_m = torch.as_tensor(self.moving.world_to_normalized, device=dev)
        from_f = torch.as_tensor(self.fixed.normalized_to_world, device=dev)
        return (to_m @ self.world_matrix() @ from_f).to(dtype)

    def select(self, index: int) -> LinearModel:
        """A one-element model continuing batch element ``index`` (same kind and parameters)."""
        out = LinearModel(self.fixed, self.moving, self.kind, center=self.center.cpu().numpy())
        out.to(self.rotation.device)
        with torch.no_grad():
            out.m0_linear.copy_(self.m0_linear[index : index + 1])
            out.m0_center.copy_(self.m0_center[index : index + 1])
            for name, p in self.named_parameters():
                getattr(out, name).copy_(p[index : index + 1])
        return out


def moments(
    image: torch.Tensor, geometry: Geometry
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intensity-weighted centre of mass (mm), principal axes (columns, ascending variance) and
    variances of an image ``(1, 1, *spatial)`` in world coordinates (negative values count 0)."""
    x = world_points(geometry, device=image.device, dtype=torch.float64).reshape(-1, geometry.ndim)
    w = image.detach().reshape(-1).to(torch.float64).clamp_min(0)
    total = w.sum()
    if float(total) <= 0:
        raise ValueError("cannot take moments of an image with no positive intensity")
    com = (w[:, None] * x).sum(0) / total
    dx = x - com
    cov = (w[:, None, None] * dx[:, :, None] * dx[:, None, :]).sum(0) / total
    var, axes = torch.linalg.eigh(cov)
    return com, axes, var


def _homogeneous(linear: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """World map ``x -> linear (x - src) + dst`` as ``(d+1, d+1)``."""
    d = linear.shape[0]
    m = torch.eye(d + 1, dtype=torch.float64, device=linear.device)
    m[:d, :d] = linear
    m[:d, d] = dst - linear @ src
    return m


def moments_candidates(
    fixed: torch.Tensor, moving: torch.Tensor, fixed_geom: Geometry, moving_geom: Geometry
) -> torch.Tensor:
    """Initial world maps ``(K, d+1, d+1)`` from image moments: centres of mass matched with
    the identity rotation, and with every proper rotation taking the fixed principal axes onto
    the moving ones (the axes' signs are ambiguous, so all sign choices with det +1)."""
    cf, af, _ = moments(fixed, fixed_geom)
    cm, am, _ = moments(moving, moving_geom)
    d = fixed_geom.ndim
    eye = torch.eye(d, dtype=torch.float64, device=cf.device)
    out = [_homogeneous(eye, cf, cm)]
    out += [_homogeneous(rot, cf, cm) for rot in axes_rotations(af, am)]
    return torch.stack(out)


def axes_rotations(source: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """The proper rotations ``(d, d)`` taking each column of ``source`` (orthonormal axes,
    e.g. principal axes) onto the same column of ``target``, up to its sign: one per choice
    of the axes' signs with determinant +1 (4 in 3D, 2 in 2D)."""
    d = source.shape[0]
    out = []
    for signs in itertools.product((1.0, -1.0), repeat=d):
        s = torch.diag(torch.tensor(signs, dtype=torch.float64, device=source.device))
        rot = target.double() @ s @ source.double().T
        if float(torch.linalg.det(rot)) > 0:
            out.append(rot)
    return out


def rotation_grid(ndim: int, step_degrees: float = 90.0) -> torch.Tensor:
    """Rotations ``(K, d, d)`` sampling all orientations: angles every ``step_degrees`` in 2D;
    in 3D, Euler angles (z, y, x) on that grid, duplicates removed. The identity comes first."""
    steps = max(round(360.0 / step_degrees), 1)
    angles = [2 * math.pi * k / steps for k in range(steps)]
    if ndim == 2:
        rots = [
            torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) for a in angles
        ]
        return torch.stack(rots).double()
    found: list[torch.Tensor] = []
    for a, b, c in itertools.product(angles, angles, angles):
        r = (
            _rotation(torch.tensor([[0.0, 0.0, a]], dtype=torch.float64), 3)
            @ _rotation(torch.tensor([[0.0, b, 0.0]], dtype=torch.float64), 3)
            @ _rotation(torch.tensor([[c, 0.0, 0.0]], dtype=torch.float64), 3)
        )[0]
        if all(float((r - q).abs().max()) > 1e-6 for q in found):
            found.append(r)
    return torch.stack(found)


def search_candidates(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_geom: Geometry,
    moving_geom: Geometry,
    step_degrees: float,
) -> torch.Tensor:
    """Initial maps ``(K, d+1, d+1)`` for a rotation search (as ANTs' affine initializer): every
    rotation of :func:`rotation_grid` about the fixed centre of mass, taking it onto the moving
    centre of mass, plus the moment candidates."""
    cf, _, _ = moments(fixed, fixed_geom)
    cm, _, _ = moments(moving, moving_geom)
    rots = rotation_grid(fixed_geom.ndim, step_degrees).to(cf.device)
    grid = torch.stack([_homogeneous(r, cf, cm) for r in rots])
    return torch.cat([moments_candidates(fixed, moving, fixed_geom, moving_geom), grid])
