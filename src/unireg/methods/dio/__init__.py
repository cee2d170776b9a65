"""DIO (Jena, Sethi, Chaudhari, Gee: "Deep Implicit Optimization for Robust and Flexible Image
Registration"): a network maps each image on its own to dense multi-scale features, and the
platform's iterative solver registers the features as a layer; the network learns, through the
solver's optimum (implicit, Jacobian-free gradients), features whose optimum aligns images and
labels.

- :mod:`.model`: the feature network (:class:`FeatureNet`: LKU-Net or U-Net backbones, and
  encoder-only variants);
- :mod:`.inference`: registering raw images in world space (:func:`register_dio`), with the
  transform model, iterations and prompts chosen at test time;
- :mod:`.training`: training from a config (:class:`DIOTrainer`).

This module holds the method's options and registry entry and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from unireg.methods.base import (
    MethodEntry,
    MethodOptions,
    OptionError,
    lazy_exports,
    model_option,
    option,
    parse_iterations,
    precision_option,
    resolution_option,
)
from unireg.methods.solver import affine_stage_option, preset_option

# the transform models the solver registers the features with, and its stage model
TRANSFORMS = {"ffd": "ffd", "diffeo": "greedy", "svf": "svf", "bspline": "bspline",
              "affine": "affine"}  # fmt: skip
DEFAULT_ITERATIONS = "100,50,10"
DEFAULT_TOLERANCE = 0.01


@dataclass(frozen=True)
class DIOOptions(MethodOptions):
    """DIO at inference: the transform model the solver fits to the features, its iterations,
    the linear stage run first on the intensities, and the model."""

    method = "dio"

    transform: str = option(
        "ffd", choices=tuple(TRANSFORMS), positional=True,
        help="dio: the model the solver fits to the features (ffd: free-form; diffeo: greedy "
        "diffeomorphic; svf: symmetric velocity field, gives the inverse; bspline; affine)",
    )  # fmt: skip
    iterations: str = option(
        DEFAULT_ITERATIONS,
        help="dio: the solver's iteration caps at 1/4, 1/2 and full resolution (each level "
        "stops early when the feature loss no longer falls)",
    )  # fmt: skip
    feature_tolerance: float = option(
        DEFAULT_TOLERANCE, minimum=0.0,
        help="dio: the share of each level's feature variance the solver may leave out: it "
        "compares the fewest principal components that keep the rest (0: every channel)",
    )  # fmt: skip
    resolution: str = resolution_option("dio")
    precision: str = precision_option(
        "dio", "the feature network's trunk (heads and solver stay float32)"
    )
    affine: str = affine_stage_option()
    preset: str = preset_option()
    model: str | None = model_option()

    def check(self, where: str = "", method: str = "") -> None:
        if self.feature_tolerance >= 1:
            raise OptionError(
                f"{where or self.method}: feature_tolerance must be below 1, got "
                f"{self.feature_tolerance}"
            )
        try:
            parse_iterations(self.iterations, DEFAULT_ITERATIONS)
        except OptionError as err:
            raise OptionError(f"{where or self.method}: {err}") from err


ENTRY = MethodEntry(
    name="dio",
    summary="learned features registered by the solver (transform chosen at test time; takes "
    "label and landmark prompts)",
    options=DIOOptions,
    factory="unireg.methods.dio.inference:DIOMethod",
    prompts=("labels", "landmarks", "mask"),
    models={"lku": "dio_ixi_2mm.pt", "lku-e": "dio_lku_e_ixi_2mm.pt"},
    network="unireg.methods.dio.model:FeatureNet.from_config",
    trainer="unireg.methods.dio.training:DIOTrainer",
    config="unireg.methods.dio.training:DIOConfig",
)
METHODS = (ENTRY,)

__getattr__ = lazy_exports(
    __name__,
    {
        "FeatureNet": "model",
        "DIOMethod": "inference",
        "register_dio": "inference",
        "DIOConfig": "training",
        "DIOTrainer": "training",
    },
)
