"""Spatial core: grids, frames, warping, affines, displacement fields, world-space transforms.

Pure tensor code (2D and 3D, batched, differentiable, on the device of its inputs). Nothing here
reads or writes files. See :mod:`unireg.spatial.geometry` for the coordinate frames.
"""

from unireg.spatial.affine import (
    affine_from_parameters,
    compose_affine,
    homogeneous,
    invert_affine,
    random_affine,
    rotation_matrix,
)
from unireg.spatial.field import (
    advect_displacement,
    compose_displacements,
    displacement_from_world,
    displacement_to_world,
    jacobian_determinant,
    point_map_jacobian_determinant,
    points_to_displacement,
    resize_displacement,
    scaling_and_squaring,
    world_points,
)
from unireg.spatial.geometry import (
    Geometry,
    normalized_map_matrix,
    normalized_to_voxel_matrix,
    voxel_to_normalized_matrix,
    world_map_matrix,
)
from unireg.spatial.grid import (
    affine_grid,
    channels_first,
    channels_last,
    displacement_to_points,
    identity_grid,
    transform_points,
    voxel_grid,
)
from unireg.spatial.inversion import InversionInfo, invert_displacement
from unireg.spatial.keypoints import (
    ThinPlateSpline,
    fit_affine,
    fit_keypoint_transform,
    fit_rigid,
    fit_tps,
    tps_kernel,
)
from unireg.spatial.transform import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Transform,
)
from unireg.spatial.warp import sample, warp, warp_affine, warp_labels

__all__ = [
    "InversionInfo",
    "invert_displacement",
    "ThinPlateSpline",
    "fit_affine",
    "fit_keypoint_transform",
    "fit_rigid",
    "fit_tps",
    "tps_kernel",
    "AffineTransform",
    "CompositeTransform",
    "DisplacementFieldTransform",
    "Geometry",
    "Transform",
    "advect_displacement",
    "affine_from_parameters",
    "affine_grid",
    "channels_first",
    "channels_last",
    "compose_affine",
    "compose_displacements",
    "displacement_from_world",
    "displacement_to_points",
    "displacement_to_world",
    "homogeneous",
    "identity_grid",
    "invert_affine",
    "jacobian_determinant",
    "point_map_jacobian_determinant",
    "normalized_map_matrix",
    "normalized_to_voxel_matrix",
    "points_to_displacement",
    "random_affine",
    "resize_displacement",
    "rotation_matrix",
    "sample",
    "scaling_and_squaring",
    "transform_points",
    "voxel_grid",
    "voxel_to_normalized_matrix",
    "warp",
    "warp_affine",
    "warp_labels",
    "world_map_matrix",
    "world_points",
]
