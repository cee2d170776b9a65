"""Brain extraction: a network that finds the brain in an image of any contrast
(:class:`~.model.BrainMaskNet`, trained SynthStrip-style on images synthesised from whole-head
label maps beside real T1s, :mod:`.training`), and pairs matched in brain extraction before
registration (:func:`~.inference.match_extraction`: a whole head registered against a
brain-extracted image is stripped to its brain mask first).

This module imports no torch.
"""

from __future__ import annotations

from unireg.methods.base import lazy_exports

# the shipped brain-mask network (unireg/models/)
MODEL_FILE = "brainmask_4mm.pt"
# a method run on the pair matched in brain extraction (``brain = "auto"``)
MATCHED = "unireg.methods.extraction.inference:ExtractionMatched"
# `unireg train brainmask`: its config and trainer
TRAINER = ("unireg.methods.extraction.training:BrainMaskConfig",
           "unireg.methods.extraction.training:BrainMaskTrainer")  # fmt: skip

__getattr__ = lazy_exports(
    __name__,
    {
        "BrainMaskNet": "model",
        "brain_mask": "inference",
        "brain_probability": "inference",
        "is_brain_extracted": "inference",
        "load_brain_model": "inference",
        "match_extraction": "inference",
        "strip": "inference",
        "ExtractionMatched": "inference",
        "BrainMaskConfig": "training",
        "BrainMaskTrainer": "training",
    },
)
