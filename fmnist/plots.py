"""PNG pictures: training curves and the confusion matrix. matplotlib is imported only when one is drawn,
with the non-interactive Agg backend, so nothing here needs a display."""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist.files import atomic_path

if TYPE_CHECKING:
    from fmnist.config import TrainConfig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Written to a temporary name, then renamed: a reader never sees half a picture. PNG, or SVG or PDF
    when the name says so."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120, bbox_inches="tight")


def curves(history: list[dict], path: Path, config: "TrainConfig | None" = None) -> None:
    """Loss and accuracy per epoch, train and test, side by side (curves_figure), into a PNG."""
    plt = _pyplot()
    fig = curves_figure(history, config)
    _save(fig, path)
    plt.close(fig)


def curves_figure(history: list[dict], config: "TrainConfig | None" = None):
    """The figure of `curves`. config: the run's, so that the loss's title says what the train loss is of."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "o-"), ("test", "s-")):
        loss.plot(epochs, [row[f"{split}_loss"] for row in history], style, label=split, markersize=3)
        accuracy.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], style, label=split, markersize=3)
    loss.set(title=loss_title(config), xlabel="epoch", ylabel="cross-entropy")
    accuracy.set(title="accuracy", xlabel="epoch", ylabel="% correct")
    for ax in (loss, accuracy):
        _epoch_axis(ax, epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def loss_title(config: "TrainConfig | None") -> str:
    """"loss", and what the train loss was measured on where that is not the plain training images."""
    if config is None:
        return "loss"
    train = (["augmented"] if config.flip or config.shift else []) + (["label-smoothed"] if config.label_smoothing
                                                                      else [])
    return f"loss (train: {', '.join(train)})" if train else "loss"


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Whole epochs on the x axis, a one-epoch run's too (matplotlib widens 1 .. 1 to 0.96 .. 1.04, where it finds
    fewer than two whole numbers unless told that one will do)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def confusion(matrix: list[list[int]], classes: Sequence[str], path: Path, title: str = "confusion matrix") -> None:
    """The confusion matrix as a heat map with its counts; rows are true classes, columns predicted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    brightest = max(max(row) for row in matrix)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, count, ha="center", va="center", fontsize=8,
                    color="white" if count > brightest / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)
    plt.close(fig)


def sweep(table: list[dict], swept: list[str], path: Path, title: str = "sweep") -> None:
    """Every trial's test accuracy per epoch on one set of axes; then, for each swept option, the final test
    accuracy of each trial against its value (sweep_figure), into a PNG."""
    plt = _pyplot()
    fig = sweep_figure(table, swept, title)
    _save(fig, path)
    plt.close(fig)


def sweep_figure(table: list[dict], swept: list[str], title: str = "sweep"):
    """The figure of `sweep`: text values at evenly spaced places, lr on a log scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(swept), figsize=(5 * (1 + len(swept)), 4), squeeze=False)
    curves, *by_value = axes[0]
    for row in table:
        if row["curve"]:
            curves.plot(range(1, len(row["curve"]) + 1), [100 * a for a in row["curve"]], "o-", markersize=2,
                        label=row["folder"], alpha=0.8)
    curves.set(title=title, xlabel="epoch", ylabel="test accuracy (%)")
    _epoch_axis(curves, [epoch for row in table for epoch in range(1, len(row["curve"] or []) + 1)])
    if len(table) <= 12 and any(row["curve"] for row in table):   # a legend of the curves drawn, if few
        curves.legend(fontsize=7)
    done = [row for row in table if row["final_test_accuracy"] is not None]
    for ax, name in zip(by_value, swept, strict=True):
        values = [row[name] for row in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.plot(values, [100 * row["final_test_accuracy"] for row in done], "o")
            if name == "lr":
                _log_axis(ax, values)
        else:
            labels = sorted({str(v) for v in values})
            ax.plot([labels.index(str(v)) for v in values], [100 * row["final_test_accuracy"] for row in done], "o")
            ax.set_xticks(range(len(labels)), labels)
        ax.set(title=f"final test accuracy by {name}", xlabel=name, ylabel="test accuracy (%)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return fig


def _log_axis(ax, values: list[float]) -> None:
    """A log-scale x axis whose labels do not run into each other: plain numbers (0.002, not 2 x 10^-3) at 1, 2, 3
    and 5 times a power of ten within a decade, 1 and 3 up to two and a half, powers of ten alone beyond; no
    minor labels (matplotlib labels 2, 3, 4 ... x 10^k where the values span less than a decade: they overlap)."""
    import math

    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    decades = math.log10(max(values) / min(values)) if values and min(values) > 0 else 3
    subs = (1.0, 2.0, 3.0, 5.0) if decades <= 1 else (1.0, 3.0) if decades <= 2.5 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(subs=subs))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
