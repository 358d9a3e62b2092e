"""The recipe frontier: test accuracy against training cost, from the trials of `fmnist sweep` runs.

    python -m bench.frontier SEED_WALL_SECONDS SWEEP_DIR... [--plot frontier.png]

For each trial: its final test accuracy and its estimated wall time as a multiple of `fmnist train --recipe
seed`'s wall time, measured on the same machine (SEED_WALL_SECONDS). The estimate is the trial's median epoch
time times its epochs (the median: a sweep shares the machine with whatever else ran, and a slow epoch is
noise, not the recipe) plus the fixed cost of a run (start, data, evaluation per epoch, curves.png), which is
measured once: OVERHEAD_SECONDS + OVERHEAD_PER_EPOCH * epochs. The recipes that matter are then timed whole,
side by side with the seed recipe (README). Prints a markdown table, frontier first.
"""

import csv
import json
import statistics
import sys
from pathlib import Path

# Measured on the 2-core AMD EPYC (2026-11-27), wall time less the training passes: `--recipe seed` (10 epochs)
# 5.2, 5.6, 5.4, 5.5 s; the new default (30 epochs) 7.4, 7.5, 7.8 s; the old default (40 epochs) 8.7 s.
OVERHEAD_SECONDS = 4.3
OVERHEAD_PER_EPOCH = 0.11


def trials(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["state"] == "complete"]
    for row in rows:
        metrics = [json.loads(line) for line in (sweep / row["folder"] / "metrics.jsonl").read_text().splitlines()]
        epochs = len(metrics)
        row["epochs"] = epochs
        row["wall"] = statistics.median(m["train_seconds"] for m in metrics) * epochs + OVERHEAD_SECONDS \
            + OVERHEAD_PER_EPOCH * epochs
        row["accuracy"] = metrics[-1]["test_accuracy"]
        row["sweep"] = sweep.name
    return rows


def options(sweep: Path, folder: str) -> str:
    """The trial's learned options, from its checkpoint's config (torch reads it; imported here only)."""
    import torch

    config = torch.load(sweep / folder / "fmnist.pt", weights_only=True)["config"]
    flags = [f"batch {config['batch_size']}", f"{config['epochs']} epochs", f"{config['schedule']} {config['lr']}",
             "flip" if config["flip"] else "no flip", f"shift {config['shift']}",
             f"smoothing {config['label_smoothing']}"]
    return ", ".join(flags)


def main(argv: list[str]) -> None:
    plot = None
    if "--plot" in argv:
        plot = Path(argv[argv.index("--plot") + 1])
        argv = argv[:argv.index("--plot")] + argv[argv.index("--plot") + 2:]
    seed_wall, sweeps = float(argv[0]), [Path(a) for a in argv[1:]]
    rows = [row for sweep in sweeps for row in trials(sweep)]
    for row, sweep in ((r, Path(next(s for s in sweeps if s.name == r["sweep"]))) for r in rows):
        row["options"] = options(sweep, row["folder"])
        row["ratio"] = row["wall"] / seed_wall
    rows.sort(key=lambda r: r["ratio"])
    best = -1.0
    print("| x seed wall time (est.) | test accuracy | on the frontier | recipe | sweep |")
    print("| ---: | ---: | :---: | --- | --- |")
    for row in rows:
        frontier = row["accuracy"] > best
        best = max(best, row["accuracy"])
        row["frontier"] = frontier
        print(f"| {row['ratio']:.2f} | {row['accuracy']:.2%} | {'yes' if frontier else ''} | {row['options']} | "
              f"{row['sweep']} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot([r["ratio"] for r in rows], [100 * r["accuracy"] for r in rows], "o", alpha=0.6, label="a trial")
        edge = [r for r in rows if r["frontier"]]
        ax.step([r["ratio"] for r in edge], [100 * r["accuracy"] for r in edge], "-", where="post", label="frontier")
        beyond = sum(r["ratio"] > 4 for r in rows)
        if beyond:   # trials timed while the machine was busy with other work: their times say nothing
            ax.set_xlim(1, 4)
            ax.text(3.95, ax.get_ylim()[0], f"{beyond} trials beyond 4x (timed on a busy machine) ", ha="right",
                    va="bottom", fontsize=8, color="gray")
        ax.axhline(91.0, color="gray", ls="--", lw=1)
        ax.axvline(2.0, color="gray", ls=":", lw=1)
        ax.set(xlabel="wall time / `fmnist train --recipe seed` wall time (estimated)", ylabel="test accuracy (%)",
               title="recipes tried (one seed each; 2-core AMD EPYC)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv[1:])
