"""Training infrastructure shared by the learned methods: configs, the loop, checkpoints.

Each method's trainer lives in its own package (``unireg.methods.keymorph.training``, ...);
networks are rebuilt from checkpoints by :func:`unireg.methods.load_checkpoint`."""

from unireg.training.base import TrainConfig, Trainer, TrainingVolumes
from unireg.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    read_latest_checkpoint,
    save_checkpoint,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "TrainingVolumes",
    "read_checkpoint",
    "read_latest_checkpoint",
    "save_checkpoint",
]
