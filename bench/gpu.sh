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

# The tutorial's recipe (batch 100) for the epoch time, then the tuned recipe, shortened, for the training time
# to 90% test accuracy; each summary gives the one-off torch.compile time apart.
for flags in "--recipe seed" "--recipe seed --compile" "--recipe seed --compile --amp" \
             "--epochs 15 --compile" "--epochs 15 --compile --amp"; do
    run=$((${run:-0} + 1))
    echo "== run $run: fmnist train --device cuda $flags"
    python3 -m fmnist.cli train --device cuda $flags --out "$results/train" 2>&1 | tail -n 18
    cp "$results/train/metrics.jsonl" "$results/metrics-$run.jsonl"
done | tee "$results/train.log"
