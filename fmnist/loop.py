"""The training loop: its state, its step, and its epochs, step by step. The run around it (resume,
checkpoints, evaluation) is fmnist.train's; the epoch captured as one CUDA graph, fmnist.graph's."""

import time
from collections.abc import Callable, Iterator
from typing import Protocol, cast

import torch
import torch.nn.functional as F

from fmnist import FmnistError, data
from fmnist.config import TrainConfig
from fmnist.model import Network


class Reporter(Protocol):
    """Where the library tells about its progress: any object with these methods. Silent, the default, says
    nothing; the CLI's draws bars and lines; a sweep's trial tells Optuna. A Protocol, not a base class: the
    CLI's lives in fmnist/cli/console.py, which cannot import this module (and so torch) when it is imported."""

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
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True,
                                          weight_decay=config.weight_decay, decoupled_weight_decay=True)
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
