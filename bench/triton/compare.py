"""fmnist serve against a real Triton, measured with Triton's own perf_analyzer, in one run, interleaved.

    bash bench/triton/setup.sh                                   # once: perf_analyzer and tritonserver (.triton/)
    python -m bench.triton.compare export/fmnist.onnx [--rounds 3] [--requests 2000]
    python -m bench.triton.compare export/fmnist.onnx --protocol grpc --bound   # and grpc.aio's own bound
    python -m bench.triton.compare export/fmnist.onnx --protocol grpc --bound aio,aio:2,sync --loads 1x16
    python -m bench.triton.threads export/fmnist.onnx --protocol grpc   # each server's CPU, thread by thread

Both servers serve the same exported model on this machine's loopback: `fmnist serve` as a user starts it
(one process, its defaults), and tritonserver 2.51 the repository `fmnist export --triton` writes, with its
python backend running the same model.onnx on onnxruntime (bench/triton/peer.py says why). For each load
(single images at concurrency 1, 16 and 64; batches of 64 and of 1024 at concurrency 2) perf_analyzer measures
one server, then the other, round after round, so that both see the same noise; the table gives each one's
median round: infer/s and the p50/p90/p99 latency, and fmnist's infer/s over Triton's, then where each median
round's request spent its time (perf_analyzer's split: transport, queue, compute). With --bound (gRPC),
a third server in the same rounds: bench/noop_grpc.py, grpc.aio answering without doing any work, the most one
grpc.aio process answers here; or several, named KIND[:PROCESSES]: grpcio's thread-pool server (sync), the
aio no-op with each call's reply handed back from a thread (handoff), the aio no-op that first holds the event
loop as a handler's own work would (busy), or several processes on one port.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.common import cpu
from bench.triton import peer

LOADS = [(1, 1), (1, 16), (1, 64), (64, 2), (1024, 2)]   # (images per request, concurrency)


def measure(tools: peer.Tools, urls: dict[str, str], rounds: int, requests: int, protocol: str = "http",
            loads: list[tuple[int, int]] = LOADS) -> list[dict]:
    """For each load, each server's median round (perf_analyzer's CSV row) and the ratio."""
    rows = []
    for batch, concurrency in loads:
        runs: dict[str, list[dict]] = {name: [] for name in urls}
        count = max(requests // batch, 20)   # requests per measurement window: big batches take longer each
        for _ in range(rounds):
            for name, url in urls.items():   # interleaved: one, then the other, each round
                runs[name].append(peer.perf_analyzer(tools, url, batch=batch, concurrency=concurrency,
                                                     requests=count, protocol=protocol))
        median = {name: sorted(r, key=lambda row: row["Inferences/Second"])[len(r) // 2] for name, r in runs.items()}
        rows.append({"batch": batch, "concurrency": concurrency, "median": median,
                     "spread": {name: [row["Inferences/Second"] for row in r] for name, r in runs.items()}})
    return rows


def table(rows: list[dict], names: tuple[str, str] = ("fmnist", "triton")) -> str:
    ours, theirs = names
    lines = [f"| images/request | concurrency | {ours} infer/s | {theirs} infer/s | ratio | "
             f"{ours} p50/p90/p99 ms | {theirs} p50/p90/p99 ms |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        a, b = row["median"][ours], row["median"][theirs]
        latency = lambda r: "/".join(f"{r[f'p{p} latency'] / 1000:.2f}" for p in (50, 90, 99))   # noqa: E731
        lines.append(f"| {row['batch']} | {row['concurrency']} | {a['Inferences/Second']:,.0f} | "
                     f"{b['Inferences/Second']:,.0f} | {a['Inferences/Second'] / b['Inferences/Second']:.2f}x | "
                     f"{latency(a)} | {latency(b)} |")
    return "\n".join(lines)


# perf_analyzer's split of a request's time (its CSV columns, µs), in the order a request meets them. The server's
# own part comes from the statistics extension, which fmnist serve and Triton keep and the no-op bounds do not
# (perf_analyzer then splits nothing); "Network+Server Send/Recv" is what is left of the latency: the transport
# on both sides, and over gRPC fmnist's message decoding (its statistics start once grpc hands it the request).
SPLIT = {"Client Send": "client send", "Network+Server Send/Recv": "transport", "Server Queue": "queue",
         "Server Compute Input": "input", "Server Compute Infer": "infer", "Server Compute Output": "output"}


def split_table(rows: list[dict]) -> str:
    """Where each server's median round spent a request's time, µs: perf_analyzer's split, for the servers that
    keep statistics (perf_analyzer gives the others none, not even their transport)."""
    lines = ["| images/request | concurrency | server | " + " | ".join(SPLIT.values()) + " |",
             "| ---: | ---: | --- |" + " ---: |" * len(SPLIT)]
    for row in rows:
        for name, median in row["median"].items():
            if not median.get("Server Compute Infer"):
                continue
            lines.append(f"| {row['batch']} | {row['concurrency']} | {name} | "
                         + " | ".join(f"{median.get(key, 0):,.0f}" for key in SPLIT) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="the exported model (fmnist export --onnx)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="requests in each measurement window")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--loads", default=",".join(f"{b}x{c}" for b, c in LOADS),
                        help="IMAGESxCONCURRENCY, comma-separated (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="fmnist serve --workers")
    parser.add_argument("--bound", nargs="?", const="aio", metavar="KIND[:PROCESSES],...",
                        help="gRPC: measure bench/noop_grpc.py too, aio (the default), sync, handoff or busy, in 1 or "
                        "more processes")
    args = parser.parse_args()
    if args.bound and args.protocol != "grpc":
        raise SystemExit("--bound is a gRPC server: add --protocol grpc")
    bounds = [bound_of(spec) for spec in args.bound.split(",")] if args.bound else []
    loads = [tuple(int(n) for n in load.split("x")) for load in args.loads.split(",")]
    tools = peer.tools()
    if isinstance(tools, str):
        raise SystemExit(tools)
    with both_servers(tools, args.onnx, args.workers) as (fmnist, triton), ExitStack() as noops:
        urls = {"fmnist": address(fmnist, args.protocol), "triton": address(triton, args.protocol)}
        for kind, processes in bounds:
            urls[bound_name(kind, processes)] = noops.enter_context(noop_grpc(kind, processes))
        rows = measure(tools, urls, args.rounds, args.requests, args.protocol, loads)   # type: ignore[arg-type]
    print(f"{cpu()}, {os.cpu_count()} cores; {args.protocol}; fmnist serve --workers {args.workers}; "
          f"the median of {args.rounds} rounds\n")
    print(table(rows))
    for row in rows:
        print(f"batch {row['batch']} concurrency {row['concurrency']}: every round's infer/s "
              + "; ".join(f"{name} {', '.join(f'{v:,.0f}' for v in values)}" for name, values in row["spread"].items()))
    print("\nWhere a request's time went in each median round, µs (perf_analyzer's split):\n")
    print(split_table(rows))
    ratios = [r["median"]["fmnist"]["Inferences/Second"] / r["median"]["triton"]["Inferences/Second"] for r in rows]
    print(f"\nfmnist / Triton, the median over the loads: {statistics.median(ratios):.2f}x")
    for kind, processes in bounds:
        name = bound_name(kind, processes)
        print(f"\n{name.capitalize()} (bench/noop_grpc.py: grpcio's {kind} server in {processes} process(es), no work) "
              "in the same rounds:\n")
        print(table(rows, (name, "triton")))
        print("\n" + table(rows, ("fmnist", name)))


@contextmanager
def both_servers(tools: peer.Tools, onnx: str, workers: int) -> Iterator[tuple[Any, peer.Running]]:
    """fmnist serve as a user starts it (with --workers), and tritonserver on the repository `fmnist export
    --triton` writes for the same model, both serving until the block ends."""
    from fmnist.triton import write_model_repository
    from tests.conftest import Server

    with tempfile.TemporaryDirectory(prefix="fmnist-compare-") as folder:
        repository = write_model_repository(onnx, folder).parent
        fmnist = Server(Path(onnx), "--workers", str(workers))
        try:
            with peer.triton(tools, repository) as triton:
                yield fmnist, triton
        finally:
            fmnist.stop()


def address(server: Any, protocol: str) -> str:
    """What perf_analyzer is pointed at: a server's REST URL, or its gRPC host:port."""
    return server.grpc if protocol == "grpc" else server.url


def bound_of(spec: str) -> tuple[str, int]:
    """--bound's KIND[:PROCESSES] as (kind, processes)."""
    from bench.noop_grpc import KINDS

    kind, _, processes = spec.partition(":")
    if kind not in KINDS or not (processes or "1").isdigit() or int(processes or "1") < 1:
        raise SystemExit(f"--bound {spec!r}: name one of {', '.join(KINDS)}, and :PROCESSES if more than one, "
                         "e.g. aio:2")
    return kind, int(processes or "1")


def bound_name(kind: str, processes: int) -> str:
    return "bound" if (kind, processes) == ("aio", 1) else f"bound {kind}:{processes}"


@contextmanager
def noop_grpc(kind: str = "aio", processes: int = 1) -> Iterator[str]:
    """bench/noop_grpc.py on a free loopback port, ready, until the block ends."""
    import grpc

    from tests.conftest import free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "bench.noop_grpc", str(port), kind, str(processes)])
    try:
        with grpc.insecure_channel(address) as channel:
            ready = grpc.channel_ready_future(channel)
            for _ in range(300):   # 30 s at most, and no longer than the process lives
                if process.poll() is not None:
                    raise RuntimeError(f"bench/noop_grpc.py exited ({process.returncode}) before it served")
                try:
                    ready.result(timeout=0.1)
                    break
                except grpc.FutureTimeoutError:
                    pass
            else:
                raise RuntimeError(f"bench/noop_grpc.py did not serve on {address} within 30 s")
        yield address
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
