"""TensorBoard event files of a training run: every epoch's metrics, and the run's options as hparams.

TensorBoard is an optional extra (`pip install "fmnist[tensorboard]"`); the event files are written with
torch's SummaryWriter, and `tensorboard --logdir DIR` shows them (a sweep's folder: every trial side by side).
"""

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist import FmnistError
from fmnist.config import LEARNED, TrainConfig

if TYPE_CHECKING:   # for hints alone: torch is imported where the writer is made
    from torch.utils.tensorboard import SummaryWriter

    from fmnist.loop import Reporter

HPARAMS = LEARNED   # what TrainConfig holds that changes what is learned: the run's hparams
SCALARS = {  # tag in TensorBoard: key of a metrics row
    "train/loss": "train_loss", "train/accuracy": "train_accuracy",
    "test/loss": "test_loss", "test/accuracy": "test_accuracy",
    "speed/samples_per_second": "samples_per_second", "speed/train_seconds": "train_seconds",
}


def summary_writer(folder: str | Path) -> "SummaryWriter":
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError:
        raise FmnistError('--tensorboard needs TensorBoard: pip install "fmnist[tensorboard]"') from None
    return SummaryWriter(log_dir=str(folder))


class TensorBoardReporter:
    """A fmnist.train.Reporter that writes each epoch's metrics to TensorBoard, then passes everything on to
    `inner` (the progress bars, or a sweep's trial). The hparams go in once, at the first epoch written."""

    def __init__(self, folder: str | Path, config: TrainConfig, inner: "Reporter") -> None:
        self.writer = summary_writer(folder)
        self.config, self.inner, self.hparams_written = config, inner, False

    def __getattr__(self, name: str) -> Any:   # note, step, history...: the inner reporter's
        return getattr(self.inner, name)

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None:
        if not self.hparams_written:
            self._write_hparams()
        self.inner.epoch_start(epoch, epochs, samples)

    def epoch_end(self, row: dict) -> None:
        for tag, key in SCALARS.items():
            self.writer.add_scalar(tag, row[key], global_step=row["epoch"])
        self.writer.flush()   # an interrupted run keeps what it wrote
        self.inner.epoch_end(row)

    def _write_hparams(self) -> None:
        """The run's options, and the metrics they are judged by (read from the scalars of the same tags)."""
        from torch.utils.tensorboard.summary import hparams

        options = asdict(self.config)
        experiment, start, end = hparams({name: options[name] for name in HPARAMS},
                                         {"test/accuracy": 0.0, "test/loss": 0.0})
        file_writer = self.writer.file_writer
        assert file_writer is not None   # SummaryWriter opens it in __init__; only close() unsets it
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        self.hparams_written = True


def reporting(reporter: "Reporter", folder: Path | None, config: TrainConfig) -> "Reporter":
    """`reporter`, and TensorBoard's event files in `folder` beside it where one is given."""
    return TensorBoardReporter(folder, config, reporter) if folder else reporter
