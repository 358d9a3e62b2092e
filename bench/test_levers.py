"""What each CPU lever of fmnist's loop is worth, at batch 100, added one at a time to a plain loop.

The plain loop already keeps the data resident and takes batches by indexing (no DataLoader), with no host
sync per step; each row adds one lever to the row before it. fmnist's loop is the last row but one.
"""

import pytest
import torch
import torch.nn.functional as F

from bench.common import new_network, record
from bench.test_train_speed import reference_losses
from fmnist import data
from tests import tutorial

STEPS, BATCH = 30, 100

LEVERS = [  # (name, ReLU after pool, channels_last, fused Adam, torch.compile)
    ("plain loop", False, False, False, False),
    ("+ channels_last", False, True, False, False),
    ("+ ReLU after max-pool", True, True, False, False),   # after channels_last: alone, it gained nothing here
    ("+ fused Adam", True, True, True, False),
    ("+ torch.compile", True, True, True, True),
]


@pytest.mark.benchmark(group="levers")
@pytest.mark.parametrize("name, pool_first, channels_last, fused, compiled", LEVERS, ids=[lever[0] for lever in LEVERS])
def test_lever(benchmark, train_split, name, pool_first, channels_last, fused, compiled):
    images, labels = data.to_tensors(train_split, "cpu")
    images, labels = images[:STEPS * BATCH], labels[:STEPS * BATCH]
    model = new_network()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Network's forward pools first; the tutorial's forward (same layer names) takes the ReLU first
    forward = model if pool_first else (lambda t: tutorial.Network.forward(model, t))
    forward = torch.compile(forward) if compiled else forward
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused or None)

    def run_round():
        total = torch.zeros(())
        for index in torch.randperm(len(images)).split(BATCH):
            loss = F.cross_entropy(forward(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        return total.item()

    # Before timing: the first three steps' losses match plain eager torch's from the same weights (a lever
    # changes the speed, not the arithmetic); where it compiles, this compiles.
    losses = []
    for i in range(3):
        loss = F.cross_entropy(forward(images[i * BATCH:(i + 1) * BATCH]), labels[i * BATCH:(i + 1) * BATCH])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses == pytest.approx(reference_losses(images, labels, BATCH), rel=1e-4)
    benchmark.pedantic(run_round, rounds=5, warmup_rounds=1)
    record(benchmark, path=name, samples=STEPS * BATCH, batch_size=BATCH, device="cpu",
           order=[lever[0] for lever in LEVERS].index(name))   # the table lists levers in the order added
