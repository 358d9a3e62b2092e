"""What a person sees in the pictures: titles that say what the run did, whole epochs, labels that can be read."""

import pytest

from fmnist import plots
from fmnist.config import recipe


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "train_accuracy": 0.8 + e / 100,
             "test_accuracy": 0.79 + e / 100} for e in range(1, epochs + 1)]


def sweep_rows(lrs, epochs: int = 3) -> list[dict]:
    return [{"folder": f"lr-{lr:g}", "lr": lr, "curve": [0.8 + e / 100 for e in range(epochs)],
             "final_test_accuracy": 0.8 + i / 100} for i, lr in enumerate(lrs)]


def visible_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_the_loss_title_says_what_the_train_loss_was_measured_on():
    assert plots.loss_title(recipe("tuned")) == "loss (train: augmented, label-smoothed)"
    assert plots.loss_title(recipe("seed")) == "loss"   # the tutorial's recipe: plain images, plain loss
    assert plots.loss_title(recipe("seed", flip=True)) == "loss (train: augmented)"
    assert plots.loss_title(recipe("tuned", shift=0, label_smoothing=0.0)) == "loss"
    figure = plots.curves_figure(history(3), recipe("seed"))
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy"]


@pytest.mark.parametrize("epochs", [1, 2, 30])
def test_curves_show_whole_epochs_only(epochs):
    for ax in plots.curves_figure(history(epochs), recipe("seed")).axes:
        ticks = visible_ticks(ax)
        assert ticks and all(t == int(t) for t in ticks), ticks
        assert 1 in ticks or epochs > 2   # a one-epoch run's one point is labelled 1


def test_a_one_epoch_sweep_shows_whole_epochs_only():
    curves = plots.sweep_figure(sweep_rows([0.01, 0.001], epochs=1), ["lr"]).axes[0]
    assert visible_ticks(curves) == [1]


@pytest.mark.parametrize("lrs", [[0.01, 0.005, 0.001], [0.0011, 0.0023, 0.0047, 0.0069], [0.003, 0.0045, 0.006, 0.009],
                                 [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [1e-6, 1e-4, 1e-1]])
def test_the_lr_axis_labels_do_not_run_into_each_other(lrs):
    figure = plots.sweep_figure(sweep_rows(lrs), ["lr"])
    figure.canvas.draw()
    ax = figure.axes[1]
    labels = [label for label in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
              if label.get_visible() and label.get_text()
              and ax.get_xlim()[0] <= label.get_position()[0] <= ax.get_xlim()[1]]
    assert len(labels) >= 2
    boxes = sorted((label.get_window_extent() for label in labels), key=lambda box: box.x0)
    for left, right in zip(boxes, boxes[1:], strict=False):   # each label and the next
        assert not left.overlaps(right), [label.get_text() for label in labels]
