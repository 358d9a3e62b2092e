"""The `fmnist` commands: each declares its options, builds what the library takes, calls one library function
and hands what it returns to the console. torch is imported inside the commands, never here, so that
`fmnist --help` answers at once."""

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fmnist import FmnistError, __version__
from fmnist.cli import console
from fmnist.cli.console import out
from fmnist.cli.options import sweep_option, train_option, with_learned
from fmnist.cli.usage import OneLineUsageErrors, friendly, stopped
from fmnist.serve.settings import DEFAULTS as SERVE, Settings

app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Train the classic Fashion-MNIST tutorial network, export it to ONNX, and measure how fast it runs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,   # click's plain help: two columns that wrap within 80, nothing cut off
)


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


DataDir = Annotated[Optional[Path], typer.Option(
    help="Folder with the four Fashion-MNIST IDX files (.gz or plain); then only that folder is used. "
         "Default: $FMNIST_DATA, ./data, /usr/share/datasets/fashion-mnist, else torchvision's download.")]


@app.command("train", short_help="Train the tutorial's Network; save a checkpoint after every epoch.")
@friendly
@with_learned(train_option)
def train_command(
    recipe: Annotated[str, typer.Option(
        metavar="[tuned|seed]", help="tuned: reaches 91% test accuracy (see README); seed: the tutorial's recipe "
        "exactly. The options below default to the recipe's values (shown: tuned's).")] = "tuned",
    learned: dict = {},   # noqa: B006  (never called with it: with_learned puts the learned options here)
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
             'folder; needs pip install "fmnist[tensorboard]".')] = None,
) -> None:
    """Train the tutorial's Network on Fashion-MNIST; save a checkpoint and metrics after every epoch."""
    if any("," in text or ".." in text for text in (recipe, learned["schedule"] or "")):   # numbers: click refuses
        raise typer.BadParameter("a list or range")   # a usage error: usage_message says it is fmnist sweep's
    from fmnist import train
    from fmnist.checkpoint import saved_epoch
    from fmnist.summary import summarize
    from fmnist.tensorboard import reporting

    placement = dict(device=device, compile=compile, amp=amp, data_dir=str(data_dir) if data_dir else None,
                     out=str(out_dir))
    config, saved = train.configure({**learned, "recipe": recipe}, placement, resume)
    start = time.perf_counter()
    try:
        with console.TrainingReporter() as bars:   # every way out stops its bar: the terminal gets its cursor back
            history = train.train(config, reporting(bars, tensorboard, config), resume=resume, overwrite=overwrite,
                                  checkpoint=saved)
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated)
        message, code = stopped(e)
        console.print_interrupted(message, out_dir, saved_epoch(out_dir))
        raise typer.Exit(code) from None
    console.print_summary(summarize(history), out_dir, time.perf_counter() - start, bars.trained, data_dir)


@app.command("export", short_help="Export a checkpoint to one ONNX file, verified on the test set.")
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
        from fmnist.triton import check_target
        check_target(triton)   # refused before the export, not after its minute of work
    console.print_export(export_onnx(checkpoint, output, data_dir), TOLERANCE, KEEP, output)
    if triton:
        from fmnist.triton import write_model_repository
        console.print_triton(write_model_repository(output, triton), triton)


@app.command("evaluate", short_help="Accuracy on the 10,000 test images: overall, per class, confusion.")
@friendly
def evaluate_command(
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Evaluate this checkpoint with torch (the default: export/fmnist.pt).")] = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Evaluate this ONNX model with onnxruntime.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also draw the confusion matrix into this file (.png, .svg or .pdf).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Accuracy on the 10,000 test images: overall, per class, and the confusion matrix."""
    from fmnist import plots
    from fmnist.evaluation import evaluate as evaluate_model
    from fmnist.files import PICTURES, file_target
    from fmnist.model import CLASSES

    if plot:
        file_target(plot, "--plot", PICTURES)
    report = evaluate_model(checkpoint, onnx, data_dir)
    console.print_evaluation(report, CLASSES, as_json)
    if plot:
        plots.confusion(report.result.confusion, CLASSES, plot,
                        title=f"{report.model}: test accuracy {report.result.accuracy:.2%}")
        if not as_json:
            console.say(f"wrote {plot}")


@app.command("predict", short_help="Classify image files with onnxruntime (no torch).")
@friendly
def predict_command(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", help="PNG or JPEG files, any size and mode.")],
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
        console.note(runtime.CANNOT_FLAG)
    results, failed = [], 0
    for path in images:
        try:
            results.append(runtime.predict_file(sess, path, invert, top))
        except FmnistError as e:
            console.print_error(e)
            failed += 1
            continue
        if not as_json:
            console.print_prediction(results[-1], asked=invert is not None)
    if as_json:
        out.print_json(data=results)
    if failed:
        raise typer.Exit(1)


@app.command("serve", short_help="Serve the model over HTTP: KServe v2, a page, metrics.")
@friendly
def serve_command(
    onnx: Annotated[Path, typer.Option("--onnx", help="The exported model.")] = Path(SERVE.onnx),
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every network.")] = SERVE.host,
    port: Annotated[int, typer.Option(help="TCP port.")] = SERVE.port,
    grpc_port: Annotated[int, typer.Option(help="TCP port of the same protocol over gRPC, as Triton's 8001; "
                                           "0: none.")] = SERVE.grpc_port,
    workers: Annotated[int, typer.Option(help="Server processes, each with its share of the cores.")] = SERVE.workers,
    max_batch: Annotated[int, typer.Option(help="Most images in one onnxruntime run, from requests that arrive "
                                           "together (dynamic batching); 1 turns it off.")] = SERVE.max_batch,
    max_delay_ms: Annotated[float, typer.Option(
        help="How long a run waits for more requests after the first.")] = SERVE.max_delay_ms,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body accepted.")] = SERVE.max_body_mb,
) -> None:
    """Answer requests over HTTP and gRPC with onnxruntime (no torch): the KServe v2 / Triton protocol at /v2,
    image files at /predict, a page for people at /, Prometheus metrics at /metrics."""
    try:   # the serve extra's packages are imported here: without one, the line below names the extra
        from fmnist.serve.launcher import serve
    except ImportError as e:
        raise FmnistError(f"fmnist serve needs {(e.name or '?').split('.')[0]}: pip install \"fmnist[serve]\"") \
            from None
    settings = Settings(onnx=str(onnx), host=host, port=port, grpc_port=grpc_port, workers=workers,
                        max_batch=max_batch, max_delay_ms=max_delay_ms, max_body_mb=max_body_mb)
    serve(settings, on_start=console.serving(onnx, host, grpc_port))
    console.say("stopped")


@app.command("sweep", short_help="Many training runs compared: a grid of values, or a search.")
@friendly
@with_learned(sweep_option)
def sweep_command(
    recipe: Annotated[Optional[str], typer.Option(metavar="LIST", help="Recipes whose defaults the other options "
                                                  "override: tuned, seed [default: tuned].")] = None,
    learned: dict = {},   # noqa: B006  (never called with it: with_learned puts the learned options here)
    trials: Annotated[Optional[int], typer.Option(help="How many trials a search over ranges runs.")] = None,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", help="Stop trials whose test accuracy falls "
                                        "below the median of the others' at the same epoch.")] = False,
    workers: Annotated[int, typer.Option(help="Trials run at a time on this machine, each in its own "
                                         "process with its share of the cores.")] = 1,
    storage: Annotated[Optional[str], typer.Option(help="An Optuna database URL shared by workers on many machines "
                                                   "(e.g. postgresql://user:pass@host/db) [default: a journal "
                                                   "file in --out].")] = None,
    study: Annotated[Optional[str], typer.Option(help="The study's name in the storage [default: --out's "
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
    from fmnist.sweep import plan, results
    from fmnist.sweep.study import open_study_to_show
    from fmnist.sweep.workers import Placement, run_sweep

    name = study or out_dir.resolve().name
    if show:
        the_study = open_study_to_show(storage, out_dir, name)
    else:
        texts = {"recipe": recipe, **learned}
        placement = Placement(out_dir, device, compile, amp, str(data_dir) if data_dir else None, tensorboard)
        try:
            the_study = run_sweep(plan.from_options(texts, trials, prune), name, storage, placement, workers,
                                  say=console.say)
        except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated)
            message, code = stopped(e)
            console.print_sweep_stopped(message)
            raise typer.Exit(code) from None
    sweep, rows = results.save(the_study, out_dir)
    best = results.best(rows)
    console.print_sweep(the_study.study_name, sweep, rows, out_dir, best,
                        results.reproduce(best, sweep, out_dir) if best else None)
