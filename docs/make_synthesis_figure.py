"""Draw several synthetic contrasts from one real SynthSeg label map and save docs/synthesis.png.

python docs/make_synthesis_figure.py [--data ../shared/data] [-o docs/synthesis.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from unireg.data import LabelSynthesis, Manifest, Preprocessing, VolumeDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--subject", default="synthseg_16")
    parser.add_argument("--contrasts", type=int, default=6)
    parser.add_argument("-o", "--output", default=str(Path(__file__).with_name("synthesis.png")))
    args = parser.parse_args()
    manifest = Manifest.read(Path(args.data) / "manifest.csv")
    entries = manifest.select(dataset="synthseg", subject=args.subject)
    volumes = VolumeDataset(
        entries, Preprocessing(spacing=1.5, shape=(128, 144, 128), center="mass")
    )
    labels = volumes[0]["labels"][None]  # (1, 1, X, Y, Z), RAS
    synth = LabelSynthesis()
    start = time.perf_counter()
    images = [synth(labels, seed=s)["image"][0, 0] for s in range(args.contrasts)]
    per_image = (time.perf_counter() - start) / args.contrasts
    lab = labels[0, 0]
    mid = [n // 2 for n in lab.shape]
    views = [
        ("axial", lambda v: v[:, :, mid[2]].T),
        ("coronal", lambda v: v[:, mid[1], :].T),
    ]
    cols = 1 + args.contrasts
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.6))
    shuffled = torch.randperm(int(lab.max()) + 1, generator=torch.Generator().manual_seed(0))
    for row, (name, cut) in enumerate(views):
        ax = axes[row, 0]
        ax.imshow(cut(shuffled[lab].float()), origin="lower", cmap="nipy_spectral")
        ax.set_title("real label map" if row == 0 else "")
        ax.set_ylabel(name)
        for c, img in enumerate(images, start=1):
            axes[row, c].imshow(cut(img), origin="lower", cmap="gray", vmin=0, vmax=1)
            if row == 0:
                axes[row, c].set_title(f"seed {c - 1}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{args.subject}: synthetic images from one label map "
        f"({per_image:.2f} s per 128x144x128 image on CPU)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}; {per_image:.2f} s per synthetic image")


if __name__ == "__main__":
    main()
