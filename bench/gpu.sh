#!/usr/bin/env bash
# The GPU check in one call on a CUDA machine. Run from the repository root:
#
#     bash bench/gpu.sh [RESULTS_DIR]        # default: $OUT, else bench/gpu-results
#
# Each step has its own time limit, and the whole script a budget (GPU_BUDGET seconds, default 420): a step
# that fails or runs out of time costs only itself, and a step that no longer fits is skipped. The cheap
# steps that bring figures come first, one pytest call per benchmark path (pytest-benchmark writes its JSON
# only when the call ends: a call cut off loses its own rows and no others); then the CUDA tests; the steps
# that compile (a cold torch.compile costs tens of seconds) come last, and the rest of the tests after them.
# After every step, RESULTS_DIR holds what has been measured so far, in three files (the device tool brings
# back at most 8):
#   steps.tsv        one line per step: name, exit status (124: out of time; skipped: no time left), seconds, limit
#   steps.log        every step's command and the end of its output, in order
#   results.tar.gz   each step's whole log, the benchmark JSON files and their table (bench.md), each training
#                    run's metrics.jsonl, summary and checkpoint, the CPU's evaluation of the CUDA checkpoint
#
# It installs nothing: the machine needs torch with CUDA, torchvision, onnx, onnxruntime, onnxscript, typer,
# matplotlib, pytest and pytest-benchmark (the device image has them; it has no Optuna, so the sweep's tests
# are left out), and Fashion-MNIST where fmnist finds it. fmnist is not installed there: PYTHONPATH points
# at this checkout. A machine without internet gets the four .gz files carried along in ./data (git-ignored):
#     mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/
# then, with the device tool: run(command="bash bench/gpu.sh", carry=["data"], timeout_s=480).
#
# GPU_STEPS="NAME ..." runs only the steps named (a second call, after a first that ran the others).
#
# GPU_SH_REHEARSE=1 rehearses the script on a machine without CUDA, to prove its own logic: the environment
# step fails as it would without CUDA, the training runs train on the CPU for one epoch (so that the steps
# after them have a checkpoint to read), the CUDA rows and tests skip themselves, and the last step only
# collects the tests (CI runs them on the CPU). E.g.
#     GPU_SH_REHEARSE=1 GPU_BUDGET=90 bash bench/gpu.sh /tmp/gpu-rehearsal
set -uo pipefail
results=${1:-${OUT:-bench/gpu-results}}
work=$(mktemp -d)            # everything a step writes; packed into results.tar.gz after each step
mkdir -p "$results" "$work/runs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CI=1   # CI: missing data fails, not skips
budget=${GPU_BUDGET:-420}
device=cuda rehearsal=() collect=()
if [ -n "${GPU_SH_REHEARSE:-}" ]; then device=cpu rehearsal=(--epochs 1) collect=(--collect-only); fi
started=$SECONDS
printf 'step\tstatus\tseconds\tlimit\n' > "$results/steps.tsv"
: > "$results/steps.log"

# pack: the table of the benchmark files so far (bench.md), then everything in $work into results.tar.gz.
pack() {
    compgen -G "$work/bench-*.json" > /dev/null && (cd "$work" && python3 -m bench.report bench-*.json > bench.md 2>&1)
    tar -czf "$results/results.tar.gz.tmp" -C "$work" . && mv "$results/results.tar.gz.tmp" "$results/results.tar.gz"
}

# step NAME LIMIT COMMAND...: run it with a time limit (cut to what is left of the budget), log and record it.
step() {
    local name=$1 limit=$2; shift 2
    [ -n "${GPU_STEPS:-}" ] && [[ " $GPU_STEPS " != *" $name "* ]] && return
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" | tee -a "$results/steps.tsv"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): ${*@Q}" | tee -a "$results/steps.log"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$work/$name.log" 2>&1
    local status=$?
    tail -n 40 "$work/$name.log" | tee -a "$results/steps.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" "$limit" | tee -a "$results/steps.tsv"
    pack
}

# train NAME LIMIT FLAGS...: one `fmnist train --device cuda` run in its own folder (metrics.jsonl kept).
train() {
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" python3 -m fmnist.cli train --device "$device" --out "$work/runs/$name" "$@" "${rehearsal[@]}"
}

# bench NAME LIMIT FILE SELECTION: the benchmark rows that pytest's -k SELECTION picks, timed, into NAME.json.
bench() {
    local name=$1 limit=$2 file=$3 selection=$4
    step "$name" "$limit" python3 -m pytest "bench/$file" --benchmark-only -q -rs -p no:cacheprovider \
        -k "$selection" --benchmark-json "$work/$name.json"
}

step environment 30 bash -c 'nvidia-smi; python3 -c "import sys, torch, torchvision, onnx, onnxruntime, onnxscript, \
typer, matplotlib, pytest_benchmark, fmnist; assert torch.cuda.is_available(), \"no CUDA\"; print(\"torch\", \
torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), \"python\", sys.version)"'

# What `fmnist train` runs on CUDA, the whole epoch as one CUDA graph: first its tests (each also on the CPU),
# then its benchmark rows without torch.compile, then real runs: the default recipe (its time to 90% and
# 91% test accuracy) and the tutorial's (batch 100: the epoch time).
step tests-graph 120 python3 -m pytest tests/test_cuda.py -q -ra -p no:cacheprovider -k epoch_graph
bench bench-train-graph 90 test_train_speed.py "test_epoch_graph and not compiled"
train tuned 90
train seed 60 --recipe seed

# The step-by-step loop (what fp16 and the CPU run), each path in its own call, then the CPU baselines their
# ratios are taken to (the table takes them from any of the files). The CPU's own rows are not run here:
# bench/README.md has them.
bench bench-train-eager 60 test_train_speed.py "test_fmnist_loop and eager and cuda"
bench bench-train-amp 60 test_train_speed.py "test_fmnist_loop and AMP"
bench bench-train-baseline 60 test_train_speed.py "test_tutorial_dataloader_loop"
bench bench-inference 60 test_inference_speed.py "test_torch_cuda or test_torch_eager"

# The first run's CUDA checkpoint on a machine without CUDA: the README's torch.load, evaluate and export.
checkpoint=$work/runs/seed/fmnist.pt
step cpu-reads-cuda-checkpoint 60 env CUDA_VISIBLE_DEVICES= bash -c "set -euo pipefail
python3 -c 'import torch; c = torch.load(\"$checkpoint\", weights_only=True); print(\"loaded, epoch\", c[\"epoch\"])'
python3 -m fmnist.cli evaluate --checkpoint $checkpoint --json > $work/evaluate.json
head -c 300 $work/evaluate.json; echo
python3 -m fmnist.cli export --onnx --checkpoint $checkpoint --output $work/seed.onnx"

# The other CUDA tests: each runs on the CPU and on CUDA (tests/test_cuda.py).
step tests-cuda 150 python3 -m pytest tests/test_cuda.py -q -ra --maxfail=3 -p no:cacheprovider -k "not epoch_graph"

# What compiles, last: AMP (no compile) first, then the compiled benchmark rows and runs.
train seed-amp 60 --recipe seed --amp
bench bench-train-graph-compiled 150 test_train_speed.py "test_epoch_graph and compiled"
train seed-compile 120 --recipe seed --compile
bench bench-train-compiled 150 test_train_speed.py "test_fmnist_loop and compiled and cuda"
train tuned-compile-amp 180 --compile --amp

# The rest of the tests, on this machine's torch (the sweep's need Optuna and PostgreSQL, which it lacks).
step tests 240 python3 -m pytest tests -q -ra --maxfail=3 -p no:cacheprovider \
    --ignore=tests/test_sweep.py --ignore=tests/test_cuda.py "${collect[@]}"

{ echo "== done in $((SECONDS - started)) s; steps:"; cat "$results/steps.tsv"; echo; cat "$work/bench.md" 2>/dev/null; } |
    tee -a "$results/steps.log"
true   # the steps' own statuses are in steps.tsv; the script itself succeeded
