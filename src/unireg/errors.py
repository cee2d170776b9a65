"""Named errors. Every message names the offending file (when there is one) and the problem."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pathlib is imported when an error is raised (the CLI's --help needs none)
    from pathlib import Path


class UniregError(Exception):
    """Base class of every error unireg raises on purpose."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        from pathlib import Path

        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class ImageNotFoundError(UniregError, FileNotFoundError):
    """The input file does not exist."""


class UnreadableFileError(UniregError):
    """The file exists but cannot be parsed (corrupt, truncated, not what its name says)."""


class EmptyFileError(UniregError):
    """The file is zero bytes long or holds an array with no voxels."""


class UnsupportedFormatError(UniregError):
    """The file extension is not one unireg reads or writes."""


class DimensionalityError(UniregError):
    """The data does not have the number of spatial dimensions that was expected."""


class NonFiniteError(UniregError):
    """The data holds NaN or infinite values."""


class GridMismatchError(UniregError):
    """Two images that must share a voxel grid (e.g. an image and its label map) do not."""


class TransformFormatError(UniregError):
    """A transform file is not one unireg can interpret (wrong type, size or layout)."""


class ManifestError(UniregError):
    """A dataset manifest (CSV) is malformed: missing columns, bad rows, missing files."""


class OrientationError(UniregError):
    """The file's voxel-to-world mapping is missing (qform and sform codes 0), not finite,
    or singular."""


class ImageTooLargeError(UniregError):
    """The header claims more voxels than the available memory can take."""


class LabelValueError(UniregError):
    """A label map holds values that are not integers or do not fit a 32-bit integer."""


class ConstantImageError(UniregError):
    """An image with one value everywhere, or a label map or mask with no foreground."""


class LandmarkError(UniregError):
    """A landmark file cannot be read as world points, or two files do not match."""
