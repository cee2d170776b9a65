"""Every training config in ``configs/`` reads with its method's config class, and each
fine-tuning config starts from a file the repository ships or a run an earlier config writes;
inputs a tool makes first (KeyMorph's anatomical targets) are named, with the command that
writes them, in a config's comments."""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path

import pytest

from unireg.methods import registry
from unireg.methods.base import import_object
from unireg.methods.extraction import TRAINER

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# files a config reads that a command in some config's comments writes first (``-o PATH``)
MADE = {
    (ROOT / m).resolve()
    for p in CONFIGS.glob("*.toml")
    for line in p.read_text().splitlines()
    if line.startswith("#")
    for m in re.findall(r"\s-o\s+(\S+)", line)
}


def config_class(name: str) -> type:
    method = name.split("_")[0]
    if method == "brainmask":
        return import_object(TRAINER[0])
    entry = registry.get(method)
    assert entry.config is not None, f"{name}: {method} has no training config"
    return import_object(entry.config)


def read(path: Path):
    """The config, with a tool-made input that is not there yet read as unset (after checking
    that a command in the configs' comments makes it)."""
    targets = tomllib.loads(path.read_text()).get("anatomical_targets", "")
    made = (path.parent / targets).resolve() if targets else None
    if made is None or made.is_file():
        return config_class(path.stem).from_file(path)
    assert made in MADE, f"{path.name}: nothing in configs/ says how {targets} is made"
    return config_class(path.stem).from_file(path, anatomical_targets="")


@functools.cache
def outputs_by_config() -> dict[Path, Path]:
    """Each config's run folder, read once for every parametrised case."""
    return {p: Path(read(p).output) for p in CONFIGS.glob("*.toml")}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_each_config_reads_and_starts_from_a_known_checkpoint(path):
    cfg = read(path)
    phases = ("steps", "pretrain_steps", "anatomical_steps")  # KeyMorph trains in phases
    assert sum(getattr(cfg, k, 0) for k in phases) > 0, f"{path.name}: no training steps"
    assert Path(cfg.output).parent.name == "runs", f"{path.name}: writes outside runs/"
    outputs = {out for p, out in outputs_by_config().items() if p != path}
    for key in ("init", "coarse"):  # a shipped model, or another config's run in runs/
        start = getattr(cfg, key, "")
        if start:
            assert Path(start).is_file() or Path(start).parent in outputs, f"{path.name}: {key}"


def test_the_dio_fine_tune_starts_from_the_default_model_and_holds_the_prompt_structure_out():
    cls = config_class("dio")
    base = cls.from_file(CONFIGS / "dio_ixi_2mm.toml")
    synth = cls.from_file(CONFIGS / "dio_ixi_2mm_synth.toml")
    assert Path(synth.init) == registry.model_path("dio", "lku").resolve()
    assert (synth.backbone, synth.channels, synth.features) == (
        base.backbone,
        base.channels,
        base.features,
    )
    assert "synthseg" in synth.datasets and synth.resolution_change > 1
    assert synth.curriculum == [0, 0, 0]  # the levels the started model already solves
    # the structure the label-prompt check uses, in both label sets (DLMUSE 48, SynthSeg 17)
    assert set(base.holdout_labels) <= set(synth.holdout_labels) and 17 in synth.holdout_labels
