"""The training loop: its state, its step, its epochs, and evaluation."""

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F

from fmnist import FmnistError, data, plots
from fmnist.checkpoint import load_checkpoint, save_checkpoint, write_metrics
from fmnist.config import TrainConfig, check, recipe, train_command  # noqa: F401  (recipe: the library's, with train)
from fmnist.files import hold, prepare_out
from fmnist.model import Network


class Reporter(Protocol):
    """Where the library tells about its progress: any object with these methods. Silent, the default, says
    nothing; the CLI's draws bars and lines; a sweep's trial tells Optuna. A Protocol, not a base class: the
    CLI's lives in cli.py, which cannot import this module (and so torch) when it is imported."""

    def note(self, message: str) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None: ...

    def step(self, samples_done: int, loss: torch.Tensor) -> None:
        """`loss` is still on the device: reading it syncs, so a reporter reads it only when it draws."""

    def epoch_end(self, row: dict) -> None: ...


class Silent:
    """The Reporter that says nothing; subclass it to hear only some of what a run tells."""

    def note(self, message: str) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None: ...

    def step(self, samples_done: int, loss: torch.Tensor) -> None: ...

    def epoch_end(self, row: dict) -> None: ...


SILENT = Silent()   # the default reporter: it holds no state, so one is shared by every call

# make_step's step(images, labels, update=True) -> (loss, number correct), both still on the device
Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]


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
    forward = compiled_network(state.model, device) if config.compile else state.model
    step = make_step(forward, state, config.label_smoothing, amp_dtype)
    n = len(train_x)
    compile_seconds = 0.0
    if config.compile and len(history) < config.epochs:
        compile_seconds = compile_ahead(step, train_x, train_y, config.batch_size)

    # repeat for epochs
    for epoch in range(len(history) + 1, config.epochs + 1):
        state.model.train()
        report.epoch_start(epoch, config.epochs, n)
        start = time.perf_counter()
        total_loss, total_correct = train_epoch(step, train_x, train_y, config, state.order, report)
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


def diverged(config: TrainConfig, epoch: int, history: list[dict]) -> str:
    """What to say when the loss became infinite or NaN: a command that runs, and what was kept."""
    lower = replace(config, lr=float(f"{config.lr / 10:.3g}"))
    kept = (f"; {config.out}/fmnist.pt keeps epoch {history[-1]['epoch']}" if history else
            "; no epoch of this run ended, so it saved nothing")
    return (f"the loss became infinite or NaN in epoch {epoch}; train again with a lower --lr: "
            f"{train_command(lower, f'{config.out}-lr{lower.lr:g}')}{kept}")


class TrainingState:
    """Everything a training run changes as it goes: weights, Adam's moments, the step size schedule, the
    moving average of the weights, the random generator of batches and augmentation, and fp16's loss scale.
    Saved whole after every epoch, so that a resumed run ends exactly where an uninterrupted one would."""

    def __init__(self, config: TrainConfig, device: torch.device, steps_per_epoch: int,
                 amp_dtype: torch.dtype | None = None):
        # channels_last: mkldnn's convolutions run faster in it on the CPU; the arithmetic is unchanged.
        # fused: one kernel for all the parameters' Adam updates. What each is worth, measured:
        # `pytest bench/test_levers.py --benchmark-only` (figures in bench/README.md). The ignore: torch's stubs
        # have no overload of Module.to for a device and a memory format together, which Module.to takes.
        self.model: Network = Network().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True)
        total_steps = config.epochs * steps_per_epoch     # the schedules are stepped once per batch
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if config.schedule == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, config.lr, total_steps)
        elif config.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps)
        self.ema = MovingAverage(self.model, config.ema) if config.ema else None
        self.order = torch.Generator(device=device).manual_seed(config.seed)
        # fp16 autocast only: a loss scale against underflowing gradients, which grows as steps go well.
        # fmnist takes fp16 on CUDA alone; the CPU's scaler is there for tests/test_cuda.py to run this path.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def network(self) -> Network:
        """The Network to evaluate and to save: the moving average of the weights when there is one."""
        return cast(Network, self.ema.module) if self.ema else self.model   # the average of self.model

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "order": self.order.get_state(),
            "device": self.order.device.type,   # a generator's state fits only its own kind of device
            "scaler": self.scaler.state_dict(),  # {} unless fp16
        }

    def load_state_dict(self, state: dict) -> None:
        if state["device"] != self.order.device.type:
            raise FmnistError(f"this run was trained on {state['device']}: resume it with --device {state['device']}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.order.set_state(state["order"])
        if self.scaler.is_enabled() and state.get("scaler"):   # older checkpoints and non-fp16 runs have none
            self.scaler.load_state_dict(state["scaler"])


class MovingAverage(torch.optim.swa_utils.AveragedModel):
    """The exponential moving average of a model's weights, as torch's AveragedModel computes it with
    get_ema_multi_avg_fn(decay): the first update copies the weights, each later one moves the average
    1 - decay of the way towards them. Its state_dict is AveragedModel's too (n_averaged, module.*), so a
    checkpoint of either resumes into the other. Only the update is its own: AveragedModel's copies its count
    (n_averaged, a CPU tensor) to the GPU at every update, and that copy waits for the GPU, a host sync per
    step. Here the count is a Python int; n_averaged stays on the CPU as its copy for the checkpoint."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model)   # self.module: a deep copy of model, whose weights become the average
        self.decay = decay
        self.updates = 0

    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged: list[torch.Tensor] = list(self.module.parameters())
        current: list[torch.Tensor] = list(model.parameters())
        with torch.no_grad():
            if self.updates == 0:
                torch._foreach_copy_(averaged, current)
            else:
                torch._foreach_lerp_(averaged, current, 1 - self.decay)   # get_ema_multi_avg_fn's own op
            for kept, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
                kept.copy_(buffer)   # buffers are not averaged: they follow the model, as in AveragedModel
        self.updates += 1
        self.n_averaged.fill_(self.updates)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        loaded = super().load_state_dict(state_dict, strict, assign)
        self.updates = int(self.n_averaged)
        return loaded


def train_epoch(step: Step, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, order: torch.Generator,
                report: Reporter = SILENT) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over all `images` in a random order. Returns the summed loss and the number of correct
    predictions, both still on the device: nothing here waits for the device until the caller reads them."""
    n = len(images)
    permutation = torch.randperm(n, device=images.device, generator=order)
    total_loss = torch.zeros((), device=images.device)
    total_correct = torch.zeros((), device=images.device, dtype=torch.long)

    # repeat for the epoch
    for i in range(0, n, config.batch_size):
        # get batch: one indexing operation on the device, no DataLoader; augmented there too
        index = permutation[i:i + config.batch_size]
        batch = data.augment(images[index], config.flip, config.shift, order)
        loss, correct = step(batch, labels[index])

        total_loss += loss * len(index)
        total_correct += correct
        report.step(i + len(index), loss)
    return total_loss, total_correct


def make_step(forward: Callable[[torch.Tensor], torch.Tensor], state: TrainingState, label_smoothing: float = 0.0,
              amp_dtype: torch.dtype | None = None) -> Step:
    """The training step on one batch: pass batch, calculate loss, calculate gradients, update weights.

    `forward` is state.model (or its compiled form, see `compiled_network`). amp_dtype: None trains in float32;
    bfloat16 or float16 runs the forward pass under CUDA autocast, float16 with a GradScaler against underflow.
    step(images, labels, update=False) stops after the gradients and clears them: the weights stay as they were.
    """
    scaler = state.scaler

    def step(images: torch.Tensor, labels: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # pass batch
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            preds = forward(images)
            # calculate loss
            loss = F.cross_entropy(preds, labels, label_smoothing=label_smoothing)

        # calculate gradients
        state.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if not update:
            state.optimizer.zero_grad(set_to_none=True)
            return loss.detach(), (preds.argmax(dim=1) == labels).sum()

        # update weights
        scaler.step(state.optimizer)
        scaler.update()
        if state.scheduler:
            state.scheduler.step()
        if state.ema:
            state.ema.update_parameters(state.model)
        return loss.detach(), (preds.argmax(dim=1) == labels).sum()

    return step


def compiled_network(model: Network, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Network through torch.compile. On CUDA with mode "reduce-overhead": each pass is replayed as a CUDA
    graph, one launch instead of dozens of small kernels' launches, which at batch 100 are expected to cost a
    GPU more than the arithmetic (not measured yet: bench/README.md). dynamic=False: code for fixed shapes,
    compiled once per batch size (an epoch has at most two).
    """
    import logging

    # On a machine without CUDA, torch.compile warns that it found no CUDA toolkit: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def compile_ahead(step: Step, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Compile now, for each batch size an epoch uses, what torch.compile would otherwise compile inside the
    first epoch, so that the epochs' times are the training's alone. Runs the forward and backward passes
    without updating the weights (twice: CUDA graphs are recorded on the second run). Returns the seconds."""
    start = time.perf_counter()
    for size in sorted({batch_size, len(images) % batch_size} - {0}):
        for _ in range(2):
            loss, _ = step(images[:size], labels[:size], update=False)
    loss.item()   # waits for the device
    return time.perf_counter() - start


def autocast_dtype(amp: bool, device: torch.device, report: Reporter = SILENT) -> torch.dtype | None:
    """The autocast dtype, or None for float32 throughout. bf16 only where the GPU computes it (Ampere and
    later): is_bf16_supported() alone also says yes where bf16 is merely emulated, slowly, and then the fp16
    path with its loss scaling, the one made for those cards, would never run."""
    if not amp:
        return None
    if device.type != "cuda":
        report.note("--amp is CUDA autocast: this run is on the CPU, so it trains in float32 as without --amp")
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


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
