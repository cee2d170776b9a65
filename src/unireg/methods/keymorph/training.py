"""Training KeyMorph from a config file (TOML), with checkpoints and resume.

Phases, in order:

1. **Self-supervised pretraining** (``pretrain_steps``): ``K`` random keypoints are drawn once
   inside the head of a reference subject; every step warps that subject's image (real, or
   synthesised from its label map) by a random affine and a random smooth deformation (a
   stationary velocity field integrated by scaling and squaring, whose negation gives the
   inverse) and trains the detector to output the keypoints moved with it (mean squared
   distance, normalised units).
2. **Anatomical keypoints** (``anatomical_steps``, our addition): keypoint ``k`` is the
   centroid of label ``k`` of a fixed list (the ``num_keypoints`` largest labels that every
   subject of ``anatomical_dataset`` has); every step takes a random subject of that dataset
   (real image, or synthesised from its label map), warps it as in pretraining and trains the
   detector to output its label centroids moved with it. Labels enter the loss only, as in
   the supervised recipe; unlike soft Dice, the loss does not vanish for a badly misaligned
   pair, and it fixes each keypoint to the same anatomy in every subject, so the keypoints
   cannot collapse. Affine least squares on true DLMUSE centroids reaches a mean Dice of
   0.547 on the IXI test pairs (128 largest labels), against 0.498 for ANTs Affine.
3. **Registration training** (``steps``), ``mode``:
   - ``supervised``: two different subjects of one dataset, each under its own random affine;
     loss ``1 - soft Dice`` between the moving one-hot labels warped by the closed form and
     the fixed ones (labels only enter the loss, never the network). With
     ``consistency_every = n`` every n-th step is instead a same-subject keypoint-consistency
     step (below): a direct, rotation-independent signal that the keypoints move with the
     anatomy, where soft Dice gives almost no gradient to a badly misaligned pair (our
     addition to the paper's supervised recipe). ``anatomical_every = n`` interleaves
     anatomical-keypoint steps (phase 2) instead, which keeps each keypoint on its label's
     centroid while soft Dice fine-tunes the detector;
   - ``unsupervised``: MSE between the warped moving image and the fixed image (same
     modality), alternating with a same-subject multi-modal step: two contrasts synthesised
     from one label map, each under its own random affine; the loss is the deviation of the
     keypoints once mapped through the known relative affine.

The transform is ``rigid``, ``affine`` or ``tps``; the TPS lambda is fixed or drawn
log-uniformly per step (``tps_lambda = "logunif"``, in ``lambda_range``). Images of the label
maps come from :class:`unireg.data.LabelSynthesis`; all pairs get random affines with
rotations up to ``rotation`` degrees (reached over ``rotation_warmup`` steps), plus bias
field and noise. Seeded: the same config gives
the same model on the same machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from unireg.data.augment import smooth_random_field
from unireg.losses import mse, soft_dice
from unireg.methods.keymorph import TRANSFORMS
from unireg.methods.keymorph.model import KeyMorph
from unireg.nets.keypoints import KeypointDetector
from unireg.spatial.field import scaling_and_squaring
from unireg.spatial.grid import channels_last, identity_grid, transform_points
from unireg.spatial.warp import sample
from unireg.training.base import TrainConfig, Trainer, TrainingVolumes
from unireg.training.checkpoint import Checkpoint, read_checkpoint


@dataclass
class KeyMorphConfig(TrainConfig):
    """A KeyMorph training run: :class:`TrainConfig` plus the model and its schedule."""

    path_settings: ClassVar[tuple[str, ...]] = (
        *TrainConfig.path_settings,
        "coarse",
        "anatomical_targets",
    )
    output: str = "runs/keymorph"
    # model
    num_keypoints: int = 64
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    head: str = "com"
    decoder: int = 0  # finer activation maps: decoder levels over the deepest stage (0: none)
    # a KeyMorph checkpoint whose detector becomes the frozen first stage of a two-stage model
    # (it finds heads in any orientation; the trained detector then sees them upright); "": none
    coarse: str = ""
    # "coarse": ``init`` is a two-stage checkpoint whose first (coarse) detector starts this
    # one-stage run; "": ``init`` is this run's own kind of model
    init_stage: str = ""
    unit_mm: float = 64.0
    # schedule
    pretrain_steps: int = 200
    mode: str = "supervised"
    transform: str = "affine"
    tps_lambda: float | str = 0.1
    lambda_range: list[float] = field(default_factory=lambda: [1e-3, 10.0])
    pretrain_deformation: float = 0.03  # std of the pretraining SVF (normalised units); 0: off
    anatomical_steps: int = 0  # label-centroid keypoint steps after the pretraining
    anatomical_dataset: str = "ixi"  # whose subjects (all sharing the labels) give centroids
    # subjects of other labellings with those centroids given (tools/keymorph_anatomy_targets.py:
    # ``labels``, ``points/<subject>`` in world mm): anatomical subjects too; "": none
    anatomical_targets: str = ""
    consistency_every: int = 0  # supervised: every n-th step a keypoint-consistency step; 0: off
    anatomical_every: int = 0  # supervised: every n-th step an anatomical-keypoint step; 0: off
    batch_size: int = 1  # samples (pairs, views) per step, the detector run once on all

    def check(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.mode not in ("supervised", "unsupervised"):
            raise ValueError(f"mode must be supervised or unsupervised, got {self.mode!r}")
        if isinstance(self.tps_lambda, str) and self.tps_lambda != "logunif":
            raise ValueError("tps_lambda is a number or 'logunif'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.same_subject_probability > 0:
            raise ValueError(
                "same_subject_probability is for the deformable methods' pairs; KeyMorph "
                "trains same-subject keypoints with consistency_every"
            )
        if self.anatomical_steps < 0:
            raise ValueError(f"anatomical_steps must be >= 0, got {self.anatomical_steps}")
        if self.consistency_every < 0:
            raise ValueError(f"consistency_every must be >= 0, got {self.consistency_every}")
        if self.anatomical_every < 0:
            raise ValueError(f"anatomical_every must be >= 0, got {self.anatomical_every}")
        if self.consistency_every and self.anatomical_every:
            raise ValueError("consistency_every and anatomical_every exclude each other")
        if self.init_stage not in ("", "coarse"):
            raise ValueError(f"init_stage must be '' or 'coarse', got {self.init_stage!r}")
        if self.init_stage and (self.coarse or not self.init):
            raise ValueError("init_stage = 'coarse' starts a one-stage run from init's first stage")
        if self.anatomical_targets and not Path(self.anatomical_targets).is_file():
            raise ValueError(f"anatomical_targets: no such file {self.anatomical_targets}")
        if self.coarse and not (self.anatomical_steps or self.anatomical_every):
            raise ValueError("coarse needs anatomical keypoints (its template is their mean)")

    def model(self) -> KeyMorph:
        coarse = None
        if self.coarse:  # its architecture; the trainer loads its weights
            coarse = KeypointDetector(**read_checkpoint(self.coarse).model_config["detector"])
        return KeyMorph(
            KeypointDetector(
                3, 1, self.num_keypoints, self.channels, self.head, decoder=self.decoder
            ),
            self.unit_mm,
            coarse,
        )


class KeyMorphTrainer(Trainer):
    """Runs the phases of a config; ``run()`` trains (resuming from ``output/last.pt``)."""

    method = "keymorph"

    def __init__(self, cfg: KeyMorphConfig, volumes: TrainingVolumes | None = None) -> None:
        super().__init__(cfg, volumes)
        self.cfg: KeyMorphConfig = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        ref = self.volumes.items[0]
        fg = torch.nonzero(ref["labels"][0].cpu() > 0).double()
        pick = fg[torch.randperm(fg.shape[0], generator=g)[: cfg.num_keypoints]]
        shape = torch.tensor(ref["labels"].shape[1:], dtype=torch.float64)
        self.pretrain_points = (2 * pick / (shape - 1) - 1).float()  # normalised (K, 3)
        self.anatomy: list[tuple[dict[str, Any], torch.Tensor]] = []  # (subject, centroids)
        self.anatomy_labels: list[int] = []
        self.template_subjects = 0
        if cfg.anatomical_steps or (cfg.anatomical_every and cfg.steps):
            self.anatomy_labels, self.anatomy = self._centroid_targets()
            # the template (two-stage models) is the mean of the anatomical dataset's own
            # subjects, whatever other subjects train with given targets
            self.template_subjects = len(self.volumes.by_dataset[cfg.anatomical_dataset])
            if cfg.anatomical_targets:
                self.anatomy += self._given_targets(Path(cfg.anatomical_targets))
        if cfg.coarse and self.step == 0:  # a resume has them in its checkpoint
            self._load_coarse(Path(cfg.coarse))

    def init_state(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """With ``init_stage = "coarse"``: the two-stage checkpoint's first-stage detector as
        this model's detector."""
        state = checkpoint.float_state()
        if not self.cfg.init_stage:
            return state
        coarse = {"detector." + k[len("coarse."):]: v for k, v in state.items()
                  if k.startswith("coarse.")}  # fmt: skip
        if not coarse:
            raise ValueError(f"{checkpoint.path}: init_stage = 'coarse', but not a two-stage model")
        return coarse

    def _load_coarse(self, path: Path) -> None:
        """The coarse stage's weights from ``path`` and the template: the mean over the
        anatomical subjects of their label centroids in world mm, each subject's centred."""
        model = self.model
        assert isinstance(model, KeyMorph) and model.coarse is not None
        source = read_checkpoint(path)
        if source.extra.get("anatomical_labels") != self.anatomy_labels:
            raise ValueError(f"{path}: the coarse model's keypoints are not this run's labels")
        prefix = "detector."
        detector = {k[len(prefix):]: v for k, v in source.float_state().items()
                    if k.startswith(prefix)}  # fmt: skip
        model.coarse.load_state_dict(detector)
        centred = []
        for item, points in self.anatomy[: self.template_subjects]:
            mm = KeyMorph.to_world(points.double().cpu()[None], item["geometry"])[0]
            centred.append(mm - mm.mean(0))
        model.template.copy_(torch.stack(centred).mean(0))

    def _centroid_targets(self) -> tuple[list[int], list[tuple[dict[str, Any], torch.Tensor]]]:
        """The ``num_keypoints`` largest labels (mean voxel count) every subject of
        ``anatomical_dataset`` has, and each subject's centroids of them (normalised ``(K, d)``,
        index order as :attr:`pretrain_points`)."""
        cfg = self.cfg
        name = cfg.anatomical_dataset
        items = [self.volumes.items[i] for i in self.volumes.by_dataset.get(name, [])]
        if not items:
            raise ValueError(f"anatomical_dataset {name!r} has no training subjects")
        counts = []
        for it in items:
            values, n = torch.unique(it["labels"].cpu(), return_counts=True)
            counts.append(dict(zip(values.tolist(), n.tolist(), strict=True)))
        shared = set.intersection(*(set(c) for c in counts)) - {0}
        if len(shared) < cfg.num_keypoints:
            raise ValueError(
                f"anatomical keypoints: the {cfg.anatomical_dataset} subjects share "
                f"{len(shared)} labels, fewer than num_keypoints = {cfg.num_keypoints}"
            )
        mean = {v: sum(c[v] for c in counts) / len(counts) for v in shared}
        chosen = sorted(shared, key=lambda v: (-mean[v], v))[: cfg.num_keypoints]
        targets = []
        for it in items:
            lab = it["labels"][0].cpu()
            shape = torch.tensor(lab.shape, dtype=torch.float64)
            cents = torch.stack([torch.nonzero(lab == v).double().mean(0) for v in chosen])
            targets.append((it, (2 * cents / (shape - 1) - 1).float()))
        return chosen, targets

    def _given_targets(self, path: Path) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """The subjects of other datasets whose centroids of :attr:`anatomy_labels` ``path``
        gives in world mm (``labels`` ``(L,)``, ``points/<subject>`` ``(L, d)``), each with
        them in its training grid's normalised coordinates."""
        import numpy as np

        from unireg.spatial.geometry import apply_matrix_np

        with np.load(path) as data:
            given = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("points/")}
            values = [int(v) for v in data["labels"]]
        missing = sorted(set(self.anatomy_labels) - set(values))
        if missing:
            raise ValueError(f"{path}: no centroids of the keypoints' labels {missing[:8]}")
        rows = [values.index(v) for v in self.anatomy_labels]
        out = []
        for item in self.volumes.items:
            if item["dataset"] != self.cfg.anatomical_dataset and item["subject"] in given:
                world = given[item["subject"]][rows]
                points = apply_matrix_np(item["geometry"].world_to_normalized, world)
                out.append((item, torch.as_tensor(points, dtype=torch.float32)))
        if not out:
            raise ValueError(f"{path}: gives targets for none of this run's subjects")
        return out

    def _lambda(self, g: torch.Generator) -> float:
        cfg = self.cfg
        if cfg.tps_lambda == "logunif":
            lo, hi = (math.log(v) for v in cfg.lambda_range)
            return float(math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g))))
        return float(cfg.tps_lambda)

    # -- losses ----------------------------------------------------------------------------
    # Each loss averages ``batch_size`` samples, drawn one after the other from the step's
    # generator; the detector runs once on all the step's images (instance norm is per image,
    # so batching changes nothing but speed).
    def pretrain_view(
        self, image: torch.Tensor, points: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random affine plus smooth (SVF) deformation of ``image`` ``(1, 1, *shape)`` and
        where the normalised ``points`` ``(K, d)`` of the original are in it.

        The view samples the original at ``psi(y) = M (y + u(y))`` with ``u`` the
        displacement of ``exp(v)``; a point ``p`` of the original is shown at
        ``psi^-1(p) = q + w(q)``, ``q = M^-1 p``, with ``w`` the displacement of ``exp(-v)``.
        Everything is computed on ``image``'s device.
        """
        shape = tuple(image.shape[2:])
        d, dev = len(shape), image.device
        matrix = self._affine(shape, g)[0]
        ident = identity_grid(shape, dtype=torch.float32, device=dev)
        inv = torch.linalg.inv(matrix.double()).float()
        q = transform_points(inv.to(dev), points.to(dev))
        if self.cfg.pretrain_deformation > 0:
            v = smooth_random_field(
                shape, 1, d, g, resolution=5, std=self.cfg.pretrain_deformation, device=dev
            )
            forward = channels_last(scaling_and_squaring(v))
            inverse = scaling_and_squaring(-v)
            target = q + channels_last(sample(inverse, q[None], padding="border"))[0]
        else:
            forward = torch.zeros_like(ident)
            target = q
        view = sample(image, transform_points(matrix.to(dev), ident + forward))
        return view, target

    def _detect(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised keypoints ``(1, K, d)`` of each image, one detector call for all."""
        return list(self.model.detector(torch.cat(images)).split(1))

    def _pretrain_loss(self, g: torch.Generator) -> torch.Tensor:
        return self._keypoint_loss(g, [(self.volumes.items[0], self.pretrain_points)])

    def _anatomical_loss(self, g: torch.Generator) -> torch.Tensor:
        return self._keypoint_loss(g, self.anatomy)

    def _keypoint_loss(
        self, g: torch.Generator, subjects: list[tuple[dict[str, Any], torch.Tensor]]
    ) -> torch.Tensor:
        """Mean squared distance (normalised units) between the detected keypoints of warped
        views and where the subjects' known points went; each view's subject drawn from
        ``subjects`` (subject, normalised points ``(K, d)``)."""
        views, targets = [], []
        for _ in range(self.cfg.batch_size):
            pick = int(torch.randint(len(subjects), (1,), generator=g)) if len(subjects) > 1 else 0
            item, points = subjects[pick]
            view, target = self.pretrain_view(self._image(item, g), points, g)
            views.append(self.aug(view, generator=g)["image"])  # on the training device
            targets.append(target)
        pred = torch.cat(self._detect(views))
        return ((pred - torch.stack(targets).to(pred)) ** 2).sum(-1).mean()

    def _pairs(self, g: torch.Generator, labels: bool) -> list[tuple[Any, ...]]:
        """``batch_size`` (fixed view, moving view, label one-hots or None, TPS lambda)."""
        pairs = []
        for _ in range(self.cfg.batch_size):
            fi, mi = self._pair_items(g)
            fixed, moving = self._view(fi, g), self._view(mi, g)
            hots = self._label_one_hots(fixed["labels"], moving["labels"], g) if labels else None
            if labels and hots is None:
                raise ValueError(f"{fi['subject']} and {mi['subject']} share no labels")
            pairs.append((fixed, moving, hots, self._lambda(g)))
        return pairs

    def _pair_grids(self, pairs: list[tuple[Any, ...]]) -> list[torch.Tensor]:
        """The closed-form sampling grid of each pair's moving view."""
        kps = self._detect([v["image"] for p in pairs for v in p[:2]])
        grids = []
        for i, (fixed, moving, _, lam) in enumerate(pairs):
            fk = self.model.to_world(kps[2 * i], fixed["geometry"])
            mk = self.model.to_world(kps[2 * i + 1], moving["geometry"])
            grids.append(self.model.solve_grid(
                fk, mk, fixed["geometry"], moving["geometry"], self.cfg.transform, lam
            ))  # fmt: skip
        return grids

    def _supervised_loss(self, g: torch.Generator) -> torch.Tensor:
        pairs = self._pairs(g, labels=True)
        losses = [
            soft_dice(sample(hots[1], grid), hots[0])
            for (_, _, hots, _), grid in zip(pairs, self._pair_grids(pairs), strict=True)
        ]
        return torch.stack(losses).mean()

    def _unsupervised_loss(self, g: torch.Generator) -> torch.Tensor:
        if self.step % 2 == 0:  # same modality: image MSE
            pairs = self._pairs(g, labels=False)
            losses = [
                mse(sample(moving["image"], grid), fixed["image"])
                for (fixed, moving, _, _), grid in zip(pairs, self._pair_grids(pairs), strict=True)
            ]
            return torch.stack(losses).mean()
        return self._consistency_loss(g)

    def _consistency_loss(self, g: torch.Generator) -> torch.Tensor:
        """Same subject, two synthesised contrasts, each under its own random affine: the
        mean squared deviation (normalised units) of the keypoints of one view mapped through
        the known relative affine from those of the other."""
        views = []
        for _ in range(self.cfg.batch_size):
            n = len(self.volumes.items)
            item = self.volumes.items[int(torch.randint(n, (1,), generator=g))]
            a = self._view(item, g, self.synth(item["labels"][None], generator=g)["image"])
            b = self._view(item, g, self.synth(item["labels"][None], generator=g)["image"])
            views += [a, b]
        kps = self._detect([v["image"] for v in views])
        losses = []
        for i in range(0, len(views), 2):
            a, b, ka, kb = views[i], views[i + 1], kps[i][0], kps[i + 1][0]
            # a point y of view a is the original point M_a y, which view b shows at M_b^-1 M_a y
            rel = (torch.linalg.inv(b["matrix"][0]) @ a["matrix"][0]).to(ka)
            losses.append(((transform_points(rel, ka) - kb) ** 2).sum(-1).mean())
        return torch.stack(losses).mean()

    def checkpoint_extra(self) -> dict[str, Any]:
        """The anatomical keypoints' labels (keypoint k is the centroid of label k)."""
        if not self.anatomy_labels:
            return {}
        return {"anatomical_labels": [int(v) for v in self.anatomy_labels],
                "anatomical_dataset": self.cfg.anatomical_dataset}  # fmt: skip

    # -- loop ------------------------------------------------------------------------------
    def total_steps(self) -> int:
        return self.cfg.pretrain_steps + self.cfg.anatomical_steps + self.cfg.steps

    def phase(self) -> str:
        if self.step < self.cfg.pretrain_steps:
            return "pretrain"
        if self.step < self.cfg.pretrain_steps + self.cfg.anatomical_steps:
            return "anatomical"
        return self.cfg.mode

    def loss(self, g: torch.Generator) -> torch.Tensor:
        phase = self.phase()
        if phase == "pretrain":
            return self._pretrain_loss(g)
        if phase == "anatomical":
            return self._anatomical_loss(g)
        if phase == "supervised":
            every = self.cfg.consistency_every
            if every and self.step % every == 0:
                return self._consistency_loss(g)
            every = self.cfg.anatomical_every
            if every and self.step % every == 0:
                return self._anatomical_loss(g)
            return self._supervised_loss(g)
        return self._unsupervised_loss(g)
