"""What `ood_score` costs: the whole exported model against the Network alone, onnxruntime, interleaved in one run.

    python -m bench.score_cost export/fmnist.pt [--compare OTHER.onnx ...] [--rounds 9]   # a markdown table

The checkpoint's Network is exported twice, as `fmnist export --onnx` writes it (logits and ood_score, the score
fitted to the training images) and alone (logits only, as `to_onnx` writes a bare Network); --compare adds other
ONNX files of the same Network (an older form of the score, say). At each batch size every model is timed in turn,
round after round, each first in turn, so that all of them see the same noise; a model's figure is its best round
(images/s), and the table gives each one's ratio to the Network alone. pytest-benchmark's inference group
(bench/test_inference_speed.py) times the same two paths, one after the other rather than interleaved.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import cpu
from fmnist import data, runtime
from fmnist.checkpoint import load_network
from fmnist.export import export_onnx, to_onnx

BATCH_SIZES = (1, 64, 1024)
IMAGES_A_ROUND = 2000   # images timed in one round at batch sizes over 1 (a round of batch 1 runs 1,000)


def exported(checkpoint: str, folder: Path) -> dict[str, Path]:
    """The checkpoint's Network written into `folder` alone and whole (`fmnist export --onnx`'s own file)."""
    models = {"Network alone": folder / "alone.onnx", "with ood_score": folder / "whole.onnx"}
    models["Network alone"].write_bytes(to_onnx(load_network(checkpoint).eval()).SerializeToString())
    export_onnx(checkpoint, models["with ood_score"])
    return models


def measure(models: dict[str, Path], rounds: int, batch_sizes=BATCH_SIZES) -> dict[int, dict[str, float]]:
    """{batch size: {model: its best round's images/s}}."""
    images = runtime.to_model_input(data.load("test").images)
    sessions = {name: runtime.session(path, threads=os.cpu_count() or 1, spinning=False)
                for name, path in models.items()}
    best: dict[int, dict[str, float]] = {}
    order = list(sessions.items())
    for batch in batch_sizes:
        x = images[:batch]
        runs = max(2, IMAGES_A_ROUND // batch) if batch > 1 else 1000
        best[batch] = dict.fromkeys(sessions, 0.0)
        for turn in range(rounds):
            for name, session in order[turn % len(order):] + order[:turn % len(order)]:   # each first in turn
                session.run(None, {"images": x})   # one run first: buffers sized for this batch
                start = time.perf_counter()
                for _ in range(runs):
                    session.run(None, {"images": x})
                best[batch][name] = max(best[batch][name], batch * runs / (time.perf_counter() - start))
    return best


def table(best: dict[int, dict[str, float]], baseline: str) -> str:
    names = list(next(iter(best.values())))
    lines = ["| batch | " + " | ".join(f"{name} images/s" for name in names) + " | "
             + " | ".join(f"{name} / {baseline}" for name in names if name != baseline) + " |",
             "| ---: |" + " ---: |" * (2 * len(names) - 1)]
    for batch, row in best.items():
        lines.append(f"| {batch} | " + " | ".join(f"{row[name]:,.0f}" for name in names) + " | "
                     + " | ".join(f"{row[name] / row[baseline]:.2f}x" for name in names if name != baseline) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--compare", nargs="*", default=[], help="other ONNX files to time in the same rounds")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    names = [Path(path).name for path in args.compare]
    if args.rounds < 1:
        parser.error("--rounds: give 1 or more")
    if len(set(names)) < len(names) or {"Network alone", "with ood_score"} & set(names):
        parser.error("--compare: give files of different names (the table names each by its file name)")
    with tempfile.TemporaryDirectory() as folder:
        models = exported(args.checkpoint, Path(folder))
        models.update({name: Path(path) for name, path in zip(names, args.compare, strict=True)})
        best = measure(models, args.rounds)
    print(f"{args.checkpoint} on {cpu()}, {os.cpu_count()} cores, "
          f"onnxruntime, best of {args.rounds} interleaved rounds:\n")
    print(table(best, "Network alone"))


if __name__ == "__main__":
    main()
