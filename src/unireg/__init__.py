"""unireg: learning-based medical image registration, correct in physical space.

Layers (imports point downward only)::

    cli                 command line
    io                  files <-> Image / LabelMap / Transform (world millimetres, RAS+)
    spatial             tensors: grids, warping, composition, affines, fields, Jacobians
    errors              named exceptions

Coordinate convention: a transform maps *fixed* (target) points to *moving* (source) points;
warping samples the moving image at ``T(x)`` for every fixed voxel ``x`` (pull-back).
"""

__version__ = "0.1.0"

from unireg.errors import UniregError  # noqa: E402

__all__ = ["UniregError", "__version__"]
