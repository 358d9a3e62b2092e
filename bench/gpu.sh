#!/usr/bin/env bash
# The GPU check in one call on a CUDA machine (meant to take under 5 minutes): the tests, the benchmarks,
# and real training runs on the GPU (eager, --compile, --amp). Run from the repository root:
#
#     bash bench/gpu.sh [RESULTS_DIR]        # default: $OUT, else bench/gpu-results
#
# It installs nothing: the machine needs torch with CUDA, torchvision, onnx, onnxruntime, onnxscript, typer
# and pytest-benchmark, and Fashion-MNIST where fmnist finds it (FMNIST_DATA, ./data/FashionMNIST/raw, or
# /usr/share/datasets/fashion-mnist); a machine without internet gets the four .gz files copied along.
set -euo pipefail
results=${1:-${OUT:-bench/gpu-results}}
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CI=1   # CI: missing data fails, not skips

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$results/gpu.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__)"

python3 -m pytest tests -q 2>&1 | tee "$results/tests.log"
python3 -m pytest bench/ --benchmark-only --benchmark-json "$results/bench.json" -q 2>&1 | tee "$results/bench.log"
python3 -m bench.report "$results/bench.json" | tee "$results/bench.md"

for flags in "" "--compile" "--amp"; do
    echo "== fmnist train --device cuda --epochs 3 $flags"
    python3 -m fmnist.cli train --device cuda --epochs 3 $flags --out "$results/train" 2>&1 | tail -n 14
done | tee "$results/train.log"
