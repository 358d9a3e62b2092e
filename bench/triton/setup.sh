#!/usr/bin/env bash
# Triton's own tools, for the tests and the benchmark that put fmnist serve beside a real Triton: perf_analyzer
# and a real tritonserver 2.51 with its python backend, in their own virtual environment (.triton/, or
# $FMNIST_TRITON_VENV), kept out of fmnist's dependencies. About 400 MB. bench/triton/README.md says why these.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${FMNIST_TRITON_VENV:-.triton}
# perf_analyzer's binary needs Debian's libb64 (apt-get install libb64-0d); .ci/run installs it.
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || { echo "bench/triton/setup.sh: needs libb64-0d: apt-get install libb64-0d" >&2; exit 1; }
compgen -G "$venv/lib/python3.*/site-packages/onnxruntime" >/dev/null && [ -x "$venv/bin/perf_analyzer" ] && exit 0
python3 -m venv "$venv"
# tritonclient 2.51.0: the last wheel whose perf_analyzer runs on this glibc (2.36); it loads libcudart.so.12,
# which nvidia-cuda-runtime-cu12 brings. nvidia-pytriton 0.7.0 carries tritonserver 2.51 and its python backend,
# whose model.py (bench/triton/model.py) runs onnxruntime from here, beside pytriton's numpy 1.26.
# A registry page cut short stops pip on its JSON (its --retries covers connections only): up to three tries.
for try in 1 2 3; do
  "$venv/bin/pip" install -q --disable-pip-version-check "tritonclient[http]==2.51.0" "nvidia-cuda-runtime-cu12==12.9.79" \
    "nvidia-pytriton==0.7.0" "onnxruntime==1.32.0" 2> >(grep -v "^WARNING: Location .* is ignored" >&2) && exit 0
  [ $try = 3 ] || { echo "bench/triton/setup.sh: pip failed, trying again" >&2; sleep 5; }
done
exit 1
