"""Files <-> unireg values: images and label maps with their world affine, and transform files
that ITK/ANTs read. Every reader raises a named :mod:`unireg.errors` error that names the file;
every writer is atomic (temporary file, then rename)."""

from unireg.io.files import atomic_path, check_input_file, write_atomic
from unireg.io.image import (
    Image,
    LabelMap,
    check_same_grid,
    crop_or_pad,
    load_image,
    load_image_and_labels,
    load_labels,
    normalize_intensity,
    reorient,
    resample,
    save_image,
)
from unireg.io.transforms import (
    load_affine,
    load_displacement_field,
    load_transform,
    load_transforms,
    save_affine,
    save_displacement_field,
    save_transform,
)

__all__ = [
    "Image",
    "LabelMap",
    "atomic_path",
    "check_input_file",
    "check_same_grid",
    "crop_or_pad",
    "load_affine",
    "load_displacement_field",
    "load_image",
    "load_image_and_labels",
    "load_labels",
    "load_transform",
    "load_transforms",
    "normalize_intensity",
    "reorient",
    "resample",
    "save_affine",
    "save_displacement_field",
    "save_image",
    "save_transform",
    "write_atomic",
]
