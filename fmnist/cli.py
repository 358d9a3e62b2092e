"""The `fmnist` command: parses options, builds a config, calls one library function per command.

torch is imported inside the commands, never here, so `fmnist --help` answers at once.
"""

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, ParamSpec, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fmnist import FmnistError, Terminated, __version__
from fmnist.config import SCHEDULES, TrainConfig

if TYPE_CHECKING:   # for hints alone: importing torch here would slow --help
    import torch

try:
    from typer import TyperException as UsageProblem  # typer >= 0.20 carries its own click
except ImportError:                                   # older typer: click's
    from click import ClickException as UsageProblem  # type: ignore[assignment]  # mypy reads the newer typer

class OneLineUsageErrors(typer.core.TyperGroup):
    """A mistyped command line (an unknown option, a missing value) is one `error:` line, like every other
    error of fmnist, rather than click's usage block and boxed message. Exit codes, as the README gives them: 2
    for these, 1 for a value, file or data the user can fix (`friendly`), 130 interrupted."""

    # The ignore: click's main has windows_expand_args after standalone_mode; this one takes it, and whatever
    # else a click version adds, in **extra and passes it on.
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:   # older click's Ctrl-C outside a command (newer typer's exits 130 by itself)
            err.print("interrupted", highlight=False)
            sys.exit(130)
        except UsageProblem as e:   # UsageError, BadParameter, NoSuchOption...
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":   # `fmnist` alone: the help, as before
                out.print(ctx.get_help() if ctx else "", highlight=False)
            else:
                print_error(usage_message(e, ctx, sys.argv[1:] if args is None else list(args)))
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


# Options that people bring from other tools; click's close matches (difflib) do not find these.
ALIASES = {"--model": ("--onnx", "--checkpoint"), "--learning-rate": ("--lr",)}
# train's options that fmnist sweep takes as lists or ranges (train's --seed is sweep's --seeds)
SWEPT = ("--recipe", "--epochs", "--batch-size", "--lr", "--schedule", "--shift", "--label-smoothing", "--ema",
         "--seed")


def usage_message(e, ctx, args: list[str]) -> str:
    """click's one-line message for a mistyped command line, and what fmnist knows beside it: a list or range
    given to `train` is `fmnist sweep`'s; the option that an unknown one probably meant."""
    listed = _list_for_sweep(args) if ctx is not None and ctx.command.name == "train" else None
    if listed:
        return listed
    message = e.format_message()
    if type(e).__name__ == "NoSuchOption" and ctx is not None:
        options = {name for param in ctx.command.params for name in param.opts}
        meant = [name for name in ALIASES.get(e.option_name, ()) if name in options] or list(e.possibilities or ())
        either = ", ".join(meant[:-1]) + " or " + meant[-1] if len(meant) > 1 else "".join(meant)   # best first
        message = e.message + (f"; did you mean {either}?" if meant else "")
    return message + (f" (see `{ctx.command_path} --help`)" if ctx else "")


def _list_for_sweep(args: list[str]) -> str | None:
    """`fmnist train --lr 0.01,0.003`: train takes one value per option; say that lists and ranges are the sweep's."""
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option not in SWEPT:
            continue
        value = value if equals else (args[i + 1] if i + 1 < len(args) else "")
        if "," in value or ".." in value:
            sweep_option = "--seeds" if option == "--seed" else option
            return (f"{option} {value}: fmnist train takes one value; lists and ranges are fmnist sweep's "
                    f"(fmnist sweep {sweep_option} {value})")
    return None


app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Train the classic Fashion-MNIST tutorial network, export it to ONNX, and measure how fast it runs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",   # help texts are rich markup: a literal [ is written \\[ (typer's default, made explicit)
)
out = Console()
err = Console(stderr=True)


def print_error(error: FmnistError | str) -> None:
    """The one line a user sees for a problem they can fix: `error: ...` on stderr, never wrapped."""
    err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)   # [..] is not markup


def stopped(interruption: KeyboardInterrupt) -> tuple[str, int]:
    """What an interrupted command says, and its exit code: Ctrl-C's or SIGTERM's."""
    return ("terminated", 143) if isinstance(interruption, Terminated) else ("interrupted", 130)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated (Python's default lets the process die without a word)."""
    if threading.current_thread() is not threading.main_thread():   # signals are the main thread's alone
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


P = ParamSpec("P")
R = TypeVar("R")


def friendly(command: Callable[P, R]) -> Callable[P, R]:
    """Run a command so that a problem the user can fix is one line on stderr and exit code 1, not a
    traceback. FMNIST_DEBUG=1 (or `fmnist --debug`) shows the traceback instead."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except FmnistError as e:
            if os.environ.get("FMNIST_DEBUG"):
                raise
            print_error(e)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            message, code = stopped(e)
            err.print(message, highlight=False)
            raise typer.Exit(code) from None

    return run


def _version(value: bool):
    if value:
        out.print(f"fmnist {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors "
                                                        "(or set FMNIST_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["FMNIST_DEBUG"] = "1"   # read by `friendly`


TUNED = TrainConfig()   # the default recipe, whose values --help shows
DataDir = Annotated[Optional[Path], typer.Option(
    help="Folder with the four Fashion-MNIST IDX files (.gz or plain); then only that folder is used. "
         "Default: $FMNIST_DATA, ./data, /usr/share/datasets/fashion-mnist, else torchvision's download.")]


@app.command()
@friendly
def train(
    recipe: Annotated[str, typer.Option(
        metavar="[tuned|seed]", help="tuned: reaches 91% test accuracy (see README); seed: the tutorial's recipe "
        "exactly. The options below default to the recipe's values (shown: tuned's).")] = "tuned",
    epochs: Annotated[Optional[int], typer.Option(help="Full passes over the 60,000 training images.",
                                                  show_default=str(TUNED.epochs))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step.",
                                                      show_default=str(TUNED.batch_size))] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam's learning rate; with a schedule, its peak.",
                                                show_default=str(TUNED.lr))] = None,
    schedule: Annotated[Optional[str], typer.Option(metavar=f"[{'|'.join(SCHEDULES)}]", show_default=TUNED.schedule,
                                                    help="How the step size moves, batch by batch.")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips.",
                                                 show_default="--flip" if TUNED.flip else "--no-flip")] = None,
    shift: Annotated[Optional[int], typer.Option(help="Random shifts of up to this many pixels (0: off).",
                                                 show_default=str(TUNED.shift))] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing of the loss (0: off).",
                                                             show_default=str(TUNED.label_smoothing))] = None,
    ema: Annotated[Optional[float], typer.Option(
        help="Decay of a moving average of the weights, which is then evaluated and saved (0: off).",
        show_default=str(TUNED.ema))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the initial weights, batch order and augmentation.",
                                                show_default=str(TUNED.seed))] = None,
    device: Annotated[str, typer.Option(metavar="[auto|cpu|cuda]",
                                        help="auto takes CUDA when present.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the Network.")] = False,
    amp: Annotated[bool, typer.Option(
        "--amp/--no-amp", help="CUDA autocast (bf16, or fp16 with loss scaling); no effect on CPU.")] = False,
    data_dir: DataDir = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for fmnist.pt, metrics.jsonl and curves.png.")]
        = Path("export"),
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its last completed epoch, with its own recipe, up to --epochs.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the run already in --out (otherwise refused, so that no finished run is lost).")] = False,
    tensorboard: Annotated[Optional[Path], typer.Option(
        help='Also write TensorBoard event files (every epoch\'s metrics, the options as hparams) into this '
             'folder; needs pip install "fmnist\\[tensorboard]".')] = None,
) -> None:
    """Train the tutorial's Network on Fashion-MNIST; save a checkpoint and metrics after every epoch."""
    if any("," in text or ".." in text for text in (recipe, schedule or "")):   # the numbers' are click's to refuse
        raise typer.BadParameter("a list or range")   # a usage error: usage_message says it is fmnist sweep's
    from fmnist import train as training
    from fmnist.checkpoint import resumed_config
    from fmnist.config import recipe as recipe_config

    if compile:   # on a machine without CUDA, torch.compile warns that it found no CUDA toolkit: irrelevant here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    runtime: dict[str, Any] = dict(device=device, compile=compile, amp=amp,
                                   data_dir=str(data_dir) if data_dir else None, out=str(out_dir))
    learning = dict(batch_size=batch_size, lr=lr, schedule=schedule, flip=flip, shift=shift,
                    label_smoothing=label_smoothing, ema=ema, seed=seed)
    if resume:
        config = resumed_config(epochs, **runtime, changed=dict(
            learning, recipe=recipe if recipe != "tuned" else None))
    else:
        config = recipe_config(recipe, epochs=epochs, **learning, **runtime)
    bars = RichReporter()
    reporter: training.Reporter = bars
    if tensorboard:
        from fmnist.tensorboard import TensorBoardReporter

        reporter = TensorBoardReporter(tensorboard, config, bars)
    start = time.perf_counter()
    try:
        history = training.train(config, reporter, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated)
        bars.stop()   # before the message (the finally below does it on every other way out)
        message, code = stopped(e)
        err.print(f"{message}; {_kept(out_dir)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    finally:
        bars.stop()   # every way out gives the terminal its cursor back
    _summary(history, out_dir, time.perf_counter() - start, bars.trained, data_dir)


def _kept(out_dir: Path) -> str:
    """What an interrupted run left: the epoch its checkpoint holds, if any."""
    from fmnist.checkpoint import load_checkpoint

    path = out_dir / "fmnist.pt"
    if not path.is_file():
        return "no epoch had ended, so nothing was saved"
    epoch = load_checkpoint(path).get("epoch")
    return f"{path} holds epoch {epoch}: continue with `fmnist train --resume --out {out_dir}`"


@app.command("export")
@friendly
def export_command(
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the one format for now).")] = False,
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint written by `fmnist train`.")] = Path("export/fmnist.pt"),
    output: Annotated[Path, typer.Option(help="Where the ONNX model goes.")] = Path("export/fmnist.onnx"),
    triton: Annotated[Optional[Path], typer.Option(metavar="DIR", help=(
        "Also write a Triton model repository for the ONNX model into this folder: DIR/fmnist."))] = None,
    data_dir: DataDir = None,
) -> None:
    """Export a trained Network to one self-contained ONNX file, verified on the test set before it is kept."""
    if triton and not onnx:
        raise FmnistError("--triton writes a Triton model repository for the ONNX model: add --onnx")
    if not onnx:
        raise FmnistError("say which format: `fmnist export --onnx` (ONNX is the one format for now)")
    from fmnist.export import TOLERANCE, export_onnx
    from fmnist.ood import KEEP

    if triton:
        from fmnist.triton import check_target, write_model_repository
        check_target(triton)   # refused before the export, not after its minute of work
    verification = export_onnx(checkpoint, output, data_dir)
    diffs = ", ".join(f"batch {size}: {diff:.1e}" for size, diff in verification.max_abs_diff.items())
    out.print(f"verified against torch on the 10,000 test images (max abs difference of logits {diffs}; "
              f"tolerance {TOLERANCE:.0e}; same predicted classes)", highlight=False, soft_wrap=True)
    out.print(f"onnxruntime test accuracy {verification.accuracy:.2%}", highlight=False)
    out.print(f"out-of-distribution threshold {verification.threshold:.3g}: keeps {KEEP:.0%} of the training images, "
              f"flags {verification.flagged:.1%} of the test images", highlight=False, soft_wrap=True)
    out.print(f"wrote {output}", highlight=False)
    if triton:
        out.print(f"wrote the Triton model repository {write_model_repository(output, triton)} "
                  f"(serve it with: tritonserver --model-repository={triton})", highlight=False, soft_wrap=True)


@app.command()
@friendly
def evaluate(
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Evaluate this checkpoint with torch (the default: export/fmnist.pt).")] = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Evaluate this ONNX model with onnxruntime.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also draw the confusion matrix into this file (.png, .svg or .pdf).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Accuracy on the 10,000 test images: overall, per class, and the confusion matrix."""
    if checkpoint and onnx:
        raise FmnistError("give --checkpoint or --onnx, not both")
    from fmnist import data, runtime
    from fmnist.files import PICTURES, file_target
    from fmnist.model import CLASSES

    if plot:
        file_target(plot, "--plot", PICTURES)

    # classify(images) -> (predicted classes, the share flagged as not Fashion-MNIST: the ONNX model's score only)
    if onnx:
        sess, model = runtime.session(onnx), str(onnx)
        threshold = runtime.ood_threshold(sess)
        if threshold is None:
            _note(runtime.CANNOT_FLAG)

        def classify(images):
            logits, scores = runtime.run(sess, images)
            if threshold is None:
                return logits.argmax(axis=1), None
            assert scores is not None   # ood_threshold gives a threshold only to a model with ood_score
            return logits.argmax(axis=1), float((scores > threshold).mean())
    else:
        import torch

        from fmnist.checkpoint import load_network
        from fmnist.train import infer

        checkpoint = checkpoint or Path("export/fmnist.pt")
        network, model = load_network(checkpoint), str(checkpoint)
        classify = lambda images: (infer(network, torch.from_numpy(images)).argmax(dim=1).numpy(), None)   # noqa: E731
    test = data.load("test", data_dir)
    predicted, flagged = classify(runtime.to_model_input(test.images))
    result = runtime.evaluation(test.labels, predicted)
    if as_json:
        out.print_json(data={"model": model, **result.as_dict(CLASSES), "out_of_distribution_rate": flagged})
    else:
        _print_evaluation(model, result, CLASSES)
        if flagged is not None:
            out.print(f"flagged as not Fashion-MNIST items: {flagged:.1%} of the test images", highlight=False)
    if plot:
        from fmnist import plots

        plots.confusion(result.confusion, CLASSES, plot, title=f"{model}: test accuracy {result.accuracy:.2%}")
        if not as_json:
            out.print(f"wrote {plot}", highlight=False)


def _print_evaluation(model: str, result, classes) -> None:
    out.print(f"{model}: test accuracy [bold]{result.accuracy:.2%}[/] on {sum(map(sum, result.confusion)):,} images")
    per_class = Table("class", "accuracy", title="per class")
    for name, accuracy in zip(classes, result.per_class, strict=True):
        per_class.add_row(name, f"{accuracy:.1%}")
    out.print(per_class)
    confusion = Table("true \\ predicted", *[str(i) for i in range(len(classes))], title="confusion matrix")
    for i, (name, row) in enumerate(zip(classes, result.confusion, strict=True)):
        confusion.add_row(f"{i} {name}", *[f"[bold]{n}[/]" if i == j else str(n) for j, n in enumerate(row)])
    out.print(confusion)


@app.command()
@friendly
def predict(
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files, any size and mode.")],
    onnx: Annotated[Path, typer.Option("--onnx", help="The exported model.")] = Path("export/fmnist.onnx"),
    invert: Annotated[Optional[bool], typer.Option(
        "--invert/--no-invert", show_default="decided per image",
        help="Negate the image, or not. By default fmnist decides from the image's border: a garment on a light "
             "background is negated, to become a light garment on dark as in Fashion-MNIST.")] = None,
    top: Annotated[int, typer.Option(help="How many classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Classify image files with onnxruntime (no torch): the top classes and their probabilities.

    An image that cannot be read is reported on stderr; the others are still classified, and the exit
    code is then 1."""
    from fmnist import runtime

    if not 1 <= top <= runtime.MAX_TOP:
        raise FmnistError(f"--top {top}: must be 1 to {runtime.MAX_TOP} (there are {runtime.MAX_TOP} classes)")
    sess = runtime.session(onnx)
    if runtime.ood_threshold(sess) is None:
        _note(runtime.CANNOT_FLAG)
    results, failed = [], 0
    for path in images:
        try:
            prepared = runtime.load_image(path, invert)
            [prediction] = runtime.predictions(sess, prepared.input, top)
        except FmnistError as e:
            print_error(e)
            failed += 1
            continue
        results.append({"image": str(path), "negated": prepared.negated, "background": prepared.background,
                        **prediction})
        if not as_json:
            _print_prediction(results[-1], asked=invert is not None)
    if as_json:
        out.print_json(data=results)
    if failed:
        raise typer.Exit(1)


def _print_prediction(prediction: dict, asked: bool) -> None:
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


def _note(message: str) -> None:
    err.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def serve(
    onnx: Annotated[Path, typer.Option("--onnx", help="The exported model.")] = Path("export/fmnist.onnx"),
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes, each with its share of the cores.")] = 1,
    max_batch: Annotated[int, typer.Option(help="Most images in one onnxruntime run, from requests that arrive "
                                           "together (dynamic batching); 1 turns it off.")] = 256,
    max_delay_ms: Annotated[float, typer.Option(help="How long a run waits for more requests after the first.")] = 0.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body accepted.")] = 32.0,
) -> None:
    """Answer requests over HTTP with onnxruntime (no torch): the KServe v2 / Triton protocol at /v2, image
    files at /predict, a page for people at /, Prometheus metrics at /metrics."""
    try:
        from fmnist import serve as server
    except ImportError as e:
        raise FmnistError(f"fmnist serve needs {e.name}: pip install \"fmnist[serve]\"") from None
    for name, value, least in (("--workers", workers, 1), ("--max-batch", max_batch, 1)):
        if value < least:
            raise FmnistError(f"{name} {value}: must be {least} or more")
    if not 0 <= port <= 65535:
        raise FmnistError(f"--port {port}: must be 0 to 65535 (0: a free port, chosen by the system)")
    if max_delay_ms < 0 or max_body_mb <= 0:
        raise FmnistError("--max-delay-ms must be 0 or more and --max-body-mb more than 0")
    settings = server.Settings(onnx=str(onnx), max_batch=max_batch, max_delay_ms=max_delay_ms,
                               max_body_mb=max_body_mb)
    address = f"[{host}]" if ":" in host else host
    started = lambda bound: out.print(f"serving {onnx} at http://{address}:{bound}  (the page at /, KServe v2 at "   # noqa: E731
                                      "/v2, metrics at /metrics; Ctrl-C stops it)", highlight=False, soft_wrap=True)
    server.serve(settings, host, port, workers, on_start=started)
    out.print("stopped", highlight=False)


SweepValues = Annotated[Optional[str], typer.Option(metavar="LIST|RANGE")]


@app.command()
@friendly
def sweep(
    recipe: Annotated[Optional[str], typer.Option(metavar="LIST", help="Recipes whose defaults the other options "
                                                  "override: tuned, seed \\[default: tuned].")] = None,
    epochs: Annotated[Optional[str], typer.Option(metavar="LIST|RANGE", help="e.g. 5 or 10,20 or 10..40.")] = None,
    batch_size: Annotated[Optional[str], typer.Option(metavar="LIST|RANGE", help="e.g. 100,1000.")] = None,
    lr: Annotated[Optional[str], typer.Option(metavar="LIST|RANGE",
                                              help="e.g. 0.01,0.001 or 1e-4..1e-2 (searched on a log scale).")] = None,
    schedule: Annotated[Optional[str], typer.Option(metavar="LIST", help="e.g. constant,onecycle.")] = None,
    flip: Annotated[Optional[str], typer.Option(metavar="LIST", help="on, off or on,off.")] = None,
    shift: SweepValues = None,
    label_smoothing: Annotated[Optional[str], typer.Option(metavar="LIST|RANGE", help="e.g. 0..0.2.")] = None,
    ema: SweepValues = None,
    seeds: Annotated[Optional[str], typer.Option(metavar="LIST", help="e.g. 0,1,2: each point once per seed.")] = None,
    trials: Annotated[Optional[int], typer.Option(help="How many trials a search over ranges runs.")] = None,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", help="Stop trials whose test accuracy falls "
                                        "below the median of the others' at the same epoch.")] = False,
    workers: Annotated[int, typer.Option(help="Trials run at a time on this machine, each in its own "
                                         "process with its share of the cores.")] = 1,
    storage: Annotated[Optional[str], typer.Option(help="An Optuna database URL shared by workers on many machines "
                                                   "(e.g. postgresql://user:pass@host/db) \\[default: a journal "
                                                   "file in --out].")] = None,
    study: Annotated[Optional[str], typer.Option(help="The study's name in the storage \\[default: --out's "
                                                 "folder name].")] = None,
    show: Annotated[bool, typer.Option("--show", help="Only show the results so far; train nothing.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Write each trial's TensorBoard event "
                                              "files into its folder.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda, for every trial.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile in every trial.")] = False,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="CUDA autocast in every trial.")] = False,
    data_dir: DataDir = None,
    out_dir: Annotated[Path, typer.Option("--out", help="The sweep's folder: a folder per trial, results.csv, "
                                          "sweep.png and the journal.")] = Path("runs/sweep"),
) -> None:
    """Many training runs compared: every combination of the listed values (a grid), or --trials N drawn
    from ranges lo..hi (a search). Running the same command again continues the sweep."""
    from fmnist import sweep as sweeping
    from fmnist.workers import Runtime, run_workers, work

    name = study or out_dir.resolve().name
    if show:
        _show_sweep(sweeping.open_study_to_show(storage, out_dir, name), out_dir)
        return
    given = dict(recipe=recipe, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, flip=flip,
                 shift=shift, label_smoothing=label_smoothing, ema=ema, seed=seeds)
    values = {key: sweeping.parse_values(key, text, "--seeds" if key == "seed" else None)
              for key, text in given.items() if text is not None}
    plan = sweeping.make_sweep(values, trials, prune)
    if workers < 1:
        raise FmnistError(f"--workers {workers}: must be 1 or more")
    from fmnist import data
    from fmnist.files import prepare_out
    from fmnist.train import resolve_device

    resolve_device(device)
    if tensorboard:
        from fmnist.tensorboard import summary_writer  # noqa: F401  (one line now if the extra is missing)
    data.locate(data_dir)
    prepare_out(out_dir).mkdir(parents=True, exist_ok=True)   # the journal and the trials' folders go here
    sweeping.quiet_optuna()
    db = sweeping.open_storage(storage, out_dir)
    the_study = sweeping.open_study(db, name, plan)
    runtime = Runtime(out_dir, device, compile, amp, str(data_dir) if data_dir else None, tensorboard)
    try:
        if workers == 1:
            work(the_study, plan, runtime, say=lambda line: out.print(line, highlight=False, soft_wrap=True))
        else:
            run_workers(storage, name, plan, runtime, workers)
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated)
        message, code = stopped(e)
        err.print(f"{message}: finished trials are kept, and the one that was running resumes from its last "
                  "completed epoch when you run the same command again", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    _show_sweep(the_study, out_dir)


def _show_sweep(the_study, out_dir: Path) -> None:
    """The table of the trials, best first; results.csv and sweep.png beside the trials; the best run and the
    command that trains it again."""
    from fmnist import plots, results
    from fmnist.files import prepare_out
    from fmnist.sweep import Sweep

    prepare_out(out_dir)
    plan = Sweep.from_json(the_study.user_attrs["sweep"])
    rows = results.rows(the_study)
    console = out if out.is_terminal else Console(width=160)   # logs and pipes get whole rows
    console.print(sweep_table(rows, plan.swept, f"fmnist sweep {the_study.study_name}: {len(rows)} trials, best "
                              "first", console.width))
    results.write_csv(rows, plan, out_dir / "results.csv")
    plots.sweep(rows, plan.swept, out_dir / "sweep.png", title=f"sweep {the_study.study_name}")
    out.print(f"wrote {out_dir / 'results.csv'} and {out_dir / 'sweep.png'}", highlight=False)
    top = results.best(rows)
    if top:
        out.print(f"best: {top['folder']}, test accuracy {top['final_test_accuracy']:.2%}; train it again with:",
                  highlight=False)
        out.print(f"  {results.reproduce(top, plan, out_dir)}", highlight=False, soft_wrap=True)


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


class RichReporter:
    """Draws a progress bar per epoch and prints a line after it (fmnist.train.Reporter's interface). The bar is
    drawn on a terminal only: into a pipe or a log, rich's transient bar leaves an empty line behind."""

    def __init__(self, refresh_seconds: float = 0.2) -> None:
        self.refresh_seconds = refresh_seconds
        self.progress: Progress | None = None
        self.trained = 0   # epochs ended here: after --resume, fewer than the run's

    def note(self, message: str) -> None:
        _note(message)

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

    def epoch_end(self, row: dict) -> None:
        self.stop()
        if not self.trained:   # the first epoch of this command: the columns' names, once
            out.print(epoch_line(EPOCH_COLUMNS), highlight=False, soft_wrap=True)
        self.trained += 1
        out.print(epoch_line(epoch_cells(row, self.epochs)), highlight=False, soft_wrap=True)


# An epoch's line, under a header printed once: within 80 columns at any epoch count and speed (1,000,000 samples/s)
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


def _summary(history: list[dict], out_dir: Path, seconds: float, trained: int | None = None,
             data_dir: Path | None = None) -> None:
    """The run in a table, and the command that comes next. trained: the epochs this command trained (fewer than
    the run's after --resume; None: all of them)."""
    last = history[-1]
    best = max(history, key=lambda row: row["test_accuracy"])
    table = Table(title="fmnist train", show_header=False)
    table.add_row("epochs", str(last["epoch"]))
    table.add_row("final test accuracy", f"{last['test_accuracy']:.2%} (best {best['test_accuracy']:.2%}, "
                                         f"epoch {best['epoch']})")
    table.add_row("final test loss", f"{last['test_loss']:.4f}")
    mean_rate = sum(r["samples_per_second"] for r in history) / len(history)
    table.add_row("training speed", f"{mean_rate:,.0f} samples/s (mean over epochs)")
    table.add_row("training time", f"{sum(r['train_seconds'] for r in history):.3g} s (the epochs' training passes)")
    compile_seconds = sum(r.get("compile_seconds", 0.0) for r in history)   # older runs lack it
    if compile_seconds:
        table.add_row("torch.compile", f"{compile_seconds:.1f} s, once, not in the training time")
    reached = next((r for r in history if r["test_accuracy"] >= 0.90), None)
    if reached:
        seconds_to_90 = sum(r["train_seconds"] for r in history[:history.index(reached) + 1])
        table.add_row("90% test accuracy", f"epoch {reached['epoch']}, after {seconds_to_90:.3g} s of training")
    table.add_row("wall time (this command)", f"{seconds:.1f} s (data loading and evaluation included)")
    if trained is not None and trained < len(history):   # --resume: the wall time is not the run's
        table.add_row("trained by this command", _trained_here(len(history), trained))
    table.add_row("checkpoint", str(out_dir / "fmnist.pt"))
    table.add_row("metrics", str(out_dir / "metrics.jsonl"))
    table.add_row("curves", str(out_dir / "curves.png"))
    out.print(table)
    out.print(f"next: export it to ONNX with {_export_command(out_dir, data_dir)}", highlight=False, soft_wrap=True)


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


if __name__ == "__main__":
    sys.exit(app())
