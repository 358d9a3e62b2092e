"""Everything a person sees of a command: progress, tables, summaries, predictions and errors, in one place.
The library tells its progress through its Reporter interface and returns data; this module draws it."""

import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fmnist import FmnistError

if TYPE_CHECKING:   # for hints alone: importing torch here would slow --help
    import torch

out = Console()
err = Console(stderr=True)


def print_error(error: FmnistError | str) -> None:
    """The one line a user sees for a problem they can fix: `error: ...` on stderr, never wrapped."""
    err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)   # [..] is not markup


def note(message: str) -> None:
    err.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def say(line: str) -> None:
    """A line as it is: no highlighting, never wrapped (a log keeps it whole)."""
    out.print(line, highlight=False, soft_wrap=True)


# ---- fmnist train ----------------------------------------------------------------------------------------------

class TrainingReporter:
    """Draws a progress bar per epoch and prints a line after it (fmnist.train.Reporter's interface). The bar is
    drawn on a terminal only: into a pipe or a log, rich's transient bar leaves an empty line behind."""

    def __init__(self, refresh_seconds: float = 0.2) -> None:
        self.refresh_seconds = refresh_seconds
        self.progress: Progress | None = None
        self.trained = 0   # epochs ended here: after --resume, fewer than the run's

    def note(self, message: str) -> None:
        note(message)

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None:
        self.epoch, self.epochs = epoch, epochs
        self.start = self.last = time.perf_counter()
        if not out.is_terminal:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(), console=out, transient=True)
        self.task = self.progress.add_task("train", total=samples, loss="-", rate="-")
        self.progress.start()

    def step(self, samples_done: int, loss: "torch.Tensor") -> None:
        now = time.perf_counter()
        if self.progress is None or now - self.last < self.refresh_seconds:
            return    # reading `loss` syncs with the device: only do it when the bar is redrawn
        self.last = now
        rate = samples_done / (now - self.start)
        self.progress.update(self.task, completed=samples_done, loss=f"{loss.item():.4f}", rate=f"{rate:,.0f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> "TrainingReporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def epoch_end(self, row: dict) -> None:
        self.stop()
        if not self.trained:   # the first epoch of this command: the columns' names, once
            say(epoch_line(EPOCH_COLUMNS))
        self.trained += 1
        say(epoch_line(epoch_cells(row, self.epochs)))


# An epoch's line, under a header printed once: within 80 columns at any epoch count and speed (seven digits
# of samples/s included)
EPOCH_COLUMNS = ("epoch", "train loss", "train acc", "test loss", "test acc", "train s", "samples/s")
EPOCH_WIDTHS = (7, 10, 9, 9, 8, 7, 9)


def epoch_cells(row: dict, epochs: int) -> tuple[str, ...]:
    return (f"{row['epoch']}/{epochs}", f"{row['train_loss']:.4f}", f"{row['train_accuracy']:.2%}",
            f"{row['test_loss']:.4f}", f"{row['test_accuracy']:.2%}",
            f"{row['train_seconds']:.3g}" if row["train_seconds"] < 1000 else f"{row['train_seconds']:,.0f}",
            f"{row['samples_per_second']:,.0f}")


def epoch_line(cells: tuple[str, ...]) -> str:
    """The epoch (left) and its numbers (right), each in its column."""
    first, *numbers = cells
    right = [text.rjust(width) for text, width in zip(numbers, EPOCH_WIDTHS[1:], strict=True)]
    return "  ".join([first.ljust(EPOCH_WIDTHS[0]), *right])


def print_interrupted(message: str, out_dir: Path, epoch: int | None) -> None:
    """What an interrupted run left (`epoch`: the one its checkpoint holds; None: no epoch had ended)."""
    kept = ("no epoch had ended, so nothing was saved" if epoch is None else
            f"{out_dir / 'fmnist.pt'} holds epoch {epoch}: continue with `fmnist train --resume --out {out_dir}`")
    err.print(f"{message}; {kept}", highlight=False, soft_wrap=True)


def print_summary(summary: dict, out_dir: Path, seconds: float, trained: int | None = None,
                  data_dir: Path | None = None) -> None:
    """The run in a table (fmnist.summary's), and the command that comes next. trained: the epochs this command
    trained (fewer than the run's after --resume; None: all of them)."""
    table = Table(title="fmnist train", show_header=False)
    table.add_row("epochs", str(summary["epochs_done"]))
    table.add_row("final test accuracy", f"{summary['final_test_accuracy']:.2%} (best "
                                         f"{summary['best_test_accuracy']:.2%}, epoch {summary['best_epoch']})")
    table.add_row("final test loss", f"{summary['final_test_loss']:.4f}")
    table.add_row("training speed", f"{summary['samples_per_second']:,.0f} samples/s (mean over epochs)")
    table.add_row("training time", f"{summary['train_seconds']:.3g} s (the epochs' training passes)")
    if summary["compile_seconds"]:
        # torch.compile's compiling and, on CUDA, the capture of the epoch's graph (fmnist.train.epoch_runner)
        table.add_row("compile and capture", f"{summary['compile_seconds']:.1f} s, once, not in the training time")
    if summary["goal_epoch"] is not None:
        table.add_row("90% test accuracy", f"epoch {summary['goal_epoch']}, after {summary['goal_seconds']:.3g} s of "
                                           "training")
    table.add_row("wall time (this command)", f"{seconds:.1f} s (data loading and evaluation included)")
    if trained is not None and trained < summary["epochs_done"]:   # --resume: the wall time is not the run's
        table.add_row("trained by this command", _trained_here(summary["epochs_done"], trained))
    for name, file in (("checkpoint", "fmnist.pt"), ("metrics", "metrics.jsonl"), ("curves", "curves.png")):
        table.add_row(name, str(out_dir / file))
    out.print(table)
    say(f"next: export it to ONNX with {_export_command(out_dir, data_dir)}")


def _trained_here(epochs: int, trained: int) -> str:
    """After --resume, which of the run's epochs this command trained."""
    if trained == 0:
        return "none: the run was finished already"
    first = epochs - trained + 1
    here = f"epoch {epochs}" if trained == 1 else f"epochs {first}-{epochs}"
    return f"{here} ({'epoch 1' if first == 2 else f'epochs 1-{first - 1}'} earlier)"


def _export_command(out_dir: Path, data_dir: Path | None) -> str:
    """`fmnist export` for the run in out_dir, the model beside its checkpoint (export's defaults where they fit)."""
    import shlex

    words = ["fmnist export --onnx"]
    if out_dir != Path("export"):
        words += ["--checkpoint", shlex.quote(str(out_dir / "fmnist.pt")),
                  "--output", shlex.quote(str(out_dir / "fmnist.onnx"))]
    if data_dir:
        words += ["--data-dir", shlex.quote(str(data_dir))]
    return " ".join(words)


# ---- fmnist export, evaluate, predict, serve -------------------------------------------------------------------

def print_export(verification, tolerance: float, keep: float, output: Path) -> None:
    diffs = ", ".join(f"batch {size}: {diff:.1e}" for size, diff in verification.max_abs_diff.items())
    say(f"verified against torch on the 10,000 test images (max abs difference of logits {diffs}; "
        f"tolerance {tolerance:.0e}; same predicted classes)")
    say(f"onnxruntime test accuracy {verification.accuracy:.2%}")
    say(f"out-of-distribution threshold {verification.threshold:.3g}: keeps {keep:.0%} of the training images, "
        f"flags {verification.flagged:.1%} of the test images")
    say(f"wrote {output}")


def print_triton(repository: Path, folder: Path) -> None:
    say(f"wrote the Triton model repository {repository} (serve it with: tritonserver --model-repository={folder})")


def print_evaluation(report, classes, as_json: bool) -> None:
    """Accuracy overall and per class, the confusion matrix, and the share flagged (or the JSON of it all)."""
    if report.note:
        note(report.note)
    result = report.result
    if as_json:
        out.print_json(data={"model": report.model, **result.as_dict(classes),
                             "out_of_distribution_rate": report.flagged})
        return
    out.print(f"{report.model}: test accuracy [bold]{result.accuracy:.2%}[/] on {sum(map(sum, result.confusion)):,} "
              "images")
    per_class = Table("class", "accuracy", title="per class")
    for name, accuracy in zip(classes, result.per_class, strict=True):
        per_class.add_row(name, f"{accuracy:.1%}")
    out.print(per_class)
    confusion = Table("true \\ predicted", *[str(i) for i in range(len(classes))], title="confusion matrix")
    for i, (name, row) in enumerate(zip(classes, result.confusion, strict=True)):
        confusion.add_row(f"{i} {name}", *[f"[bold]{n}[/]" if i == j else str(n) for j, n in enumerate(row)])
    out.print(confusion)
    if report.flagged is not None:
        say(f"flagged as not Fashion-MNIST items: {report.flagged:.1%} of the test images")


def print_prediction(prediction: dict, asked: bool) -> None:
    """One image's line: its top classes, why it was negated (asked: --invert), whether it looks like an item."""
    line = f"{escape(prediction['image'])}: " + ", ".join(f"{row['class']} {row['probability']:.1%}"
                                                         for row in prediction["top"])
    if prediction["negated"] and asked:
        line += "  (negated, as asked)"
    elif prediction["negated"]:
        line += ("  (negated: light background)" if prediction["background"] == "light"
                 else "  (negated: no plain background; its border is mostly light)")
    if prediction["out_of_distribution"]:
        line += "  [bold yellow]does not look like a Fashion-MNIST item[/]"
    out.print(line, highlight=False, soft_wrap=True)


def serving(onnx: Path, host: str, grpc_port: int = 0):
    """The line `fmnist serve` prints once it listens, as a callback of the port it got."""
    address = f"[{host}]" if ":" in host else host
    grpc = f", gRPC at {address}:{grpc_port}" if grpc_port else ""
    return lambda port: say(f"serving {onnx} at http://{address}:{port}  (the page at /, KServe v2 at /v2{grpc}, "
                            "metrics at /metrics; Ctrl-C stops it)")


# ---- fmnist sweep ----------------------------------------------------------------------------------------------

def print_sweep(name: str, sweep, rows: list[dict], out_dir: Path, best: dict | None, again: str | None) -> None:
    """The table of the trials, best first; where results.csv and sweep.png are; the best run and the command
    that trains it again."""
    console = out if out.is_terminal else Console(width=160)   # logs and pipes get whole rows
    console.print(sweep_table(rows, sweep.swept, f"fmnist sweep {name}: {len(rows)} trials, best first",
                              console.width))
    say(f"wrote {out_dir / 'results.csv'} and {out_dir / 'sweep.png'}")
    if best:
        say(f"best: {best['folder']}, test accuracy {best['final_test_accuracy']:.2%}; train it again with:")
        say(f"  {again}")


def print_sweep_stopped(message: str) -> None:
    err.print(f"{message}: finished trials are kept, and the one that was running resumes from its last "
              "completed epoch when you run the same command again", highlight=False, soft_wrap=True)


def sweep_table(rows: list[dict], swept: list[str], title: str, width: int) -> Table:
    """The trials, best first, within `width` columns: each value on one line (a header may take two), and the
    folder column only where it fits (a grid's folder is named by the swept values; results.csv has each)."""
    from rich import box
    from rich.console import Console

    percent = lambda v: f"{v:.2%}" if v is not None else "-"   # noqa: E731
    headers = [*[name.replace("_", " ") for name in swept], "final acc", "best (epoch)", "epochs", "train s",
               "samples/s", "state", "folder"]
    cells = [[*[str(r.get(n, "-")) for n in swept], percent(r["final_test_accuracy"]),
              f"{percent(r['best_test_accuracy'])} ({r['best_epoch']})" if r["best_epoch"] else "-",
              str(r["epochs_done"] or "-"), f"{r['train_seconds']:.3g}" if r["train_seconds"] else "-",
              f"{r['samples_per_second']:,.0f}" if r["samples_per_second"] else "-", r["state"], r["folder"]]
             for r in rows]

    def table(columns: int) -> Table:
        folders_cut = columns < len(headers) and rows
        made = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, caption=
                     f"each trial's folder (e.g. {rows[0]['folder']}) is in results.csv" if folders_cut else None)
        for i, header in enumerate(headers[:columns]):   # nothing is cut: a column is as wide as its widest value
            made.add_column(header, width=max(len(text) for text in [*header.split(), *(r[i] for r in cells)]))
        for row in cells:
            made.add_row(*row[:columns])
        return made

    whole = table(len(headers))
    return whole if Console(width=10_000).measure(whole).maximum <= width else table(len(headers) - 1)
