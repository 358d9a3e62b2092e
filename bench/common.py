"""Helpers shared by the benchmark modules."""

import platform
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fmnist.model import Network


def cpu() -> str:
    """This machine's processor, by name (/proc/cpuinfo's model name): every figure comes with it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def new_network(device="cpu", seed=0) -> Network:
    torch.manual_seed(seed)
    return Network().to(device)


def cuda_or_skip(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")


def record(benchmark, *, path: str, samples: int, batch_size: int, device: str, **extra) -> None:
    """Put samples/s (from the median round) and the row's labels into the benchmark's extra_info."""
    benchmark.extra_info.update(path=path, batch_size=batch_size, device=device, samples_per_round=samples, **extra)
    if benchmark.stats:   # None under --benchmark-disable, where nothing is timed
        benchmark.extra_info["samples_per_second"] = samples / benchmark.stats.stats.median


@contextmanager
def strict_dynamo():
    """Compile from nothing, and never fall back to eager unseen. The compiled rows all compile
    Network.forward, one code object, and Dynamo's cache on it fills up across rows: past its recompile limit
    a later row would run eager, silently, and be timed as compiled. So: reset, and a hit limit is an error."""
    import torch._dynamo

    torch._dynamo.reset()
    config = torch._dynamo.config
    flag = ("fail_on_recompile_limit_hit" if hasattr(config, "fail_on_recompile_limit_hit")
            else "fail_on_cache_limit_hit")
    with config.patch(**{flag: True}):
        yield
