#!/usr/bin/env bash
# Every GPU measurement and test of the project in one run on one CUDA GPU (its steps time out
# after 3 + 3 + 1.5 + 2 minutes, inside the device machine's 10 minutes a command),
# from the repository root, after bench/gpu_prepare.sh (whose .gpu/ travels with it):
#   OUT=results bash bench/gpu_check.sh
# 1. tests/methods/test_cuda.py: every method on CUDA against the CPU, batched pairs against
#    single ones, batch mode under torchrun with NCCL, the HTML report of a CUDA result;
# 2. `unireg evaluate --device cuda` on the 6 ordered IXI test pairs: Dice and warm time per
#    pair of every learned method and the GPU-capable solvers, each method warmed up once;
# 3. DIO's network and solver times apart (bench/dio_benchmark.py device);
# 4. `unireg batch` pairs/s on the 42 IXI training pairs, 8 pairs a batch
#    (bench/batch_benchmark.py).
# Results: $OUT/gpu.txt, cuda_tests.log, evaluate.md, dio_device.log, batch.log (at most 8
# files come back from the device machine). UNIREG_GPU_CHECK_DEVICE=cpu runs the same commands
# on the CPU (a dry run of the script itself).
set -uo pipefail
OUT=${OUT:-gpu_out}
DEV=${UNIREG_GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
SITE=/tmp/unireg-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/wheels/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1 UNIREG_SHARED_DATA="$PWD/.gpu/data"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    nproc
} > "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/methods/test_cuda.py \
    > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests: exit $?" >> "$OUT/gpu.txt"
EVAL=$(mktemp -d)
timeout 180 python3 -m unireg evaluate --manifest .gpu/data/manifest.csv --dataset ixi \
    --split test --methods sitreg keymorph dio dio:diffeo dio:model=lku-e avsm unireg:affine-gn unireg:syn \
    --device "$DEV" --no-hd95 --quiet -o "$EVAL/eval" > "$OUT/evaluate.log" 2>&1
echo "evaluate: exit $?" >> "$OUT/gpu.txt"
cp "$EVAL/eval/summary.md" "$OUT/evaluate.md" 2>/dev/null
timeout 90 python3 bench/dio_benchmark.py device --device "$DEV" > "$OUT/dio_device.log" 2>&1
echo "dio device: exit $?" >> "$OUT/gpu.txt"
timeout 120 python3 bench/batch_benchmark.py --device "$DEV" --batch-size 8 --no-single \
    --no-kill > "$OUT/batch.log" 2>&1
echo "batch: exit $?" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
