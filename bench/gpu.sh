#!/usr/bin/env bash
# The GPU check in one call on a CUDA machine: real training runs first (the figures we lack most), then the
# CUDA tests, then the benchmarks. Run from the repository root:
#
#     bash bench/gpu.sh [RESULTS_DIR]        # default: $OUT, else bench/gpu-results
#
# Each step has its own time limit, and the whole script a budget (GPU_BUDGET seconds, default 420): a step
# that fails or runs out of time costs only itself, and a step that no longer fits is skipped. After every
# step, RESULTS_DIR holds what has been measured so far, in few files (the device tool brings back at most 8):
#   steps.tsv        one line per step: name, exit status (124: out of time), seconds, limit
#   steps.log        every step's output, in order
#   results.tar.gz   the benchmark JSON and table, each run's metrics.jsonl and summary, nvidia-smi
#
# It installs nothing: the machine needs torch with CUDA, torchvision, onnx, onnxruntime, onnxscript, typer,
# matplotlib and pytest-benchmark (the device image has them), and Fashion-MNIST where fmnist finds it; a
# machine without internet gets the four .gz files carried along in ./data/FashionMNIST/raw:
#     mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/
# then, with the device tool: run(command="bash bench/gpu.sh", carry=["data"]).
set -uo pipefail
results=${1:-${OUT:-bench/gpu-results}}
work=$(mktemp -d)            # everything a step writes; packed into results.tar.gz after each step
mkdir -p "$results" "$work/runs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CI=1   # CI: missing data fails, not skips
budget=${GPU_BUDGET:-420}
started=$SECONDS
printf 'step\tstatus\tseconds\tlimit\n' > "$results/steps.tsv"

pack() { tar -czf "$results/results.tar.gz.tmp" -C "$work" . && mv "$results/results.tar.gz.tmp" "$results/results.tar.gz"; }

# step NAME LIMIT COMMAND...: run it with a time limit (cut to what is left of the budget), log and record it.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$results/steps.tsv"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): $*" | tee -a "$results/steps.log"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$work/$name.log" 2>&1
    local status=$?
    tail -n 40 "$work/$name.log" | tee -a "$results/steps.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" "$limit" | tee -a "$results/steps.tsv"
    pack
}

# train NAME FLAGS...: one `fmnist train --device cuda` run in its own folder (metrics.jsonl kept).
train() { local name=$1; shift; step "$name" 150 python3 -m fmnist.cli train --device cuda --out "$work/runs/$name" "$@"; }

step environment 60 bash -c 'nvidia-smi; python3 -c "import torch, sys; assert torch.cuda.is_available(), \"no CUDA\"; \
print(\"torch\", torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), \"python\", sys.version)"'

# The tutorial's recipe (batch 100): the epoch time. Then the tuned recipe shortened to 15 epochs: the training
# time to 90% test accuracy. Each summary gives the one-off torch.compile time apart from the training time.
train seed-eager --recipe seed
train tuned15-eager --epochs 15
train seed-compile --recipe seed --compile
train seed-amp --recipe seed --amp
train tuned15-compile-amp --epochs 15 --compile --amp

# A CUDA checkpoint on a machine without CUDA: the README's torch.load, evaluate and export.
step cpu-reads-cuda-checkpoint 120 env CUDA_VISIBLE_DEVICES= bash -c "
python3 -c 'import torch; c = torch.load(\"$work/runs/seed-eager/fmnist.pt\", weights_only=True); print(\"loaded, epoch\", c[\"epoch\"])' &&
python3 -m fmnist.cli evaluate --checkpoint $work/runs/seed-eager/fmnist.pt --json | head -n 3 &&
python3 -m fmnist.cli export --onnx --checkpoint $work/runs/seed-eager/fmnist.pt --output $work/seed.onnx"

# The tests (the sweep's need Optuna and PostgreSQL, which the GPU machine lacks), CUDA ones included.
step tests 180 python3 -m pytest tests -q -x --ignore=tests/test_sweep.py -p no:cacheprovider

# The benchmarks: training (CPU baselines and every CUDA path), then inference.
step bench-train 240 python3 -m pytest bench/test_train_speed.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$work/bench-train.json"
step bench-inference 120 python3 -m pytest bench/test_inference_speed.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$work/bench-inference.json"
step bench-report 30 bash -c "for f in $work/bench-*.json; do python3 -m bench.report \$f; done > $work/bench.md; cat $work/bench.md"

echo "== done in $((SECONDS - started)) s; steps:" | tee -a "$results/steps.log"
cat "$results/steps.tsv"
