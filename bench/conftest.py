"""Shared pieces of the benchmarks: data, models, the samples/s bookkeeping and the ratio table.

Every benchmark records `samples_per_second` (from the median round), `batch_size`, `device` and `path`
in its extra_info; one row per (group, batch size, device kind) is the baseline its ratio is taken to.
"""

import gzip
import importlib.metadata
import os
import platform

import numpy as np
import pytest
import torch

import fmnist
from bench.common import strict_dynamo
from bench.report import BASELINES, SEPARATE, peers_report, row_order, serve_report, with_ratios
from fmnist import data


@pytest.fixture(scope="session")
def train_split(real_data):
    return data.load("train", download=False)


@pytest.fixture(scope="session")
def test_split(real_data):
    return data.load("test", download=False)


@pytest.fixture(scope="session")
def torchvision_root(real_data, tmp_path_factory):
    """A root that torchvision's FashionMNIST reads without downloading: the raw IDX files, decompressed."""
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, path in real_data.items():
        (raw / name).write_bytes(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    return root


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each benchmark compiles from nothing, and cannot fall back to eager unseen (bench.common.strict_dynamo)."""
    with strict_dynamo():
        yield


# ---- reporting -----------------------------------------------------------------------------------

def timed_rows(benchmarks) -> list[dict]:
    rows = [{"group": b["group"], "name": b["name"], "extra_info": b["extra_info"]} for b in benchmarks]
    return with_ratios([r for r in rows if "samples_per_second" in r["extra_info"] and r["group"] not in SEPARATE])


def pytest_benchmark_update_machine_info(config, machine_info):
    import onnxruntime

    machine_info["cores"] = os.cpu_count()
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["versions"] = {"fmnist": fmnist.__version__, "torch": str(torch.__version__),
                                "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                                "python": platform.python_version()}
    for peer in ("lightning", "keras", "jax"):   # the peers' versions, where the extra is installed (not imported)
        try:
            machine_info["versions"][peer] = importlib.metadata.version(peer)
        except importlib.metadata.PackageNotFoundError:
            pass


def pytest_benchmark_update_json(config, benchmarks, output_json):
    ratios = {(r["group"], r["name"]): r["ratio"] for r in timed_rows(output_json["benchmarks"])}
    for b in output_json["benchmarks"]:
        b["extra_info"]["ratio_to_baseline"] = ratios.get((b["group"], b["name"]))


def ratio_tables(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)   # pytest-benchmark keeps its results there
    if session is None or not session.benchmarks:
        return
    write = terminalreporter.write_line
    serving = [{"group": b.group, "name": b.name, "extra_info": b.extra_info} for b in session.benchmarks
               if b.group == "serve" and "samples_per_second" in b.extra_info]
    if serving:   # bench/test_serve_speed.py: its table, the goals, batching off and on
        write("")
        for line in serve_report(serving):
            write(line)
    peers = [{"group": b.group, "name": b.name, "extra_info": b.extra_info} for b in session.benchmarks
             if b.group == "peers" and "samples_per_second" in b.extra_info]
    if peers:   # bench/test_peers.py: training beside Lightning and Keras
        write("")
        for line in peers_report(peers):
            write(line)
    rows = timed_rows([{"group": b.group, "name": b.name, "extra_info": b.extra_info} for b in session.benchmarks])
    if not rows:
        return
    write("")
    write(f"{'group':<10} {'path':<44} {'device':<6} {'batch':>5} {'samples/s':>12} {'x baseline':>10}")
    for r in sorted(rows, key=row_order):
        info = r["extra_info"]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        write(f"{r['group']:<10} {info['path']:<44} {info['device']:<6} {info['batch_size']:>5} "
              f"{info['samples_per_second']:>12,.0f} {ratio:>10}")
    write("baselines, at the same batch size: " + ", ".join(f"{path} ({group})" for group, path in BASELINES.items()))


GROUPS = pytest.StashKey[dict]()   # nodeid -> benchmark group, to name what was skipped


def pytest_collection_modifyitems(config, items):
    config.stash[GROUPS] = {item.nodeid: marker.kwargs.get("group") for item in items
                            if (marker := item.get_closest_marker("benchmark"))}


@pytest.hookimpl(trylast=True)   # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, config):
    """The tables, then the run in a plain line and, once per reason, the groups it skipped."""
    from bench.report import plain_summary, skipped_summary

    ratio_tables(terminalreporter, config)
    session = getattr(config, "_benchmarksession", None)
    benchmarks = session.benchmarks if session is not None else []
    summary = plain_summary(timed_rows([{"group": b.group, "name": b.name, "extra_info": b.extra_info}
                                        for b in benchmarks]))
    lines = ([summary] if summary else []) + skipped_summary(terminalreporter.stats.get("skipped", []),
                                                             config.stash.get(GROUPS, {}))
    for line in [""] + lines if lines else []:
        terminalreporter.write_line(line)
