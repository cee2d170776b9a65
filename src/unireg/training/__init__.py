"""Training infrastructure shared by the learned methods: configs, the loop, checkpoints.

Each method's trainer lives in its own package (``unireg.methods.keymorph.training``, ...);
networks are rebuilt from checkpoints by :func:`unireg.methods.load_checkpoint`."""

from unireg.training.base import TrainConfig, Trainer, TrainingVolumes
from unireg.training.checkpoint import Checkpoint, read_checkpoint, save_checkpoint

__all__ = [
    "Checkpoint",
    "TrainConfig",
    "Trainer",
    "TrainingVolumes",
    "read_checkpoint",
    "save_checkpoint",
]
