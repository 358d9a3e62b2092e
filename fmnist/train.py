"""A training run: its config and resume policy, its epochs, what it saves after each, and evaluation."""

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fmnist import FmnistError, data, plots
from fmnist.checkpoint import load_checkpoint, save_checkpoint, write_metrics
from fmnist.config import TrainConfig, check, recipe, train_command  # noqa: F401  (recipe: the library's, with train)
from fmnist.files import hold, prepare_out
from fmnist.graph import EpochGraph
from fmnist.loop import (
    SILENT,
    Reporter,
    TrainingState,
    autocast_dtype,
    compile_ahead,
    compiled_network,
    make_step,
    train_epoch,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FmnistError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise FmnistError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def train(config: TrainConfig, report: Reporter = SILENT, resume: bool = False, overwrite: bool = False,
          checkpoint: dict | None = None) -> list[dict]:
    """Train the Network as `config` says; after each epoch, write the checkpoint and metrics to config.out.

    resume: continue the run whose checkpoint is in config.out from its last completed epoch (`checkpoint`:
    that checkpoint, where the caller has read it already, as resumed_config does).
    overwrite: a fresh run may replace the run already in config.out (refused otherwise, to lose nothing).
    Returns the metrics, one dict per epoch.
    """
    check(config)
    device = resolve_device(config.device)
    with hold(prepare_out(config.out)) as out:
        if resume and checkpoint is None:
            checkpoint = load_checkpoint(out / "fmnist.pt", resume=True)
        return _train(config, device, out, report, checkpoint if resume else None, overwrite)


def configure(learning: dict, placement: dict, resume: bool) -> tuple[TrainConfig, dict | None]:
    """`fmnist train`'s config, and the checkpoint it resumes (None for a fresh run). learning: the options
    that change what is learned, None where not given (recipe and epochs among them); placement: where and
    how it runs (device, compile, amp, data_dir, out)."""
    learning = dict(learning)
    recipe_name, epochs = learning.pop("recipe"), learning.pop("epochs")
    if resume:   # the recipe is the run's own: any other given is refused (tuned is the default, not given)
        return resumed_config(epochs, changed={**learning, "recipe": None if recipe_name == "tuned" else recipe_name},
                              **placement)
    return recipe(recipe_name, epochs=epochs, **learning, **placement), None


def resumed_config(epochs: int | None, out: str, changed: dict, **placement: Any) -> tuple[TrainConfig, dict]:
    """The config of the run saved in `out`, to continue it, and its checkpoint (read once: pass it on to
    train). Where it runs (device, compile, amp, data_dir) may change; so may --epochs, unless the step size
    follows a schedule planned for the saved number. What else was given (`changed`) is refused."""
    path = Path(out) / "fmnist.pt"
    if not path.is_file():
        raise FmnistError(f"--resume: no checkpoint in {out} to resume; train without --resume first")
    given = [name for name, value in changed.items() if value is not None]
    if given:
        raise FmnistError(f"--resume continues the recipe saved in {path}; leave out "
                          f"--{given[0].replace('_', '-')} (or train afresh in another --out)")
    checkpoint = load_checkpoint(path, resume=True)
    try:
        config = TrainConfig(**{**checkpoint["config"], **placement, "out": str(out)})
    except TypeError:
        raise FmnistError(f"{path} was written by another version of fmnist; train afresh") from None
    if epochs is not None and epochs != config.epochs:
        if config.schedule != "constant":
            done = len(checkpoint["metrics"])
            longer = replace(config, epochs=epochs)
            if done < config.epochs:
                raise FmnistError(f"--epochs {epochs}: this run's {config.schedule} schedule is planned for "
                                  f"{config.epochs} epochs; resume without --epochs to finish them, or train the "
                                  f"longer run afresh: {train_command(longer, f'{out}-{epochs}-epochs')}")
            raise FmnistError(f"--epochs {epochs}: this run's {config.schedule} schedule was planned for its "
                              f"{config.epochs} epochs and has run them all; for a longer run, train afresh: "
                              f"{train_command(longer, f'{out}-{epochs}-epochs')}")
        config = replace(config, epochs=epochs)
    return config, checkpoint



def _train(config: TrainConfig, device: torch.device, out: Path, report: Reporter, saved: dict | None,
           overwrite: bool) -> list[dict]:
    if saved is None and not overwrite and (out / "fmnist.pt").exists():
        raise FmnistError(f"{out} holds a run already ({out / 'fmnist.pt'}); continue it with --resume, train "
                          "into another --out, or replace it with --overwrite")
    torch.manual_seed(config.seed)
    train_x, train_y = data.to_tensors(data.load("train", config.data_dir), device)
    test_x, test_y = data.to_tensors(data.load("test", config.data_dir), device)

    amp_dtype = autocast_dtype(config.amp, device, report)
    state = TrainingState(config, device, steps_per_epoch=math.ceil(len(train_x) / config.batch_size),
                          amp_dtype=amp_dtype)
    history = []
    if saved is not None:
        try:
            state.load_state_dict(saved["training"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise FmnistError(f"{out / 'fmnist.pt'} cannot be resumed ({type(e).__name__}: {e}); "
                              "train afresh") from None
        history = saved["metrics"]
        if len(history) >= config.epochs:
            report.note(f"nothing to resume: the run in {out} has done {len(history)} of {config.epochs} epochs")
    n = len(train_x)
    run_epoch, compile_seconds = epoch_runner(state, config, train_x, train_y, amp_dtype, report,
                                              ahead=len(history) < config.epochs)

    # repeat for epochs
    for epoch in range(len(history) + 1, config.epochs + 1):
        state.model.train()
        report.epoch_start(epoch, config.epochs, n)
        start = time.perf_counter()
        total_loss, total_correct = run_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if not torch.isfinite(total_loss):
            raise FmnistError(diverged(config, epoch, history))
        test_loss, test_accuracy = evaluate(state.network(), test_x, test_y)
        history.append({
            "epoch": epoch,
            "train_loss": total_loss.item() / n,   # running mean over the epoch, augmented, label-smoothed
            "train_accuracy": total_correct.item() / n,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "train_seconds": seconds,
            "samples_per_second": n / seconds,
            "compile_seconds": compile_seconds,   # before this epoch, not in its train_seconds
        })
        compile_seconds = 0.0
        save_checkpoint(out / "fmnist.pt", state.network().state_dict(), state.state_dict(), config, history)
        write_metrics(out / "metrics.jsonl", history)
        report.epoch_end(history[-1])
    if history:
        plots.curves(history, out / "curves.png", config)
    return history


def epoch_runner(state: "TrainingState", config: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                 amp_dtype: torch.dtype | None, report: Reporter,
                 ahead: bool = True) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], float]:
    """How this run trains an epoch, and the seconds spent preparing it (compiling, capturing). On CUDA the
    epoch is one CUDA graph (EpochGraph), except under fp16, whose loss scale waits for the host each step;
    elsewhere step by step. `ahead`: prepare now (False when no epoch is left to run)."""
    device = images.device
    graphed = device.type == "cuda" and amp_dtype != torch.float16
    forward = compiled_network(state.model, device, in_graph=graphed) if config.compile else state.model
    start = time.perf_counter()
    if graphed and ahead:
        epoch_graph = EpochGraph(forward, state, config, len(images), amp_dtype)

        def run_graph() -> tuple[torch.Tensor, torch.Tensor]:
            result = epoch_graph.run(images, labels, state.order)
            report.step(len(images), epoch_graph.losses[-1])
            return result

        return run_graph, time.perf_counter() - start
    step = make_step(forward, state, config.label_smoothing, amp_dtype)
    seconds = compile_ahead(step, images, labels, config.batch_size) if config.compile and ahead else 0.0
    return (lambda: train_epoch(step, images, labels, config, state.order, report)), seconds


def diverged(config: TrainConfig, epoch: int, history: list[dict]) -> str:
    """What to say when the loss became infinite or NaN: a command that runs, and what was kept."""
    lower = replace(config, lr=float(f"{config.lr / 10:.3g}"))
    kept = (f"; {config.out}/fmnist.pt keeps epoch {history[-1]['epoch']}" if history else
            "; no epoch of this run ended, so it saved nothing")
    return (f"the loss became infinite or NaN in epoch {epoch}; train again with a lower --lr: "
            f"{train_command(lower, f'{config.out}-lr{lower.lr:g}')}{kept}")


# ---- evaluation ----------------------------------------------------------------------------------

def infer(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Logits (N, 10) for images (N, 1, 28, 28), in eval mode; batched to bound the memory of conv1's output."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy as a fraction) of the model on these images."""
    logits = infer(model, images)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(dim=1) == labels).float().mean().item()
