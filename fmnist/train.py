"""The training loop: its state, its step, its epochs, and evaluation."""

import math
import time
import warnings
from collections.abc import Callable, Iterator
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

    def update_weights(self) -> None:
        """Adam's step with the gradients (unscaled first under fp16), then the step size's schedule and the
        moving average: the step's "update weights"."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler:
            self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.model)

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


def shuffled(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
             order: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's images in a random order, augmented, and their labels, all at once: on a GPU, a few kernels
    for the whole epoch, whose batches are then slices of these."""
    permutation = torch.randperm(len(images), device=images.device, generator=order)
    return data.augment(images[permutation], config.flip, config.shift, order), labels[permutation]


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                  order: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches, in a random order, augmented, on the images' device. On a GPU, slices of
    `shuffled`; on the CPU, each augmented as it is taken, where it stays in the cache (the whole epoch at
    once is slower there: bench/README.md, "GPU")."""
    size = config.batch_size
    if images.device.type != "cpu":
        epoch_images, epoch_labels = shuffled(images, labels, config, order)
        for i in range(0, len(images), size):
            yield epoch_images[i:i + size], epoch_labels[i:i + size]
        return
    permutation = torch.randperm(len(images), generator=order)
    for i in range(0, len(images), size):
        index = permutation[i:i + size]
        yield data.augment(images[index], config.flip, config.shift, order), labels[index]


def train_epoch(step: Step, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, order: torch.Generator,
                report: Reporter = SILENT) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over all `images` in a random order. Returns the summed loss and the number of correct
    predictions, both still on the device: nothing here waits for the device until the caller reads them."""
    total_loss = torch.zeros((), device=images.device)
    total_correct = torch.zeros((), device=images.device, dtype=torch.long)
    done = 0

    # repeat for the epoch
    # get batch: indexing and augmenting on the device (no DataLoader)
    for batch, batch_labels in epoch_batches(images, labels, config, order):
        loss, correct = step(batch, batch_labels)

        total_loss += loss * len(batch)
        total_correct += correct
        done += len(batch)
        report.step(done, loss)
    return total_loss, total_correct


def make_step(forward: Callable[[torch.Tensor], torch.Tensor], state: TrainingState, label_smoothing: float = 0.0,
              amp_dtype: torch.dtype | None = None, update_weights: Callable[[], None] | None = None) -> Step:
    """The training step on one batch: pass batch, calculate loss, calculate gradients, update weights.

    `forward` is state.model (or its compiled form, see `compiled_network`). amp_dtype: None trains in float32;
    bfloat16 or float16 runs the forward pass under CUDA autocast, float16 with a GradScaler against underflow.
    update_weights: what "update weights" does once the gradients are made, state.update_weights unless given
    (EpochGraph gives its own). step(images, labels, update=False) stops after the gradients and clears them:
    the weights stay as they were.
    """
    scaler = state.scaler
    update_weights = update_weights or state.update_weights

    def step(images: torch.Tensor, labels: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # pass batch (autocast's cache of cast weights off: a CUDA graph cannot keep it, and each weight is cast
        # once a pass anyway)
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                            cache_enabled=False):
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
        update_weights()
        return loss.detach(), (preds.argmax(dim=1) == labels).sum()

    return step


class EpochGraph:
    """The training steps of a whole epoch captured once as one CUDA graph, and then one replay an epoch.

    At batch 100 a step of this Network is a few dozen small kernels, and launching them one by one from Python
    takes longer than the GPU takes to run them. Here make_step's own step is captured once for every batch of
    an epoch, in order, reading its batch from a slice of one static buffer. Each epoch is then: shuffle and
    augment the images into that buffer, write the step sizes the schedule will take into a table on the
    device, replay, and wait once, when the epoch's loss is read. What changes from step to step is read from
    device tensors inside the graph: the batch, Adam's step size and, under onecycle, Adam's first beta.

    run() returns what train_epoch returns. `losses` holds each step's loss of the latest epoch.
    capture=False runs the same steps eagerly each epoch: that is how the tests check this class on a CPU.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], state: TrainingState, config: TrainConfig,
                 images: int, amp_dtype: torch.dtype | None = None, capture: bool = True):
        if state.scaler.is_enabled():
            raise ValueError("EpochGraph: fp16's loss scale waits for the host at each step; train step by step")
        device = next(state.model.parameters()).device
        self.state, self.config, self.count = state, config, images
        self.steps = math.ceil(images / config.batch_size)
        self.images = torch.zeros(images, 1, 28, 28, device=device)   # the epoch's batches, where the graph reads
        self.labels = torch.zeros(images, dtype=torch.long, device=device)
        self.losses = torch.zeros(self.steps, device=device)
        # (step size, Adam's first beta) before each step and after the last, written before each epoch
        self.schedule = torch.zeros(self.steps + 1, 2, device=device)
        self.lr, self.beta1 = torch.zeros((), device=device), torch.zeros((), device=device)
        self.first_share = torch.ones((), device=device)   # the average's share of the epoch's first step
        # onecycle moves Adam's first beta with the step size, which torch's Adam cannot read from the device
        self.moving_beta1 = bool(getattr(state.scheduler, "use_beta1", False))
        start_adam_state(state.optimizer)
        self.step = make_step(forward, state, config.label_smoothing, amp_dtype, update_weights=self._update)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.index = 0
        if capture:
            self._capture()

    def run(self, images: torch.Tensor, labels: torch.Tensor,
            order: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch over `images` in the order `order` draws: the summed loss and the number of correct
        predictions, both still on the device."""
        state = self.state
        if self.images.is_cuda:   # the same draws as train_epoch's, into the graph's buffer
            epoch_images, epoch_labels = shuffled(images, labels, self.config, order)
            self.images.copy_(epoch_images)
            self.labels.copy_(epoch_labels)
        else:
            for i, (batch, batch_labels) in zip(range(0, self.count, self.config.batch_size),
                                                epoch_batches(images, labels, self.config, order), strict=True):
                self.images[i:i + len(batch)] = batch
                self.labels[i:i + len(batch)] = batch_labels
        self._write_schedule()
        if state.ema:   # a run's very first update copies the weights (MovingAverage's rule)
            self.first_share.fill_(1.0 if state.ema.updates == 0 else 1 - state.ema.decay)
        if self.graph is not None:
            self.graph.replay()
            total_loss, total_correct = self.outputs
        else:
            total_loss, total_correct = self._steps()
        if state.ema:
            state.ema.updates += self.steps
            state.ema.n_averaged.fill_(state.ema.updates)
        return total_loss.clone(), total_correct.clone()   # the next replay writes over the graph's own

    def _steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's steps over the static buffer, as captured (or run, without a graph)."""
        total_loss = torch.zeros((), device=self.images.device)
        total_correct = torch.zeros((), device=self.images.device, dtype=torch.long)
        # repeat for the epoch
        size = self.config.batch_size
        for index, i in enumerate(range(0, self.count, size)):
            self.index = index   # which step _update is in, to read its row of the schedule
            # get batch: a slice of the static buffer
            batch, batch_labels = self.images[i:i + size], self.labels[i:i + size]
            loss, correct = self.step(batch, batch_labels)
            self.losses[self.index] = loss
            total_loss += loss * len(batch)
            total_correct += correct
        return total_loss, total_correct

    def _update(self) -> None:
        """TrainingState.update_weights, with the step size (and first beta) read from the device: Adam's step,
        then the next step's values from the table, then the moving average."""
        optimizer, ema = self.state.optimizer, self.state.ema
        if self.moving_beta1:
            adam_step(optimizer, self.lr, self.beta1)
        else:   # torch's fused Adam, told to read its step size from self.lr for this call
            group = optimizer.param_groups[0]
            kept = group["lr"], group["capturable"]
            group["lr"], group["capturable"] = self.lr, True
            try:
                optimizer.step()
            finally:
                group["lr"], group["capturable"] = kept
        self.lr.copy_(self.schedule[self.index + 1, 0])
        self.beta1.copy_(self.schedule[self.index + 1, 1])
        if ema:
            averaged: list[torch.Tensor] = list(ema.module.parameters())
            current: list[torch.Tensor] = list(self.state.model.parameters())
            with torch.no_grad():
                if self.index == 0:   # its share from the device: 1, a copy, at a run's very first step
                    differences = list(torch._foreach_sub(current, averaged))
                    torch._foreach_mul_(differences, self.first_share)
                    torch._foreach_add_(averaged, differences)
                else:
                    torch._foreach_lerp_(averaged, current, 1 - ema.decay)
                for kept_buffer, buffer in zip(ema.module.buffers(), self.state.model.buffers(), strict=True):
                    kept_buffer.copy_(buffer)

    def _write_schedule(self) -> None:
        """The schedule's values for this epoch's steps, into self.schedule; the scheduler is stepped through
        the epoch here, on the host, so that it is where an eager epoch would leave it."""
        group, scheduler = self.state.optimizer.param_groups[0], self.state.scheduler
        values = []
        with warnings.catch_warnings():   # that Adam has not stepped: it steps inside the graph, unseen
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            for k in range(self.steps + 1):
                values.append((group["lr"], group["betas"][0]))
                if scheduler and k < self.steps:
                    scheduler.step()
        table = torch.tensor(values, dtype=torch.float32)
        if self.schedule.is_cuda:
            table = table.pin_memory()   # so that the copy does not wait for the GPU
        self.schedule.copy_(table, non_blocking=True)
        self.lr.copy_(self.schedule[0, 0])
        self.beta1.copy_(self.schedule[0, 1])

    def _capture(self) -> None:
        """Warm up (torch.compile compiles, cuDNN and cuBLAS choose their kernels) on a side stream, as capture
        needs, with steps that leave the weights alone; then capture the epoch."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        sizes = sorted({self.config.batch_size, self.count % self.config.batch_size} - {0})
        with torch.cuda.stream(side):
            for size in sizes:
                for _ in range(3):
                    self.step(self.images[:size], self.labels[:size], update=False)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._steps()


def start_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Make Adam's state for each parameter that has none, as torch's fused Adam makes it at its first step:
    a step captured in a CUDA graph must not make it, or every replay would start it afresh."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                          exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                          exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))


def adam_step(optimizer: torch.optim.Optimizer, lr: torch.Tensor, beta1: torch.Tensor) -> None:
    """Adam's update as torch's fused kernel computes it, with the step size and the first beta read from
    device tensors. torch's eager Adam reads a tensor beta with a host sync, which a CUDA graph cannot capture
    (it takes one without a sync only when torch.compile'd: pytorch pull request 134166)."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    params: list[torch.Tensor] = list(group["params"])
    states = [optimizer.state[p] for p in params]
    grads = [cast(torch.Tensor, p.grad) for p in params]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    with torch.no_grad():
        torch._foreach_add_([s["step"] for s in states], 1)
        step = states[0]["step"]   # every parameter has taken the same steps
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, list(torch._foreach_mul(grads, 1 - beta1)))
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denominators = list(torch._foreach_sqrt(exp_avg_sqs))
        torch._foreach_div_(denominators, torch.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denominators, eps)
        torch._foreach_mul_(denominators, (1 - beta1 ** step) / lr)   # over the step size, lr / (1 - beta1^t)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-1.0)


def compiled_network(model: Network, device: torch.device,
                     in_graph: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Network through torch.compile, for fixed shapes (dynamic=False: compiled once per batch size, and an
    epoch has at most two). On CUDA outside an EpochGraph, with mode "reduce-overhead": each pass is replayed
    as a CUDA graph of its own; inside one (`in_graph`), the default mode, since the epoch's graph holds it.
    """
    import logging

    # On a machine without CUDA, torch.compile warns that it found no CUDA toolkit: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    mode = "reduce-overhead" if device.type == "cuda" and not in_graph else None
    return torch.compile(model, mode=mode, dynamic=False)


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
