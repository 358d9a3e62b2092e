"""Training beside the frameworks a user would otherwise train this Network with (group `peers`): fmnist's
loop, the tutorial's own loop, PyTorch Lightning, and Keras 3 on its torch and JAX backends. Each run is a
process of its own (bench/peers.py): the same Network from the same initial weights, the seed recipe, and
the test accuracy after the same epochs, measured by the peer itself.

The runs are interleaved, every peer once and then every peer again in the reverse order, so that a slow
spell of the machine falls on all of them; a row's samples/s is the median over its epochs of all rounds
(the first epoch of a round carries JAX's compilation and every peer's warm-up). The time is measured inside
each peer's process, so pytest-benchmark's own timing of these rows means nothing: the table after it does.

Lightning, Keras and JAX are the `peers` extra (pip install -e ".[peers]"); without them their rows are
skipped with the reason.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from bench.peers import PEERS

EPOCHS, ROUNDS = 3, 2   # timed: epochs a run, runs a peer; under --benchmark-disable one of each, to check them
RUN_TIMEOUT = 1800      # seconds a run may take before it counts as hung


def missing(peer: str) -> str | None:
    """Why `peer` cannot run on this machine, or None."""
    absent = [module for module in PEERS[peer][0] if importlib.util.find_spec(module) is None]
    return f"needs {' and '.join(absent)}: pip install -e '.[peers]'" if absent else None


def run(peer: str, epochs: int, torchvision_root) -> dict:
    """One run of bench/peers.py: its JSON line."""
    env = dict(os.environ)
    if backend := PEERS[peer][1]:
        env["KERAS_BACKEND"] = backend
    done = subprocess.run([sys.executable, "-m", "bench.peers", peer, "--epochs", str(epochs),
                           "--torchvision-root", str(torchvision_root)], capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT)
    assert done.returncode == 0, f"{peer}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def runs(request, real_data, torchvision_root) -> dict[str, list[dict]]:
    """Every peer this machine has, run ROUNDS times, interleaved: {peer: its runs}."""
    epochs, rounds = (1, 1) if request.config.getoption("benchmark_disable") else (EPOCHS, ROUNDS)
    present = [peer for peer in PEERS if not missing(peer)]
    done: dict[str, list[dict]] = {peer: [] for peer in present}
    for number in range(rounds):
        for peer in present if number % 2 == 0 else present[::-1]:
            done[peer].append(run(peer, epochs, torchvision_root))
    return done


@pytest.mark.benchmark(group="peers")
@pytest.mark.parametrize("peer", PEERS)
def test_peer(benchmark, runs, peer):
    if why := missing(peer):
        pytest.skip(why)
    peer_runs = benchmark.pedantic(lambda: runs[peer], rounds=1, iterations=1)   # timed in the peer's process
    epochs = [seconds for one in peer_runs for seconds in one["epoch_seconds"]]
    accuracies = [one["test_accuracy"] for one in peer_runs]
    # A run that learned nothing is no comparison: every peer reaches the tutorial's first-epoch accuracy.
    assert min(accuracies) > 0.75, (peer, accuracies)
    benchmark.extra_info.update(path=peer, batch_size=100, device="cpu", epochs=len(peer_runs[0]["epoch_seconds"]),
                                rounds=len(peer_runs), test_accuracy=statistics.median(accuracies))
    if benchmark.stats:   # None under --benchmark-disable: nothing is reported as measured
        benchmark.extra_info["samples_per_second"] = statistics.median(60_000 / s for s in epochs)
