"""The brain-mask network (`unireg strip`, `unireg.methods.extraction`): mask Dice and the reading
"brain-extracted or not" that `brain = "auto"` acts on, per image (docs/howto/brain_extraction.md):

    python bench/brainmask_benchmark.py --split test [--model M] [--draws 3] [--threads 2]
        # IXI T1s of the split with their skull (reference: DLMUSE labels > 0, closed by one
        # voxel; must read "head"), the same brain-extracted by their labels and drawn
        # brain-only from their labels as the evaluation's `skullstrip` and `synth` shifts do
        # (must read "extracted"), whole heads of random contrast drawn from the split's
        # SynthSeg maps at 2 mm (reference: their brain classes, closed; "head"); with
        # --split test also IXI002's HD-BET-extracted T1 and T2 against HD-BET's masks
        # ("extracted") and three brain-extracted templates (ICBM 2009a from nilearn, Colin27
        # and MNI152 from ANTsPy, 1.7-1.9 l above their minimum; "extracted"; the ICBM one
        # scored against its grey + white matter > 0.5, which leaves its CSF out)

Prints one row per image (Dice, brain volume, the reading, seconds) and the means. Needs
../shared/data (or $UNIREG_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, int(a.sum() + b.sum())))


def closed(labels: torch.Tensor) -> torch.Tensor:
    from unireg.methods.extraction.training import closed_mask

    return closed_mask(labels[None].float())[0]


def cases(split: str, draws: int):
    """(group, name, image, reference mask (C, *shape) or None, expected reading)."""
    from unireg.data.manifest import Manifest
    from unireg.data.synthesis import LabelSynthesis
    from unireg.evaluation.shifts import Shifted, skullstrip, synth
    from unireg.io.image import Image, LabelMap, load_image, load_labels, resample
    from unireg.training.base import _SYNTHSEG_NON_BRAIN

    manifest = Manifest.read(DATA / "manifest.csv")
    for e in manifest.select(dataset="ixi", split=split):
        if e.modality != "T1":
            continue
        image, labels = load_image(e.image), load_labels(e.labels)
        ref = closed(labels.data)
        yield "IXI head", e.subject, image, ref, False
        s = Shifted(fixed=image, moving=image, fixed_labels=labels, moving_labels=labels)
        yield "IXI skullstrip", e.subject, skullstrip(s, 0).moving, ref, True
        yield "IXI synth", e.subject, synth(s, 0).moving, ref, True
    drawer = LabelSynthesis(deformation=0.0)
    non_brain = torch.tensor(sorted(_SYNTHSEG_NON_BRAIN))
    for e in manifest.select(dataset="synthseg", split=split):
        labels = load_labels(e.labels)
        labels = resample(labels, labels.geometry.regrid((2.0, 2.0, 2.0)))
        assert isinstance(labels, LabelMap)
        brain = labels.data.masked_fill(torch.isin(labels.data, non_brain), 0)
        ref = closed(brain)
        for d in range(draws):
            out = drawer(labels.data[None], spacing=labels.spacing, seed=d)
            image = Image(out["image"][0].float(), labels.affine)
            yield "SynthSeg head", f"{e.subject} draw {d}", image, ref, False
    if split != "test":
        return
    folder = DATA / "ixi002-t1t2"
    for mod in ("T1", "T2"):
        image = load_image(folder / f"hd_bet_IXI002-Guys-0828-{mod}.nii.gz")
        mask = load_labels(folder / f"hd_bet_mask_IXI002-Guys-0828-{mod}.nii.gz")
        yield "HD-BET", f"IXI002 {mod}", image, mask.data, True
    icbm = DATA / "mni152"
    t1 = load_image(icbm / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = load_image(icbm / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").data
    wm = load_image(icbm / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").data
    yield "template", "ICBM 2009a", t1, closed(((gm + wm) > 0.5).to(torch.uint8)), True
    for name in ("ch2", "mni"):
        yield (
            "template",
            f"ANTsPy {name}",
            load_image(DATA / "antspy" / f"{name}.nii.gz"),
            None,
            False,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--model", default=None, help="brain-mask checkpoint (default: shipped)")
    ap.add_argument("--draws", type=int, default=3, help="synthetic draws per SynthSeg map")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from unireg.methods.extraction.inference import (
        background_share,
        brain_mask,
        is_brain_extracted,
        load_brain_model,
        outside_share,
    )

    model = load_brain_model(args.model)
    print("| group | image | Dice | brain (ml) | background | beyond 8 mm | reads | expected "
          "| seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    scores: dict[str, list[float]] = {}
    wrong = []
    for group, name, image, ref, expected in cases(args.split, args.draws):
        t0 = time.perf_counter()
        mask = brain_mask(image, model)
        seconds = time.perf_counter() - t0
        reading = is_brain_extracted(image, mask)
        background, beyond = background_share(image), outside_share(image, mask)
        voxel_ml = abs(float(torch.det(torch.from_numpy(image.affine[:-1, :-1])))) / 1000
        ml = float(mask.data.sum()) * voxel_ml
        d = dice(mask.data[0], ref[0]) if ref is not None else float("nan")
        if ref is not None:
            scores.setdefault(group, []).append(d)
        if reading != expected:
            wrong.append(f"{group} {name}")
        print(f"| {group} | {name} | {d:.3f} | {ml:.0f} | {background:.2f} | {beyond:.3f} | "
              f"{'extracted' if reading else 'head'} | "
              f"{'extracted' if expected else 'head'} | {seconds:.2f} |")  # fmt: skip
    for kind, values in scores.items():
        print(f"mean Dice, {kind}: {statistics.mean(values):.3f} over {len(values)}")
    print(f"readings wrong: {len(wrong)} {wrong}")


if __name__ == "__main__":
    main()
