"""Transform files that ITK, ANTs and ANTsPy read and write.

Frames. unireg's world frame is NIfTI's RAS+ (x grows to the Right, y to Anterior, z to
Superior). ITK, and so ANTs, works in LPS+ physical space: ``p_LPS = F p_RAS`` with
``F = diag(-1, -1, 1)`` (``diag(-1, -1)`` in 2D). A fixed->moving affine ``M`` in RAS is
``F M F`` in LPS, and a displacement vector flips the sign of its first two components.

Formats:

* ``.mat``: ITK's MATLAB v4 transform file (what ``antsRegistration`` writes as
  ``0GenericAffine.mat``): variable ``AffineTransform_double_D_D`` holds the row-major linear part
  then the translation, ``fixed`` holds the centre ``c``; the map is ``A (p - c) + c + t``.
* ``.txt`` / ``.tfm``: the same parameters as an ITK "Insight Transform File V1.0".
* ``.nii`` / ``.nii.gz``: a displacement field as ITK writes one: a 5D NIfTI of shape
  ``(X, Y, Z, 1, 3)`` (``(X, Y, 1, 1, 2)`` in 2D), float32, intent ``vector``, on the fixed grid
  with the fixed affine; vector ``d`` at fixed point ``p`` (LPS mm) means ``p + d`` is the
  corresponding moving point.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from unireg.errors import (
    EmptyFileError,
    NonFiniteError,
    TransformFormatError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from unireg.io.files import FIELD_COMPRESSLEVEL, check_input_file, write_atomic, write_nibabel
from unireg.io.image import affine_from_4x4, affine_to_4x4
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Transform,
)

AFFINE_SUFFIXES = (".mat", ".txt", ".tfm")
FIELD_SUFFIXES = (".nii.gz", ".nii")
_LINEAR_NAME = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_(\d)_(\d)$")


def ras_to_lps_matrix(ndim: int) -> np.ndarray:
    """Homogeneous ``diag(-1, -1, [1,] 1)``: RAS+ <-> LPS+ (its own inverse)."""
    f = np.eye(ndim + 1)
    f[0, 0] = f[1, 1] = -1.0
    return f


def _suffix(path: Path, allowed: Sequence[str]) -> str:
    name = path.name.lower()
    for s in allowed:
        if name.endswith(s):
            return s
    raise UnsupportedFormatError(
        f"unsupported transform extension; expected one of {', '.join(allowed)}", path
    )


# --------------------------------------------------------------------------------------------
# Affine transforms
# --------------------------------------------------------------------------------------------


def _itk_parameters(matrix_ras: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    d = matrix_ras.shape[0] - 1
    lps = ras_to_lps_matrix(d) @ matrix_ras @ ras_to_lps_matrix(d)
    params = np.concatenate([lps[:d, :d].reshape(-1), lps[:d, d]])
    return f"AffineTransform_double_{d}_{d}", params, np.zeros(d)


def _matrix_from_itk(name: str, params: np.ndarray, fixed: np.ndarray, path: Path) -> np.ndarray:
    m = _LINEAR_NAME.match(name)
    if m is None:
        raise TransformFormatError(
            f"transform type {name!r} is not supported (expected an ITK AffineTransform or "
            "MatrixOffsetTransformBase)",
            path,
        )
    d = int(m.group(3))
    if d not in (2, 3) or params.size != d * d + d or fixed.size != d:
        raise TransformFormatError(
            f"{name} needs {d * d + d} parameters and {d} fixed parameters, "
            f"got {params.size} and {fixed.size}",
            path,
        )
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise NonFiniteError("transform parameters are NaN or infinite", path)
    lin = params[: d * d].reshape(d, d)
    sv = np.linalg.svd(lin, compute_uv=False)
    if sv[-1] <= 1e-8 * max(sv[0], 1.0):
        raise TransformFormatError(
            f"the affine's linear part is singular (singular values {sv.round(8).tolist()}): it "
            "collapses space onto a plane, line or point, so it is no registration and has no "
            "inverse",
            path,
        )
    t = params[d * d :]
    lps = np.eye(d + 1)
    lps[:d, :d] = lin
    lps[:d, d] = t + fixed - lin @ fixed
    return ras_to_lps_matrix(d) @ lps @ ras_to_lps_matrix(d)


def matlab_v4(columns: dict[str, np.ndarray]) -> bytes:
    """MATLAB level-4 file bytes holding each array as a little-endian float64 column vector,
    as ITK's MatlabTransformIO writes and reads them (the same bytes as
    ``scipy.io.savemat(..., format="4")``, without importing scipy.io: 0.3 s of the whole
    register command)."""
    out = bytearray()
    for name, values in columns.items():
        column = np.asarray(values, dtype="<f8").reshape(-1)
        encoded = name.encode("ascii") + b"\0"
        # type 0 (little-endian float64 full matrix), rows, columns, no imaginary part, name
        out += struct.pack("<5i", 0, column.size, 1, 0, len(encoded)) + encoded
        out += column.tobytes()
    return bytes(out)


def save_affine(transform: AffineTransform, path: str | Path) -> Path:
    """Write a fixed->moving world affine as an ITK/ANTs ``.mat`` or ``.txt``/``.tfm`` file.

    The RAS+ matrix is converted to LPS+ (see module docstring) and written with centre 0.
    """
    path = Path(path)
    suffix = _suffix(path, AFFINE_SUFFIXES)
    matrix = transform.matrix.numpy()
    if not np.all(np.isfinite(matrix)):
        raise NonFiniteError("refusing to write an affine with NaN or infinite entries", path)
    name, params, fixed = _itk_parameters(matrix)
    if suffix == ".mat":

        def writer(tmp: Path) -> None:
            tmp.write_bytes(matlab_v4({name: params, "fixed": fixed}))

    else:
        text = (
            "#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: {name}\n"
            f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
            f"FixedParameters: {' '.join(repr(float(v)) for v in fixed)}\n"
        )

        def writer(tmp: Path) -> None:
            tmp.write_text(text)

    return write_atomic(path, writer)


def load_affine(path: str | Path) -> AffineTransform:
    """Read an ITK/ANTs affine (``.mat`` or ``.txt``/``.tfm``) as a RAS+ world affine."""
    path = Path(path)
    suffix = _suffix(path, AFFINE_SUFFIXES)
    check_input_file(path, "transform")
    if suffix == ".mat":
        try:
            import scipy.io

            content = scipy.io.loadmat(str(path))
        except Exception as e:  # scipy raises several unrelated types for corrupt files
            raise UnreadableFileError(f"cannot read MATLAB transform ({e})", path) from e
        names = [k for k in content if not k.startswith("__") and k != "fixed"]
        if len(names) != 1 or "fixed" not in content:
            raise TransformFormatError(
                f"expected one transform variable and 'fixed', found {sorted(content)}", path
            )
        name = names[0]
        params = np.asarray(content[name], np.float64).reshape(-1)
        fixed = np.asarray(content["fixed"], np.float64).reshape(-1)
    else:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UnreadableFileError(f"cannot read transform text ({e})", path) from e
        fields: dict[str, list[str]] = {}
        for line in lines:
            if ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                if key.strip() in fields:
                    raise TransformFormatError(
                        "files holding several transforms are not supported; split them", path
                    )
                fields[key.strip()] = value.split()
        if not {"Transform", "Parameters", "FixedParameters"} <= fields.keys():
            raise TransformFormatError(
                "not an ITK transform file (needs Transform, Parameters, FixedParameters)", path
            )
        name = fields["Transform"][0] if fields["Transform"] else ""
        try:
            params = np.array([float(v) for v in fields["Parameters"]])
            fixed = np.array([float(v) for v in fields["FixedParameters"]])
        except ValueError as e:
            raise TransformFormatError(f"unparsable parameter ({e})", path) from e
    return AffineTransform(_matrix_from_itk(name, params, fixed, path))


# --------------------------------------------------------------------------------------------
# Displacement fields
# --------------------------------------------------------------------------------------------


def save_displacement_field(
    transform: Transform,
    reference: Geometry,
    path: str | Path,
    *,
    compresslevel: int | None = None,
    field: torch.Tensor | None = None,
) -> Path:
    """Write any transform as an ITK/ANTs displacement-field NIfTI on the ``reference`` grid
    (a ``.nii.gz`` at gzip ``compresslevel``, default
    :data:`~unireg.io.files.FIELD_COMPRESSLEVEL`: stored, as float fields hardly compress).
    ``field``: the transform's displacement on ``reference`` when already computed
    (:meth:`Transform.displacement`).

    ``ants.apply_transforms(fixed, moving, [path])`` then reproduces unireg's own warp when
    ``reference`` is the fixed image's grid.
    """
    path = Path(path)
    _suffix(path, FIELD_SUFFIXES)
    d = reference.ndim
    direction = reference.affine[:d, :d] / np.asarray(reference.spacing)
    if not np.allclose(direction.T @ direction, np.eye(d), atol=1e-4):
        warnings.warn(
            f"{path}: the reference grid's affine has shear; ITK/ANTs store only an orthonormal "
            "direction and will place this field differently. Resample to an unsheared grid.",
            stacklevel=2,
        )
    if field is None:
        field = transform.displacement(reference)
    disp = field.double().cpu().numpy()  # (d, *S) RAS mm
    if not np.all(np.isfinite(disp)):
        raise NonFiniteError("refusing to write a displacement field with NaN or inf", path)
    disp[:2] *= -1.0  # RAS -> LPS components
    vec = np.moveaxis(disp, 0, -1).astype(np.float32)  # (*S, d)
    vec = vec.reshape(*reference.shape, *([1] * (4 - d)), d)  # (X,Y,Z,1,3) or (X,Y,1,1,2)
    affine = affine_to_4x4(reference.affine)
    img = nib.Nifti1Image(vec, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    level = FIELD_COMPRESSLEVEL if compresslevel is None else compresslevel
    return write_nibabel(img, path, level)


def load_displacement_field(path: str | Path) -> DisplacementFieldTransform:
    """Read an ITK/ANTs displacement-field NIfTI as a world (RAS+ mm) displacement transform."""
    path = Path(path)
    _suffix(path, FIELD_SUFFIXES)
    check_input_file(path, "transform")
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj)
        if array.dtype != np.float64:
            array = array.astype(np.float32, copy=False)
    except Exception as e:
        raise UnreadableFileError(f"cannot read displacement field ({e})", path) from e
    shape = array.shape
    if len(shape) == 5 and shape[3] == 1 and shape[4] in (2, 3):
        d = shape[4]
        spatial = shape[:3] if d == 3 else shape[:2]
        if d == 2 and shape[2] != 1:
            raise TransformFormatError(f"2D field must have Z = 1, got shape {shape}", path)
    else:
        raise TransformFormatError(
            f"array of shape {shape} is not an ITK displacement field "
            "(expected (X, Y, Z, 1, 3) or (X, Y, 1, 1, 2))",
            path,
        )
    if array.size == 0:
        raise EmptyFileError("displacement field holds no voxels", path)
    if not np.all(np.isfinite(array)):
        raise NonFiniteError("displacement field holds NaN or infinite values", path)
    # (d, *spatial) as a view of the channel-last file layout: no copy of the whole field
    field = torch.from_numpy(np.array(array.reshape(*spatial, d), copy=True)).float().movedim(-1, 0)
    field[:2] *= -1.0  # LPS -> RAS components
    geometry = Geometry(spatial, affine_from_4x4(np.asarray(img.affine, np.float64), d))
    return DisplacementFieldTransform(field, geometry)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def is_field_path(path: str | Path) -> bool:
    """Whether ``path`` names a displacement-field file (by extension)."""
    return str(path).lower().endswith(FIELD_SUFFIXES)


def load_transform(path: str | Path) -> Transform:
    """Read an affine (``.mat``, ``.txt``, ``.tfm``) or displacement field (``.nii[.gz]``)."""
    if is_field_path(path):
        return load_displacement_field(path)
    return load_affine(path)


_INVERTED = re.compile(r"^\[\s*(.+?)\s*,\s*([01])\s*\]$")


def parse_transform_spec(spec: str | Path | tuple[str | Path, bool]) -> tuple[Path, bool]:
    """``path``, ``(path, invert)`` or ANTs' ``"[path,1]"`` -> ``(path, invert)``."""
    if isinstance(spec, tuple):
        return Path(spec[0]), bool(spec[1])
    match = _INVERTED.match(str(spec))
    if match:
        return Path(match.group(1)), match.group(2) == "1"
    return Path(spec), False


def load_transforms(specs: Sequence[str | Path | tuple[str | Path, bool]]) -> Transform:
    """Read several transform files as one chain in ANTs order (first applied first to points).

    An entry ``"[affine.mat,1]"`` (antsApplyTransforms' syntax) or ``(path, True)`` uses the
    inverse of that affine, as ``whichtoinvert`` does in ANTsPy. Displacement fields cannot be
    inverted here: use the inverse field ANTs writes (``1InverseWarp.nii.gz``).
    """
    transforms = []
    for spec in specs:
        path, invert = parse_transform_spec(spec)
        t = load_transform(path)
        if invert:
            if not isinstance(t, AffineTransform):
                raise TransformFormatError(
                    "only affine transforms can be inverted on the fly; use the inverse "
                    "displacement field written beside it",
                    path,
                )
            t = t.inverse()
        transforms.append(t)
    if not transforms:
        raise ValueError("no transform given")
    return transforms[0] if len(transforms) == 1 else CompositeTransform(transforms)


def save_transform(
    transform: Transform,
    path: str | Path,
    *,
    reference: Geometry | None = None,
    compresslevel: int | None = None,
) -> Path:
    """Write a transform: affines to ``.mat``/``.txt``/``.tfm``; anything to ``.nii[.gz]`` as a
    displacement field on ``reference`` (required then; gzip ``compresslevel`` as in
    :func:`save_displacement_field`)."""
    if is_field_path(path):
        if reference is None:
            raise ValueError("writing a displacement field needs the reference (fixed) grid")
        return save_displacement_field(transform, reference, path, compresslevel=compresslevel)
    if not isinstance(transform, AffineTransform):
        raise TransformFormatError(
            "only affine transforms can be written as .mat/.txt; use .nii.gz", path
        )
    return save_affine(transform, path)
