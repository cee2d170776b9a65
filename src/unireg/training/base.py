"""What every learned method's training shares: the config file (TOML) with the data and
augmentation settings, the preprocessed training volumes held in memory, and the trainer loop
(seeded per step, checkpoints with their config, resume, progress bar)."""

from __future__ import annotations

import math
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unireg.cpu import available_cpus
from unireg.data import Augmentation, LabelSynthesis, Manifest, Preprocessing, VolumeDataset
from unireg.data.augment import apply_affine, random_affine_matrix, smooth_displacement
from unireg.data.synthesis import degrade_resolution
from unireg.losses import one_hot
from unireg.spatial.geometry import Geometry
from unireg.spatial.grid import voxel_to_normalized_scale
from unireg.spatial.warp import warp
from unireg.training.checkpoint import (
    Checkpoint,
    read_checkpoint,
    read_latest_checkpoint,
    save_checkpoint,
)
from unireg.training.distributed import Distributed


@dataclass
class TrainConfig:
    """Settings every training run has (the TOML keys have these names); methods add theirs."""

    # settings that are paths, relative to the config file
    path_settings: ClassVar[tuple[str, ...]] = ("output", "manifest", "cache_dir", "init")
    output: str = "runs/train"
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: torch's default (under torchrun on CPUs: the CPUs shared out)
    # draws of the method's loss averaged per step, shared out over the torchrun processes
    # (0: one per process); the same global batch gives the same run on any process count
    global_batch: int = 0
    # data (paths relative to the config file)
    manifest: str = "../shared/data/manifest.csv"
    datasets: list[str] = field(default_factory=lambda: ["ixi", "synthseg"])
    split: str = "train"
    # subjects of those datasets kept out of the run (manifest `subject` names): held out
    # for validating it
    exclude_subjects: list[str] = field(default_factory=list)
    spacing_mm: float = 2.0
    shape: list[int] = field(default_factory=lambda: [96, 112, 96])
    cache_dir: str = ""
    init: str = ""  # a checkpoint whose weights start the run (fine-tuning); "" : random
    brain_labels_only: bool = True  # synthseg: drop the non-brain classes from the Dice
    max_labels: int = 16  # label channels per step in a Dice loss (random subset)
    # schedule
    steps: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": lr decays to lr_final over the run's steps
    lr_final: float = 0.0
    checkpoint_every: int = 100
    # augmentation
    rotation: float = 180.0
    rotation_warmup: int = 0  # steps over which the rotation range grows from 0 to `rotation`
    translation: float = 10.0
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    shear: float = 0.05
    bias_field: float = 0.3
    noise: float = 0.02
    synthesis_probability: float = 0.5  # IXI: chance of a synthesised image instead of T1
    crop: list[int] = field(default_factory=list)  # pairs: random crops of this shape ([]: none)
    skull_strip_probability: float = 0.0  # chance a real image is masked to its brain labels
    invert_probability: float = 0.0  # chance a skull-stripped image's contrast is inverted
    # chance a synthesised image is masked to its brain labels (a brain-extracted scan)
    synthesised_skull_strip_probability: float = 0.0
    # acquisition at a lower resolution along random axes (thick slices, coarse scans): each
    # axis of a view, with resolution_probability, by a factor in [1, resolution_change]
    resolution_change: float = 1.0  # 1: off
    resolution_probability: float = 0.3
    # pairs of one subject with itself (a follow-up scan): the same image under each view's
    # own affine, bias and noise, the second deformed smoothly by up to this many mm
    same_subject_probability: float = 0.0
    same_subject_deformation: float = 8.0

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any):
        """Read a TOML file; unknown keys are errors that name the file and the key."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}")
        data.update(overrides)
        cfg = cls(**data)
        base = path.parent
        for key in cls.path_settings:
            value = getattr(cfg, key)
            if value and not Path(value).is_absolute():
                setattr(cfg, key, str((base / value).resolve()))
        try:
            cfg.check_common()
            cfg.check()
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        return cfg

    def check(self) -> None:
        """Method configs validate their own settings (:meth:`check_common` checks these)."""

    def check_common(self) -> None:
        """The settings every training run has: learning-rate schedule and probabilities."""
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lr <= 0 or self.lr_final < 0:
            raise ValueError(f"lr must be > 0 and lr_final >= 0, got {self.lr}, {self.lr_final}")
        if self.crop and (
            len(self.crop) != len(self.shape)
            or any(c < 8 or c > s for c, s in zip(self.crop, self.shape, strict=True))
        ):
            raise ValueError(f"crop {self.crop} must have {len(self.shape)} sizes in [8, shape "
                             f"{self.shape}]")  # fmt: skip
        if self.same_subject_deformation < 0:
            raise ValueError(
                f"same_subject_deformation must be >= 0 mm, got {self.same_subject_deformation}"
            )
        if self.resolution_change < 1.0:
            raise ValueError(f"resolution_change must be >= 1, got {self.resolution_change}")
        for key in (
            "synthesis_probability",
            "skull_strip_probability",
            "invert_probability",
            "synthesised_skull_strip_probability",
            "resolution_probability",
            "same_subject_probability",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")

    def model(self) -> nn.Module:
        """The network this config trains (seeded by the trainer before it is built)."""
        raise NotImplementedError

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(spacing=self.spacing_mm, shape=tuple(self.shape), center="mass")


def skull_strip(image: torch.Tensor, labels: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """``image`` ``(B, 1, *shape)`` (intensities in [0, 1]) zeroed outside the non-zero
    ``labels`` dilated by one voxel, and rescaled as a stripped image is normalised (its
    99.5th percentile inside the mask to 1, clipped); ``invert``: ``1 - x`` inside the mask
    (T2-like)."""
    d = image.ndim - 2
    pool = torch.nn.functional.max_pool3d if d == 3 else torch.nn.functional.max_pool2d
    mask = pool((labels > 0).float(), kernel_size=3, stride=1, padding=1).to(image) > 0
    out = torch.zeros_like(image)
    for b in range(image.shape[0]):
        inside = image[b][mask[b]]
        if inside.numel() == 0:
            continue
        top = float(torch.quantile(inside.float(), 0.995))
        scaled = (inside / top).clamp(0, 1) if top > 0 else inside
        out[b][mask[b]] = (1 - scaled) if invert else scaled
    return out


# non-brain SynthSeg classes (the shared data README): dropped from the brain Dice
_SYNTHSEG_NON_BRAIN = {136, 137, 163, 164, *range(502, 531)}


class TrainingVolumes:
    """Preprocessed training volumes held in memory: per dataset, per subject, the image (if
    any), the label map and the grid geometry."""

    def __init__(self, cfg: TrainConfig) -> None:
        manifest = Manifest.read(cfg.manifest)
        entries = [
            e
            for e in manifest
            if e.dataset in cfg.datasets and e.split == cfg.split and e.labels is not None
            and (e.dataset != "ixi" or e.modality == "T1")
        ]  # fmt: skip
        excluded = set(cfg.exclude_subjects)
        unknown = excluded - {e.subject for e in entries}
        if unknown:
            raise ValueError(
                f"{cfg.manifest}: exclude_subjects names no {cfg.split} volume of "
                f"{cfg.datasets}: {sorted(unknown)}"
            )
        entries = [e for e in entries if e.subject not in excluded]
        if not entries:
            raise ValueError(f"{cfg.manifest}: no {cfg.split} volumes of {cfg.datasets}")
        ds = VolumeDataset(entries, cfg.preprocessing(), cfg.cache_dir or None)
        self.items: list[dict[str, Any]] = []
        for i in tqdm(range(len(ds)), desc="preprocessing", leave=False):
            item = ds[i]
            labels = item["labels"]
            if item["dataset"] == "synthseg" and cfg.brain_labels_only:
                drop = torch.isin(labels, torch.tensor(sorted(_SYNTHSEG_NON_BRAIN)))
                brain = labels.masked_fill(drop, 0)
            else:
                brain = labels
            shape = tuple(labels.shape[1:])
            self.items.append({
                "dataset": item["dataset"], "subject": item["subject"],
                "image": item.get("image"), "labels": labels, "brain": brain,
                "geometry": Geometry(shape, item["affine"].numpy()),
            })  # fmt: skip
        self.by_dataset: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            self.by_dataset.setdefault(it["dataset"], []).append(i)

    def to(self, device: torch.device | str) -> TrainingVolumes:
        """Move the volumes' tensors to ``device`` (in place; a no-op where they already are)."""
        for item in self.items:
            for key in ("image", "labels", "brain"):
                if item[key] is not None:
                    item[key] = item[key].to(device)
        return self


class Trainer:
    """The loop: ``train_step`` draws everything from a generator seeded by the step (so a
    resumed run equals an uninterrupted one), ``loss(g)`` is the method's; checkpoints go to
    ``output/last.pt`` every ``checkpoint_every`` steps and at the end."""

    method = ""

    def __init__(self, cfg: TrainConfig, volumes: TrainingVolumes | None = None):
        self.cfg = cfg
        self.dist = Distributed.from_environment(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.dist.joined and cfg.device == "cpu":  # the node's CPUs shared out
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
            torch.set_num_threads(max(1, available_cpus() // max(1, local)))
        self.device = self.dist.device or torch.device(cfg.device)
        self.global_batch = cfg.global_batch or self.dist.world_size
        if self.global_batch % self.dist.world_size:
            raise ValueError(
                f"global_batch = {cfg.global_batch} is not a multiple of the "
                f"{self.dist.world_size} processes"
            )
        torch.manual_seed(cfg.seed)  # the same seed builds the same initial network
        self.model = cfg.model().to(self.device)
        self.volumes = volumes or TrainingVolumes(cfg)
        self.volumes.to(self.device)  # synthesis and augmentation run where the network does
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step = 0
        self.out = Path(cfg.output)
        self.synth = LabelSynthesis(deformation=0.0, resolution=1.0)
        self.aug = Augmentation(bias_field=cfg.bias_field, noise=cfg.noise)
        latest = read_latest_checkpoint(self.out / "last.pt")  # falls back to last.prev.pt
        self.resumed_from = None if latest is None else latest.path
        if latest is not None:
            self._resume(latest)
        elif cfg.init:
            self._initialise(Path(cfg.init))
        self.dist.broadcast_module(self.model)

    def _initialise(self, path: Path) -> None:
        """Start from the weights of the checkpoint ``path`` (step 0, a fresh optimiser); its
        network must be the one this config builds, except for modules this config adds that
        declare themselves new-start safe (``new_modules()``: e.g. KeyMorph's decoder levels,
        which start as an identity), kept at their initial weights."""
        state = self.init_state(read_checkpoint(path))
        fresh = tuple(getattr(self.model, "new_modules", lambda: [])())
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            wrong = [k for k in missing if not k.startswith(fresh)] + list(unexpected)
            if wrong:
                raise RuntimeError(f"mismatched keys {wrong[:4]}")
        except RuntimeError as err:
            msg = f"{path}: init checkpoint does not fit this config's model ({err})"
            raise ValueError(msg) from err

    def init_state(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """The weights of ``checkpoint`` that start the run (``init``): all of them; a
        method may take a part (KeyMorph: a two-stage model's first stage)."""
        return checkpoint.float_state()

    def _resume(self, checkpoint: Checkpoint) -> None:
        self.model.load_state_dict(checkpoint.float_state())
        if checkpoint.optimizer:
            self.opt.load_state_dict(checkpoint.optimizer)
        self.step = checkpoint.step

    def _generator(self, draw: int = 0) -> torch.Generator:
        # one generator per step and draw of the global batch: resuming at step s draws
        # exactly what step s drew before, on any number of processes (a CPU generator keeps
        # the seed's low 32 bits: draws are 1e9 + 7 apart in them)
        seed = self.cfg.seed * 1_000_003 + self.step + draw * 1_000_000_007
        return torch.Generator().manual_seed(seed % 2**32)

    # -- data ------------------------------------------------------------------------------
    def _image(self, item: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """The subject's T1, or an image synthesised from its label map (SynthSeg always).

        A real image is skull-stripped with ``skull_strip_probability`` (zero outside its
        brain labels dilated by one voxel, as brain-extraction tools leave it), and a stripped
        one has its contrast inverted inside the brain with ``invert_probability`` (``1 - x``
        on the [0, 1] intensities: bright CSF, dark white matter, as in T2); a synthesised one
        is stripped with ``synthesised_skull_strip_probability``. Then, with
        ``resolution_change > 1``, the view is degraded to a lower resolution along random
        axes (:func:`~unireg.data.synthesis.degrade_resolution`)."""
        cfg = self.cfg
        use_real = item["image"] is not None and (
            float(torch.rand(1, generator=g)) >= cfg.synthesis_probability
        )
        # no draws when a setting is off: configs without it keep their random stream
        if not use_real:
            image = self.synth(item["labels"][None], generator=g)["image"]
            if cfg.synthesised_skull_strip_probability > 0 and (
                float(torch.rand(1, generator=g)) < cfg.synthesised_skull_strip_probability
            ):
                image = skull_strip(image, item["brain"][None])
        else:
            image = item["image"][None]
            if cfg.skull_strip_probability > 0 and (
                float(torch.rand(1, generator=g)) < cfg.skull_strip_probability
            ):
                image = skull_strip(image, item["brain"][None], invert=(
                    cfg.invert_probability > 0
                    and float(torch.rand(1, generator=g)) < cfg.invert_probability
                ))  # fmt: skip
        if cfg.resolution_change > 1:
            image = degrade_resolution(image, g, cfg.resolution_change, cfg.resolution_probability)
        return image

    def rotation_range(self) -> float:
        """Maximum rotation (degrees) at the current step: a linear curriculum over the first
        ``rotation_warmup`` steps, then ``rotation``."""
        cfg = self.cfg
        if cfg.rotation_warmup <= 0:
            return cfg.rotation
        return cfg.rotation * min(1.0, (self.step + 1) / cfg.rotation_warmup)

    def _affine(
        self, shape: tuple[int, ...], g: torch.Generator, rotation: float | None = None
    ) -> torch.Tensor:
        """A random augmentation affine (normalised grid map); ``rotation`` (degrees per
        axis) replaces :meth:`rotation_range` when given."""
        cfg = self.cfg
        rotation = self.rotation_range() if rotation is None else rotation
        return random_affine_matrix(
            shape, 1, g, spacing=[cfg.spacing_mm] * 3, rotation=rotation,
            translation=cfg.translation, scale=tuple(cfg.scale), shear=cfg.shear,
        ).float()  # fmt: skip

    def _view(
        self,
        item: dict[str, Any],
        g: torch.Generator,
        image: torch.Tensor | None = None,
        rotation: float | None = None,
    ) -> dict[str, Any]:
        """One augmented view of a subject: image, brain labels, the normalised matrix (view
        -> original grid) and the geometry (``rotation``: see :meth:`_affine`)."""
        image = self._image(item, g) if image is None else image
        matrix = self._affine(tuple(image.shape[2:]), g, rotation)
        img, lab = apply_affine(image, item["brain"][None], matrix)
        assert img is not None and lab is not None
        img = self.aug(img, generator=g)["image"]
        return {"image": img.to(self.device), "labels": lab.to(self.device),
                "matrix": matrix, "geometry": item["geometry"]}  # fmt: skip

    def _pair_items(self, g: torch.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
        """Two different subjects of one dataset (datasets with at least two)."""
        names = sorted(n for n, idx in self.volumes.by_dataset.items() if len(idx) > 1)
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        idx = self.volumes.by_dataset[name]
        a, b = torch.randperm(len(idx), generator=g)[:2].tolist()
        return self.volumes.items[idx[a]], self.volumes.items[idx[b]]

    def _pair_views(
        self, g: torch.Generator, rotations: tuple[float | None, float | None] = (None, None)
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The two augmented views of a training pair (``rotations``: each view's, see
        :meth:`_affine`): two different subjects of one dataset (:meth:`_pair_items`), or,
        with ``same_subject_probability``, one subject twice, as a follow-up scan sees it:
        one image (real or synthesised) under each view's own affine, bias and noise, the
        second view (image and labels) deformed by a smooth random displacement whose longest
        vector is drawn from [0, ``same_subject_deformation``] mm."""
        cfg = self.cfg
        if cfg.same_subject_probability > 0 and (
            float(torch.rand(1, generator=g)) < cfg.same_subject_probability
        ):
            item = self._pair_items(g)[0]
            image = self._image(item, g)
            a = self._view(item, g, image, rotations[0])
            b = self._view(item, g, image, rotations[1])
            shape = tuple(b["image"].shape[2:])
            largest = (0.0, cfg.same_subject_deformation / cfg.spacing_mm)  # voxels
            u = smooth_displacement(shape, g, largest).float()[None].to(self.device)
            u = u * voxel_to_normalized_scale(shape, u)
            b["image"] = warp(b["image"], u)
            b["labels"] = warp(b["labels"].float(), u, mode="nearest").round().to(b["labels"].dtype)
            return a, b
        ia, ib = self._pair_items(g)
        return self._view(ia, g, rotation=rotations[0]), self._view(ib, g, rotation=rotations[1])

    def _crop_pair(
        self, a: dict[str, Any], b: dict[str, Any], g: torch.Generator, *more: dict[str, Any]
    ) -> None:
        """Cut the same random ``crop`` box out of both views' image and labels (they share
        the grid frame), and out of any ``more`` views on that frame; nothing without
        ``crop``."""
        crop = self.cfg.crop
        if not crop:
            return
        start = [int(torch.randint(s - c + 1, (1,), generator=g))
                 for s, c in zip(self.cfg.shape, crop, strict=True)]  # fmt: skip
        box = (...,) + tuple(slice(o, o + c) for o, c in zip(start, crop, strict=True))
        for view in (a, b, *more):
            view["image"], view["labels"] = view["image"][box], view["labels"][box]

    def _label_one_hots(
        self, la: torch.Tensor, lb: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One-hot maps of a random subset (``max_labels``) of the non-zero labels both maps
        share, or None when they share none."""
        values = np.intersect1d(torch.unique(la).cpu().numpy(), torch.unique(lb).cpu().numpy())
        values = values[values != 0]
        if values.size == 0:
            return None
        if values.size > self.cfg.max_labels:
            values = values[torch.randperm(values.size, generator=g)[: self.cfg.max_labels]]
        return one_hot(la, values.tolist()), one_hot(lb, values.tolist())

    # -- loop ------------------------------------------------------------------------------
    def total_steps(self) -> int:
        return self.cfg.steps

    def phase(self) -> str:
        return "train"

    def loss(self, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def learning_rate(self) -> float:
        """The learning rate of the current step: ``lr``, or with ``lr_schedule = "cosine"``
        a half cosine from ``lr`` at step 0 to ``lr_final`` at the last step."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return cfg.lr
        frac = self.step / max(1, self.total_steps() - 1)
        return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * frac))

    def train_step(self) -> float:
        """One optimiser step on the mean loss of the global batch's draws; this process
        computes the draws ``rank, rank + world_size, ...`` and the gradients are summed over
        the processes. Returns the global batch's mean loss."""
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate()
        self.model.train()
        self.opt.zero_grad()
        total = 0.0
        for draw in range(self.dist.rank, self.global_batch, self.dist.world_size):
            loss = self.loss(self._generator(draw))
            if self.global_batch > 1:
                loss = loss / self.global_batch
            loss.backward()
            total += float(loss.detach())
        self.dist.sum_gradients(self.model)
        self.opt.step()
        self.step += 1
        return self.dist.sum(total)

    def save(self, name: str = "last.pt") -> Path:
        """Write the checkpoint ``output/name`` (rank 0 only under torchrun; every rank gets
        its path)."""
        if not self.dist.is_main:
            return self.out / name
        return save_checkpoint(
            self.out / name, self.method, self.model, optimizer=self.opt, step=self.step,
            preprocessing={"spacing_mm": self.cfg.spacing_mm, "shape": list(self.cfg.shape),
                           "center": "mass", "normalize": "percentile 0.5-99.5"},
            train_config=asdict(self.cfg), extra=self.checkpoint_extra(),
            keep_previous=name == "last.pt",
        )  # fmt: skip

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a method adds to its checkpoints' ``extra`` (nothing by default)."""
        return {}

    def run(self, progress: bool = True) -> list[float]:
        """Train to ``total_steps()``; every step's loss is also appended to
        ``output/losses.csv`` (step, phase, loss, seconds since this run started), written
        out at each checkpoint."""
        total = self.total_steps()
        losses: list[float] = []
        pending: list[str] = []
        t0 = time.perf_counter()
        log = self.out / "losses.csv"
        main = self.dist.is_main
        bar = tqdm(total=total, initial=self.step, disable=not progress or not main,
                   desc=self.method)  # fmt: skip
        while self.step < total:
            phase = self.phase()
            loss = self.train_step()
            losses.append(loss)
            elapsed = time.perf_counter() - t0
            pending.append(f"{self.step},{phase},{loss:.6g},{elapsed:.1f}\n")
            rate = len(losses) / max(elapsed, 1e-9)
            bar.set_postfix(phase=phase, loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
            bar.update(1)
            if main and (self.step % self.cfg.checkpoint_every == 0 or self.step == total):
                self.save()  # creates the output folder
                new_log = not log.exists()
                with log.open("a") as fh:
                    fh.write(("step,phase,loss,seconds\n" if new_log else "") + "".join(pending))
                pending.clear()
        bar.close()
        return losses
