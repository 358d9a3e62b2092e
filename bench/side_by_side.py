"""Runs side by side against one run on every thread: the choice behind `fmnist serve`'s runners (its batcher
makes a run that comes while another is under way on a thread of its own, with the one-thread session).

    python -m bench.side_by_side export/fmnist.onnx [--sizes 16,64,1024] [--rounds 3]   # a markdown table

At each batch size, in-process on onnxruntime, images/s of: one session on every core, one run at a time; the
same session run by a thread for each core at once; a one-thread session, one run at a time; and a one-thread
session run by a thread for each core at once (what the server does with runs beside each other). Each round
times the four in turn; a figure is the median round.
"""

import argparse
import os
import statistics
import threading
import time

import numpy as np

from bench.common import cpu
from fmnist import FmnistError, runtime

IMAGES_A_ROUND = 20_000   # images each way of running makes in a round, at every size: about a second
WAYS = ("every thread, one run at a time", "every thread, runs side by side", "one thread, one run at a time",
        "one thread a run, runs side by side")


def rate(session, images: np.ndarray, side_by_side: int) -> float:
    """Images/s of `side_by_side` threads each making runs of `images` on `session` at once."""
    outputs, name = [o.name for o in session.get_outputs()], session.get_inputs()[0].name
    runs = max(IMAGES_A_ROUND // (len(images) * side_by_side), 2)
    session.run(outputs, {name: images})   # warm

    def work() -> None:
        for _ in range(runs):
            session.run(outputs, {name: images})

    threads = [threading.Thread(target=work) for _ in range(side_by_side)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs * len(images) * side_by_side / (time.perf_counter() - start)


def measure(onnx: str, sizes: list[int], rounds: int) -> dict[int, dict[str, float]]:
    """{batch size: {way: images/s, the median round}}."""
    cores = os.cpu_count() or 1
    every, one = (runtime.session(onnx, threads=n, spinning=False) for n in (cores, 1))
    ways = dict(zip(WAYS, ((every, 1), (every, cores), (one, 1), (one, cores)), strict=True))
    found = {}
    for size in sizes:
        images = np.random.default_rng(0).random((size, 1, 28, 28), np.float32)
        rounds_of: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, (session, threads) in ways.items():
                rounds_of[way].append(rate(session, images, threads))
        found[size] = {way: statistics.median(values) for way, values in rounds_of.items()}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="the exported model (fmnist export --onnx)")
    parser.add_argument("--sizes", default="16,64,128,1024", help="images a run, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes}: give whole numbers of images, comma-separated (16,64)")
    if any(size < 1 for size in sizes) or args.rounds < 1:
        parser.error("--sizes and --rounds must be 1 or more")
    try:
        found = measure(args.onnx, sizes, args.rounds)
    except FmnistError as e:   # no such model, or not one: its one line
        raise SystemExit(str(e)) from None
    print(f"{cpu()}, {os.cpu_count()} cores; images/s, the median of {args.rounds} rounds\n")
    print("| images a run | " + " | ".join(WAYS) + " |")
    print("| ---: |" + " ---: |" * len(WAYS))
    for size, by_way in found.items():
        print(f"| {size} | " + " | ".join(f"{by_way[way]:,.0f}" for way in WAYS) + " |")


if __name__ == "__main__":
    main()
