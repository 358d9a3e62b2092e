"""The training epoch as one CUDA graph: every step of an epoch captured once, then one replay an epoch."""

import math
import warnings
from collections.abc import Callable
from typing import cast

import torch

from fmnist.config import TrainConfig
from fmnist.loop import TrainingState, epoch_batches, make_step, shuffled


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
    beta2, eps, decay = group["betas"][1], group["eps"], group["weight_decay"]
    params: list[torch.Tensor] = list(group["params"])
    states = [optimizer.state[p] for p in params]
    grads = [cast(torch.Tensor, p.grad) for p in params]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    with torch.no_grad():
        if decay and group.get("decoupled_weight_decay"):   # AdamW: the weights shrink first, by the step size
            torch._foreach_mul_(params, 1 - lr * decay)
        elif decay:                                         # Adam's L2 penalty: its gradient is added
            grads = list(torch._foreach_add(grads, params, alpha=decay))
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
