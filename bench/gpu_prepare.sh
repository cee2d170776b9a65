#!/usr/bin/env bash
# Prepares bench/gpu_check.sh on this machine (run from the repository root): the wheels the
# GPU machine's Python lacks (nibabel; its image has CUDA PyTorch, NumPy, SciPy, matplotlib,
# tqdm, pytest and Hypothesis) and the IXI pairs the check measures, in .gpu/ (ignored by git;
# carry it with the run). Needs pip's index and ../shared/data (or $UNIREG_SHARED_DATA).
set -euo pipefail
DATA=${UNIREG_SHARED_DATA:-../shared/data}
[ -f "$DATA/manifest.csv" ] || { echo "gpu_prepare: no $DATA/manifest.csv" >&2; exit 1; }
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .gpu/wheels "nibabel>=5.2,<6"
# the IXI T1 subjects (both splits: the test pairs are measured, the training pairs batched)
head -1 "$DATA/manifest.csv" > .gpu/data/manifest.csv
grep '^ixi,.*,T1,' "$DATA/manifest.csv" >> .gpu/data/manifest.csv
tail -n +2 .gpu/data/manifest.csv | while IFS=, read -r _ _ _ image labels _; do
    mkdir -p ".gpu/data/$(dirname "$image")" ".gpu/data/$(dirname "$labels")"
    cp "$DATA/$image" ".gpu/data/$image"
    cp "$DATA/$labels" ".gpu/data/$labels"
done
du -sh .gpu
