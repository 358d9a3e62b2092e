"""Helpers shared by the benchmark modules."""

import pytest
import torch

from fmnist.model import Network


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
