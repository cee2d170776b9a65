"""Time loading the IXI set at 2 mm: from NIfTI with preprocessing (what training without a cache
would do every step), versus from unireg's disk cache; and label-map synthesis per image.

    python bench/data_benchmark.py [--data ../shared/data] [--repeats 5]

Prints per-sample times and the cache speed-up (ratio against re-reading NIfTI in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unireg.data import LabelSynthesis, Manifest, Preprocessing, VolumeDataset


def per_sample(ds: VolumeDataset, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for i in range(len(ds)):
            start = time.perf_counter()
            ds[i]
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = Manifest.read(Path(args.data) / "manifest.csv").select(dataset="ixi")
    pre = Preprocessing(spacing=2.0, shape=(96, 112, 96))
    print(f"IXI: {len(manifest)} T1 volumes + DLMUSE labels -> {pre}")
    uncached = VolumeDataset(manifest, pre)
    nifti = per_sample(uncached, 1)
    with tempfile.TemporaryDirectory() as tmp:
        cached = VolumeDataset(manifest, pre, cache_dir=tmp)
        build = per_sample(cached, 1)
        hits = per_sample(cached, args.repeats)
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.pt")) / len(manifest) / 2**20
    med_nifti, med_hit = statistics.median(nifti), statistics.median(hits)
    print(f"from NIfTI + preprocessing: {med_nifti * 1e3:8.1f} ms/sample (median of {len(nifti)})")
    print(f"first pass, writing cache:  {statistics.median(build) * 1e3:8.1f} ms/sample")
    print(
        f"from cache:                 {med_hit * 1e3:8.1f} ms/sample (median of {len(hits)}, "
        f"{size:.1f} MiB per sample on disk)"
    )
    print(f"cache speed-up: {med_nifti / med_hit:.0f}x")
    # synthesis: one image from each of the 20 SynthSeg label maps (1 mm 256^3 -> 2 mm)
    maps = Manifest.read(Path(args.data) / "manifest.csv").select(dataset="synthseg")
    label_maps = VolumeDataset(maps, Preprocessing(spacing=2.0, shape=(96, 112, 96)))
    synth = LabelSynthesis()
    times = []
    for i in range(len(label_maps)):
        labels = label_maps[i]["labels"][None]
        start = time.perf_counter()
        out = synth(labels, seed=i)
        times.append(time.perf_counter() - start)
        assert torch.isfinite(out["image"]).all()
    print(
        f"label-map synthesis, 96x112x96 at 2 mm: {statistics.median(times) * 1e3:.0f} ms/image "
        f"(median over the {len(times)} SynthSeg label maps, one image each)"
    )


if __name__ == "__main__":
    main()
