"""Data: manifests, preprocessed and cached volumes, pairs, augmentation, label-map synthesis.

Sits above :mod:`unireg.io` and :mod:`unireg.spatial` (augmentation and synthesis warp with the
spatial core).
"""

from unireg.data.augment import (
    Augmentation,
    apply_affine,
    make_generator,
    random_affine_matrix,
    random_bias_field,
    random_gamma,
    random_noise,
    smooth_random_field,
)
from unireg.data.dataset import (
    PairDataset,
    Preprocessing,
    VolumeDataset,
    inter_subject_pairs,
    same_subject_pairs,
)
from unireg.data.manifest import Manifest, ManifestEntry
from unireg.data.synthesis import LabelSynthesis

__all__ = [
    "Augmentation",
    "LabelSynthesis",
    "Manifest",
    "ManifestEntry",
    "PairDataset",
    "Preprocessing",
    "VolumeDataset",
    "apply_affine",
    "inter_subject_pairs",
    "make_generator",
    "random_affine_matrix",
    "random_bias_field",
    "random_gamma",
    "random_noise",
    "same_subject_pairs",
    "smooth_random_field",
]
