"""Images in world space: load/save NIfTI and MGZ, reorient, resample, crop/pad, normalise.

An :class:`Image` is a channel-first tensor ``(C, *spatial)`` whose spatial axes are the file
array's axes (i, j, k) plus the voxel-to-world affine (mm, RAS+ as nibabel gives it). A
:class:`LabelMap` is an integer image; resampling picks nearest-neighbour for it by type.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from unireg.errors import (
    ConstantImageError,
    DimensionalityError,
    EmptyFileError,
    GridMismatchError,
    ImageTooLargeError,
    NonFiniteError,
    OrientationError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from unireg.io.checks import (
    check_affine,
    check_claimed_size,
    check_label_values,
    orientation_affine,
)
from unireg.io.files import IMAGE_COMPRESSLEVEL, check_input_file, write_nibabel
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import AffineTransform, Transform

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")


def image_suffix(path: str | Path) -> str:
    """The image-format suffix of ``path`` (``.nii.gz``, ``.nii``, ``.mgz``, ``.mgh``)."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise UnsupportedFormatError(
        f"unsupported image extension; expected one of {', '.join(IMAGE_SUFFIXES)}", path
    )


@dataclass(frozen=True, eq=False)
class Image:
    """A (multi-channel) image on a voxel grid placed in world space.

    Attributes:
        data: ``(C, *spatial)`` tensor (float32 for intensities).
        affine: ``(d+1, d+1)`` voxel-to-world matrix in mm (RAS+).
        path: file it was read from, if any.
    """

    data: torch.Tensor
    affine: np.ndarray
    path: Path | None = None

    def __post_init__(self) -> None:
        d = self.data.ndim - 1
        if d not in (2, 3):
            raise DimensionalityError(
                "expected (C, *spatial) data with 2 or 3 spatial axes, "
                f"got {tuple(self.data.shape)}",
                self.path,
            )
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))
        if self.affine.shape != (d + 1, d + 1):
            raise ValueError(
                f"a {d}D image needs a {d + 1}x{d + 1} affine, got {self.affine.shape}"
            )

    @property
    def geometry(self) -> Geometry:
        """The image's grid in world space."""
        return Geometry(self.shape, self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (without the channel axis)."""
        return tuple(self.data.shape[1:])

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return self.data.ndim - 1

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis."""
        return self.geometry.spacing

    @property
    def is_label(self) -> bool:
        """Whether this is a label map (warped without mixing values)."""
        return False

    def with_data(self, data: torch.Tensor, affine: np.ndarray | None = None) -> Image:
        """Same kind of image with new data (and optionally a new affine); path is dropped."""
        return replace(self, data=data, affine=self.affine if affine is None else affine, path=None)

    def batch(self) -> torch.Tensor:
        """Data with a leading batch axis: ``(1, C, *spatial)``."""
        return self.data.unsqueeze(0)

    def __repr__(self) -> str:
        name = type(self).__name__
        chans = self.data.shape[0]
        return f"{name}(shape={self.shape}, channels={chans}, {self.geometry!r}, path={self.path})"


@dataclass(frozen=True, eq=False, repr=False)
class LabelMap(Image):
    """An integer label map ``(1, *spatial)``; warps keep only existing label values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.is_floating_point():
            raise TypeError("LabelMap data must be an integer tensor")
        if self.data.shape[0] != 1:
            raise DimensionalityError(
                f"a label map has one channel, got {self.data.shape[0]}", self.path
            )

    @property
    def is_label(self) -> bool:
        return True

    def labels(self) -> list[int]:
        """Sorted label values present (background included)."""
        return [int(v) for v in torch.unique(self.data)]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def affine_from_4x4(affine4: np.ndarray, ndim: int) -> np.ndarray:
    """A file's 4x4 affine restricted to ``ndim`` spatial axes (2D drops the third axis)."""
    if ndim == 3:
        return affine4
    keep = [0, 1, 3]
    return affine4[np.ix_(keep, keep)]


def affine_to_4x4(affine: np.ndarray) -> np.ndarray:
    """A 3x3 (2D) or 4x4 affine as the 4x4 a file stores (2D gets a unit third axis)."""
    if affine.shape == (4, 4):
        return affine
    out = np.eye(4)
    keep = [0, 1, 3]
    out[np.ix_(keep, keep)] = affine
    return out


def _spatial_layout(shape: tuple[int, ...], ndim: int | None, path: Path) -> tuple[int, int]:
    """Decide (spatial dims, channels) from a file array's shape."""
    dims = list(shape)
    # Drop trailing singleton axes beyond the third (e.g. time = 1).
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if ndim != 3 and len(dims) == 3 and dims[2] == 1:  # a 2D slice stored as (X, Y, 1)
        dims.pop()
    if len(dims) == 2:
        spatial, channels = 2, 1
    elif len(dims) == 3:
        spatial, channels = 3, 1
    elif len(dims) == 4:
        spatial, channels = 3, dims[3]
    elif len(dims) == 5 and dims[3] == 1:
        spatial, channels = 3, dims[4]
    else:
        raise DimensionalityError(
            f"array of shape {shape} is not a 2D or 3D image (with optional channels)", path
        )
    if ndim is not None and spatial != ndim:
        raise DimensionalityError(f"expected a {ndim}D image, got array of shape {shape}", path)
    thin = [axis for axis in range(spatial) if dims[axis] < 2]
    if thin:
        raise DimensionalityError(
            f"array of shape {shape} has a single voxel along axis {thin[0]}; unireg needs at "
            "least 2 voxels along every spatial axis (a 2D slice is stored as (X, Y) or "
            "(X, Y, 1), in the axial plane)",
            path,
        )
    return spatial, channels


def load_image(
    path: str | Path,
    *,
    label: bool = False,
    ndim: int | None = None,
    channels: bool = False,
    assume_orientation: str | None = None,
) -> Image:
    """Read a NIfTI (``.nii``, ``.nii.gz``) or MGZ/MGH file with its world affine.

    Args:
        path: the file.
        label: read as a :class:`LabelMap` (integer values; non-integers are an error).
        ndim: require 2 or 3 spatial dimensions (``None`` accepts either). A 2D slice stored as
            ``(X, Y, 1)`` is read as 2D when ``ndim=2``.
        channels: allow a 4th (channel) axis; otherwise a multi-channel file is an error.
        assume_orientation: axis codes (``"RAS"``, ``"LPS"``...) for a NIfTI file that carries
            no orientation (qform and sform codes 0); such a file is refused without it. The
            array's axes then point along the codes, voxel sizes from the header, centred on
            the world origin.

    Before any voxel is read, the header's claimed size is checked against the file (and, for
    gzip files, the size it decompresses to) and against the free memory.

    Raises:
        ImageNotFoundError: the file does not exist.
        UnsupportedFormatError: its extension is not one unireg reads.
        EmptyFileError: it is empty or holds no voxels.
        UnreadableFileError: it cannot be parsed.
        DimensionalityError: it has the wrong number of dimensions.
        NonFiniteError: it holds NaN or infinite values.
        OrientationError: no orientation, or a non-finite or singular affine.
        ImageTooLargeError: the header claims more than the free memory can take.
        LabelValueError: (``label``) values that are not integers or do not fit 32 bits.
    """
    path = Path(path)
    image_suffix(path)
    check_input_file(path, "image")
    readable = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.header.get_data_shape())
        dtype = img.get_data_dtype()
    except readable as e:
        raise UnreadableFileError(f"cannot read image ({type(e).__name__}: {e})", path) from e
    if not shape or min(shape) == 0:
        raise EmptyFileError(f"image holds no voxels (shape {shape})", path)
    spatial, nchan = _spatial_layout(shape, ndim, path)
    check_claimed_size(path, shape, dtype, int(getattr(img.dataobj, "offset", 0)), label=label)
    affine = affine_from_4x4(_file_affine(img, path, shape, assume_orientation), spatial)
    check_affine(affine, path, spatial)
    try:
        array = np.asanyarray(img.dataobj)
    except readable as e:
        raise UnreadableFileError(f"cannot read image ({type(e).__name__}: {e})", path) from e
    except MemoryError as e:
        raise ImageTooLargeError(f"not enough memory to read shape {shape}", path) from e
    if nchan > 1 and not channels:
        raise DimensionalityError(
            f"expected a single-channel image, got array of shape {array.shape}", path
        )
    array = array.reshape(*array.shape[:spatial], nchan)
    array = np.moveaxis(array, -1, 0)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteError(f"{bad} voxels are NaN or infinite", path)
    if label:
        check_label_values(array, path)
        data = torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))
        return LabelMap(data, affine, path)
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return Image(data, affine, path)


def _file_affine(
    img: nib.spatialimages.SpatialImage,
    path: Path,
    shape: tuple[int, ...],
    assume_orientation: str | None,
) -> np.ndarray:
    """A file's 4x4 voxel-to-world affine; a NIfTI file with qform and sform codes 0 has
    none (nibabel would make one up) and needs ``assume_orientation``."""
    header = img.header
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
            if assume_orientation is None:
                raise OrientationError(
                    "has no orientation (qform_code and sform_code are both 0), so where its "
                    "voxels lie in the world is unknown; fix the header, or give "
                    "--assume-orientation RAS (or LPS, ...) if you know the axes",
                    path,
                )
            zooms = tuple(float(z) for z in header.get_zooms()[:3])
            return orientation_affine(assume_orientation, zooms, shape)
    return np.asarray(img.affine, dtype=np.float64)


def load_labels(
    path: str | Path, *, ndim: int | None = None, assume_orientation: str | None = None
) -> LabelMap:
    """Read a label map (see :func:`load_image`)."""
    out = load_image(path, label=True, ndim=ndim, assume_orientation=assume_orientation)
    assert isinstance(out, LabelMap)
    return out


def check_same_grid(image: Image, labels: Image, *, atol: float = 1e-3) -> None:
    """Raise :class:`GridMismatchError` unless ``labels`` lies on ``image``'s voxel grid."""
    if image.shape != labels.shape:
        raise GridMismatchError(
            f"label map shape {labels.shape} differs from its image's {image.shape} ({image.path})",
            labels.path,
        )
    if not np.allclose(image.affine, labels.affine, atol=atol, rtol=0):
        raise GridMismatchError(
            f"label map affine differs from its image's ({image.path}) by up to "
            f"{np.abs(image.affine - labels.affine).max():.3g} mm",
            labels.path,
        )


def load_image_and_labels(
    image_path: str | Path, labels_path: str | Path, *, ndim: int | None = None
) -> tuple[Image, LabelMap]:
    """Read an image and its label map, checking that both share one voxel grid."""
    image = load_image(image_path, ndim=ndim)
    labels = load_labels(labels_path, ndim=ndim)
    check_same_grid(image, labels)
    return image, labels


def load_pair(
    fixed: str | Path,
    moving: str | Path,
    fixed_labels: str | Path | None = None,
    moving_labels: str | Path | None = None,
    *,
    channels: bool = False,
    assume_orientation: str | None = None,
) -> tuple[Image, Image, LabelMap | None, LabelMap | None]:
    """Read a registration's inputs: two images of the same dimensionality and, optionally,
    a label map on each image's grid (checked). ``channels`` keeps every channel of
    multi-channel images; ``assume_orientation`` is for files without one
    (:func:`load_image`)."""
    orient = assume_orientation
    fixed_img = load_image(fixed, channels=channels, assume_orientation=orient)
    moving_img = load_image(moving, channels=channels, assume_orientation=orient)
    if fixed_img.ndim != moving_img.ndim:
        raise DimensionalityError(
            f"is {moving_img.ndim}D but the fixed image {fixed} is {fixed_img.ndim}D", moving
        )
    fl = None if fixed_labels is None else load_labels(fixed_labels, assume_orientation=orient)
    ml = None if moving_labels is None else load_labels(moving_labels, assume_orientation=orient)
    if fl is not None:
        check_same_grid(fixed_img, fl)
    if ml is not None:
        check_same_grid(moving_img, ml)
    return fixed_img, moving_img, fl, ml


# --------------------------------------------------------------------------------------------
# Checks of loaded inputs
# --------------------------------------------------------------------------------------------


def check_not_constant(image: Image, what: str) -> None:
    """Refuse an image whose voxels all hold one value: there is nothing to register."""
    data = image.data
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise ConstantImageError(
            f"{what} image is constant (every voxel {lo:g}); nothing to register", image.path
        )


def check_has_labels(labels: LabelMap, what: str) -> None:
    """Refuse a label map (or mask) with no voxel other than background 0."""
    if not bool((labels.data != 0).any()):
        raise ConstantImageError(f"{what} holds no voxel other than background 0", labels.path)


def check_registrable(
    fixed: Image,
    moving: Image,
    fixed_labels: LabelMap | None = None,
    moving_labels: LabelMap | None = None,
    mask: LabelMap | None = None,
) -> None:
    """The checks every registration makes on its loaded inputs before running: both images
    carry contrast, label maps and a mask select something, the images' channels agree."""
    check_not_constant(fixed, "fixed")
    check_not_constant(moving, "moving")
    if fixed.data.shape[0] != moving.data.shape[0]:
        raise DimensionalityError(
            f"has {moving.data.shape[0]} channel(s) but the fixed image {fixed.path} has "
            f"{fixed.data.shape[0]}",
            moving.path,
        )
    for labels, what in ((fixed_labels, "fixed label map"), (moving_labels, "moving label map"),
                         (mask, "fixed mask")):  # fmt: skip
        if labels is not None:
            check_has_labels(labels, what)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _label_dtype(array: np.ndarray) -> type:
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return np.int64


def to_nibabel(image: Image, suffix: str = ".nii.gz") -> nib.spatialimages.SpatialImage:
    """The image as a nibabel NIfTI-1 or MGH image (channels last, affine as 4x4)."""
    array = image.data.detach().cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    if image.is_label:
        array = array.astype(_label_dtype(array))
    else:
        array = array.astype(np.float32)
    affine = affine_to_4x4(image.affine)
    if suffix in (".mgz", ".mgh"):
        if array.dtype == np.int64 or array.dtype == np.int16:
            array = array.astype(np.int32)
        return nib.MGHImage(array, affine)
    out = nib.Nifti1Image(array, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    out.header.set_xyzt_units("mm")
    return out


def save_image(image: Image, path: str | Path, *, compresslevel: int | None = None) -> Path:
    """Write an image atomically (NIfTI or MGZ by extension), with its affine.

    Label maps are written with the smallest integer type that holds them; intensities as
    float32. A ``.nii.gz`` is gzip-compressed at ``compresslevel`` (default
    :data:`~unireg.io.files.IMAGE_COMPRESSLEVEL`). Refuses non-finite data
    (:class:`NonFiniteError`).
    """
    suffix = image_suffix(path)
    if image.data.is_floating_point() and not bool(torch.isfinite(image.data).all()):
        raise NonFiniteError("refusing to write an image with NaN or infinite voxels", path)
    nimg = to_nibabel(image, suffix)
    level = IMAGE_COMPRESSLEVEL if compresslevel is None else compresslevel
    return write_nibabel(nimg, path, level)


# --------------------------------------------------------------------------------------------
# Geometry operations
# --------------------------------------------------------------------------------------------


def reorient(image: Image, axcodes: str = "RAS") -> Image:
    """Permute/flip axes so that they point along ``axcodes`` (default RAS); world unchanged.

    No interpolation: voxels are only reordered, and the affine is updated so that every voxel
    keeps its world position.
    """
    d = image.ndim
    if len(axcodes) != d:
        raise ValueError(f"{d}D image needs {d} axis codes, got {axcodes!r}")
    current = io_orientation(image.affine)
    transform = ornt_transform(current, axcodes2ornt(tuple(axcodes)))
    if np.array_equal(transform, np.column_stack([np.arange(d), np.ones(d)])):
        return image
    array = image.data.detach().cpu().numpy()
    moved = np.stack([apply_orientation(c, transform) for c in array])
    affine = image.affine @ inv_ornt_aff(transform, image.shape)
    data = torch.from_numpy(np.ascontiguousarray(moved)).to(image.data.device)
    return image.with_data(data, affine)


def resample(
    image: Image,
    reference: Image | Geometry,
    transform: Transform | None = None,
    *,
    mode: str | None = None,
    padding: str = "zeros",
) -> Image:
    """Resample ``image`` onto the reference grid in world space (through ``transform``).

    Intensity images use linear interpolation and label maps nearest-neighbour by default
    (``mode="onehot"`` is also accepted for labels). ``transform`` maps reference world points to
    ``image`` world points; the identity by default, which makes this a pure change of grid.
    """
    geom = reference.geometry if isinstance(reference, Image) else reference
    if geom.ndim != image.ndim:
        raise DimensionalityError(
            f"cannot resample a {image.ndim}D image onto a {geom.ndim}D grid", image.path
        )
    transform = AffineTransform.identity(image.ndim) if transform is None else transform
    if image.is_label:
        method = mode or "nearest"
        data = transform.warp_labels(image.batch(), image.geometry, geom, method=method)
    else:
        if mode not in (None, "linear", "nearest"):
            raise ValueError(f"intensity images use 'linear' or 'nearest', got {mode!r}")
        data = transform.warp(
            image.batch(), image.geometry, geom, mode=mode or "linear", padding=padding
        )
    return image.with_data(data[0], geom.affine)


def crop_or_pad(
    image: Image,
    shape: tuple[int, ...],
    *,
    start: tuple[int, ...] | None = None,
    value: float = 0.0,
) -> Image:
    """Crop and/or pad to ``shape`` keeping every voxel's world position.

    ``start`` is the index in the input of the output's first voxel per axis (negative pads at
    the start); by default the input is centred. Padding uses ``value``.
    """
    if len(shape) != image.ndim:
        raise ValueError(f"shape {shape} has not {image.ndim} axes")
    if start is None:
        start = tuple((o - n) // 2 for o, n in zip(image.shape, shape, strict=True))
    out = torch.full(
        (image.data.shape[0], *shape),
        value,
        dtype=image.data.dtype,
        device=image.data.device,
    )
    src, dst = [slice(None)], [slice(None)]
    for s0, n_out, n_in in zip(start, shape, image.shape, strict=True):
        lo, hi = max(s0, 0), min(s0 + n_out, n_in)
        if hi <= lo:
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
        else:
            src.append(slice(lo, hi))
            dst.append(slice(lo - s0, hi - s0))
    out[tuple(dst)] = image.data[tuple(src)]
    shift = np.eye(image.ndim + 1)
    shift[: image.ndim, image.ndim] = start
    return image.with_data(out, image.affine @ shift)


def percentile_range(
    values: torch.Tensor, lower: float = 0.5, upper: float = 99.5
) -> tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles of ``values`` (any shape; order statistics,
    no interpolation)."""
    values = values.reshape(-1)
    n = values.numel()
    if n == 0:
        raise ValueError("no values to take percentiles of")
    ranks = [min(max(int(round(q / 100.0 * (n - 1))), 0), n - 1) for q in (lower, upper)]
    if values.device.type == "cpu":  # one selection for both ranks: ~2x faster than kthvalue
        arr = values.detach().numpy()
        picked = np.partition(arr, sorted(set(ranks)))
        return float(picked[ranks[0]]), float(picked[ranks[1]])
    return tuple(float(values.kthvalue(r + 1).values) for r in ranks)  # type: ignore[return-value]


def normalize_intensity(
    image: Image,
    *,
    lower: float = 0.5,
    upper: float = 99.5,
    mask: torch.Tensor | None = None,
) -> Image:
    """Robust rescaling to [0, 1]: the ``lower``/``upper`` percentiles (within ``mask``) map to
    0 and 1 and values outside are clipped. A constant image becomes all zeros."""
    if image.is_label:
        raise TypeError("normalize_intensity is for intensity images, not label maps")
    data = image.data.float()
    values = data[mask.expand_as(data).bool()] if mask is not None else data
    if values.numel() == 0:
        raise ValueError("normalisation mask selects no voxels")
    lo, hi = percentile_range(values, lower, upper)
    if hi - lo <= 0:
        return image.with_data(torch.zeros_like(data))
    return image.with_data(((data - lo) / (hi - lo)).clamp(0.0, 1.0))
