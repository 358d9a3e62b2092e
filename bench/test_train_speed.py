"""Training throughput: the tutorial's DataLoader loop (the baseline) against fmnist's loop.

Each timed round is STEPS training steps. Before a path is timed, its losses on the same batches from the
same weights are checked against plain eager torch, so a fast wrong path cannot win.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from bench.common import cuda_or_skip, new_network, record
from fmnist import data
from fmnist.graph import EpochGraph
from fmnist.loop import TrainingState, autocast_dtype, compiled_network, make_step, shuffled, train_epoch
from fmnist.train import recipe
from tests import tutorial

STEPS = 30          # training steps per timed round
ROUNDS = 5          # timed rounds, after one warm-up round
BATCH_SIZES = [100, 1000]


def reference_losses(images, labels, batch_size, steps=3):
    """Losses of plain eager torch (the tutorial's arithmetic) over the first `steps` batches."""
    model = new_network(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for i in range(steps):
        loss = F.cross_entropy(model(images[i * batch_size:(i + 1) * batch_size]),
                               labels[i * batch_size:(i + 1) * batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.benchmark(group="train")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_tutorial_dataloader_loop(benchmark, torchvision_root, batch_size):
    """The tutorial's own way: its Network class, torchvision dataset with ToTensor, DataLoader(shuffle=True), Adam."""
    import torchvision
    from torch.utils.data import DataLoader

    train_set = torchvision.datasets.FashionMNIST(root=str(torchvision_root), train=True, download=False,
                                                  transform=torchvision.transforms.ToTensor())
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    network = tutorial.Network()                          # the tutorial's class: ReLU before each max-pool
    network.load_state_dict(new_network().state_dict())   # the initial weights of every other path
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)

    def run_round():
        total_loss = total_correct = 0
        for _, (images, labels) in zip(range(STEPS), loader, strict=False):   # the loader's first STEPS batches
            preds = network(images)
            loss = F.cross_entropy(preds, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()                                  # the tutorial's bookkeeping,
            total_correct += preds.argmax(dim=1).eq(labels).sum().item()  # a host sync per step
        return total_loss

    benchmark.pedantic(run_round, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, path="tutorial DataLoader loop", samples=STEPS * batch_size, batch_size=batch_size,
           device="cpu")


PATHS = [  # (path name, device, compile, autocast)
    ("fmnist loop, eager", "cpu", False, False),
    ("fmnist loop, compiled", "cpu", True, False),
    ("fmnist loop, eager", "cuda", False, False),
    ("fmnist loop, compiled", "cuda", True, False),
    ("fmnist loop, AMP", "cuda", False, True),
]


@pytest.mark.benchmark(group="train")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("path, device, compiled, amp", PATHS, ids=[f"{p[0]}-{p[1]}" for p in PATHS])
def test_fmnist_loop(benchmark, train_split, path, device, compiled, amp, batch_size):
    """fmnist's loop as `fmnist train --recipe seed` runs it: the tutorial's arithmetic, fmnist's way."""
    cuda_or_skip(device)
    images, labels = data.to_tensors(train_split, device)
    images, labels = images[:STEPS * batch_size], labels[:STEPS * batch_size]   # one round = one epoch of these
    config = recipe("seed", batch_size=batch_size, device=device, compile=compiled, amp=amp)
    amp_dtype = autocast_dtype(amp, torch.device(device))
    torch.manual_seed(0)      # the same initial weights as reference_losses'
    state = TrainingState(config, torch.device(device), steps_per_epoch=STEPS, amp_dtype=amp_dtype)
    forward = compiled_network(state.model, torch.device(device)) if compiled else state.model
    step = make_step(forward, state, amp_dtype=amp_dtype)
    check_and_time(benchmark, step, images, labels, config, state, path=path, tolerance=tolerance(device, amp))


def tolerance(device: str, amp: bool = False) -> float:
    """How close a path's first losses must be to the eager reference's (relative). Autocast computes in 16
    bits. On CUDA, cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa, Ampere and later) and
    picks its algorithms per call, so the reference and the path differ by more than float32's rounding."""
    if amp:
        return 2e-2
    return 5e-3 if device == "cuda" else 1e-4


def check_and_time(benchmark, step, images, labels, config, state, *, path: str, tolerance: float = 1e-4,
                   **extra) -> None:
    """Check that `step`'s losses on the first three batches, in order, match plain eager torch from the same
    weights; then time rounds of fmnist's train_epoch over `images` with it and record them."""
    batch_size = config.batch_size
    start = time.perf_counter()
    losses = [step(images[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size])[0].item()
              for i in range(3)]
    first_steps_seconds = time.perf_counter() - start     # includes torch.compile's one-off compilation
    assert losses == pytest.approx(reference_losses(images, labels, batch_size), rel=tolerance)

    def run_round():
        total_loss, _ = train_epoch(step, images, labels, config, state.order)
        return total_loss.item()   # one sync per round, as fmnist syncs once per epoch

    benchmark.pedantic(run_round, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, path=path, samples=len(images), batch_size=batch_size, device=config.device,
           first_steps_seconds=first_steps_seconds, **extra)


GRAPH_PATHS = [  # (path name, compile, autocast): what `fmnist train --device cuda` runs, with its options
    ("epoch graph, eager kernels", False, False),
    ("epoch graph, compiled kernels", True, False),
    ("epoch graph, AMP", False, True),
]


@pytest.mark.benchmark(group="train")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("path, compiled, amp", GRAPH_PATHS, ids=[p[0] for p in GRAPH_PATHS])
def test_epoch_graph(benchmark, train_split, path, compiled, amp, batch_size):
    """The whole epoch as one CUDA graph (fmnist.train.EpochGraph), as `fmnist train` runs on CUDA: each
    round is one epoch of all 60,000 images, one replay and one wait."""
    cuda_or_skip("cuda")
    device = torch.device("cuda")
    images, labels = data.to_tensors(train_split, "cuda")
    config = recipe("seed", batch_size=batch_size, device="cuda", compile=compiled, amp=amp)
    amp_dtype = autocast_dtype(amp, device)
    torch.manual_seed(0)      # the same initial weights as reference_losses'
    state = TrainingState(config, device, steps_per_epoch=len(images) // batch_size, amp_dtype=amp_dtype)
    forward = compiled_network(state.model, device, in_graph=True) if compiled else state.model
    start = time.perf_counter()
    epoch_graph = EpochGraph(forward, state, config, len(images), amp_dtype)
    capture_seconds = time.perf_counter() - start         # warm-up steps, compilation, capture
    # The first epoch's first losses against plain eager torch on the same shuffled batches.
    order = torch.Generator(device="cuda")
    order.set_state(state.order.get_state())
    shuffled_images, shuffled_labels = shuffled(images, labels, config, order)
    epoch_graph.run(images, labels, state.order)
    assert epoch_graph.losses[:3].tolist() == pytest.approx(
        reference_losses(shuffled_images, shuffled_labels, batch_size), rel=tolerance("cuda", amp))

    def run_round():
        total_loss, _ = epoch_graph.run(images, labels, state.order)
        return total_loss.item()   # the epoch's one wait

    benchmark.pedantic(run_round, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, path=path, samples=len(images), batch_size=batch_size, device="cuda",
           capture_seconds=capture_seconds)


@pytest.mark.benchmark(group="train")
def test_kernels_alone(benchmark, train_split):
    """A bound, not a loop: only the Network's two convolutions, forward and backward, at batch 100 in the
    layout fmnist trains in. Every training step computes at least these, so no loop built on these torch
    CPU kernels can be faster than the row: its ratio is the most any such loop could reach here.
    (A second row that added the max-pools was dropped: chained as it was, it once measured slower than the
    full loop it was meant to bound, so it bounded nothing.)"""
    images, _ = data.to_tensors(train_split, "cpu")
    images = images[:STEPS * 100]
    model = new_network().to(memory_format=torch.channels_last)
    stand_in = torch.rand(100, 6, 12, 12).to(memory_format=torch.channels_last).requires_grad_()

    def kernels(batch):
        return [model.conv1(batch), model.conv2(stand_in)]   # conv2's input needs its gradient, as in training

    grads = [torch.ones_like(output) for output in kernels(images[:100])]

    def run_round():
        for batch in images.split(100):
            outputs = kernels(batch)
            model.zero_grad(set_to_none=True)
            stand_in.grad = None
            torch.autograd.backward(outputs, grads)   # conv1: weight gradients only; conv2: weight and input's
        return model.conv1.weight.grad.abs().sum().item()

    assert run_round() > 0
    benchmark.pedantic(run_round, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, path="convolutions alone (a bound)",
           samples=STEPS * 100, batch_size=100, device="cpu")
