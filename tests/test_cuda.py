"""The CUDA paths. Each test that needs a GPU takes the `device` fixture and runs twice: on the CPU
everywhere, with only what is CUDA's own left unchecked there, and on CUDA where there is one (in
bench/gpu.sh on a GPU machine; skipped elsewhere). So an import or a signature that breaks fails on the CPU
too, instead of hiding behind the skip."""

import os
import subprocess
import sys

import pytest
import torch

from fmnist import data
from fmnist.graph import EpochGraph
from fmnist.loop import TrainingState, autocast_dtype, make_step, train_epoch
from fmnist.train import recipe, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request) -> str:
    return request.param


def test_amp_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    # A card before Ampere: torch says bf16 is supported when emulation counts, not otherwise.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(True, torch.device("cuda")) == torch.float16          # fp16 with its loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # Ampere on
    assert autocast_dtype(True, torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype(False, torch.device("cuda")) is None and autocast_dtype(True, torch.device("cpu")) is None


def test_amp_on_this_device_follows_its_compute_capability(device):
    expected = None    # the CPU: --amp trains in float32
    if device == "cuda":
        expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert autocast_dtype(True, torch.device(device)) == expected


def test_compiled_benchmark_rows_cannot_fall_back_to_eager():
    from bench.common import strict_dynamo

    compiled = torch.compile(lambda x: x * 2 + 1, dynamic=False)
    with strict_dynamo(), torch._dynamo.config.patch(recompile_limit=2, cache_size_limit=2):
        compiled(torch.ones(1))
        compiled(torch.ones(2))
        with pytest.raises(Exception, match="(?i)limit"):
            compiled(torch.ones(3))        # a third shape: past the limit, an error instead of eager


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


def test_a_checkpoint_holds_cpu_tensors_and_resumes_on_its_device(tmp_path, real_data, device, monkeypatch):
    load = data.load

    def first_images(*args, **kwargs):   # a short run: the checkpoint is the subject, not the accuracy
        split = load(*args, **kwargs)
        return data.Split(split.images[:6000], split.labels[:6000])

    monkeypatch.setattr(data, "load", first_images)
    config = recipe("seed", epochs=2, batch_size=1000, ema=0.9, device=device, out=str(tmp_path))
    train(recipe("seed", epochs=1, batch_size=1000, ema=0.9, device=device, out=str(tmp_path)))
    checkpoint = torch.load(tmp_path / "fmnist.pt", weights_only=True)   # the README's snippet, as it is
    assert {t.device.type for t in tensors(checkpoint)} == {"cpu"}
    history = train(config, resume=True)                                 # constant schedule: may grow
    assert [row["epoch"] for row in history] == [1, 2]
    # A CPU-only process reads it with the README's snippet, and evaluates it.
    code = ("import torch; from fmnist.checkpoint import load_network; assert not torch.cuda.is_available(); "
            f"torch.load({str(tmp_path / 'fmnist.pt')!r}, weights_only=True); "
            f"load_network({str(tmp_path / 'fmnist.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def few_batches(device: str, n: int = 5):
    torch.manual_seed(0)
    images, labels = torch.rand(n * 100, 1, 28, 28, device=device), torch.randint(0, 10, (n * 100,), device=device)
    return list(zip(images.split(100), labels.split(100), strict=True))


def test_fp16_loss_scale_is_saved_and_restored(device):
    # fmnist takes fp16 on CUDA only (autocast_dtype); here it is asked for on the CPU too, where torch
    # has the same autocast and GradScaler, so that this path runs on a machine without a GPU.
    config = recipe("seed", device=device, amp=True)
    state = TrainingState(config, torch.device(device), steps_per_epoch=5, amp_dtype=torch.float16)
    assert state.scaler.is_enabled()
    step = make_step(state.model, state, amp_dtype=torch.float16)
    for images, labels in few_batches(device):
        step(images, labels)
    saved = state.state_dict()
    assert saved["scaler"]["_growth_tracker"] == 5        # five good steps counted towards growing the scale
    resumed = TrainingState(config, torch.device(device), steps_per_epoch=5, amp_dtype=torch.float16)
    resumed.load_state_dict(saved)
    assert resumed.scaler.state_dict() == saved["scaler"]


def test_a_training_step_with_ema_never_waits_for_the_gpu(device):
    # The whole step, the moving average's update included, is queued without the host waiting for the
    # device: CUDA's sync debug mode makes any wait an error (on the CPU there is nothing to wait for).
    config = recipe("seed", device=device, ema=0.9)
    state = TrainingState(config, torch.device(device), steps_per_epoch=5)
    step = make_step(state.model, state)
    batches = few_batches(device)
    step(*batches[0])   # the first step creates Adam's state and copies the weights into the average
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for images, labels in batches[1:]:
            step(images, labels)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert state.ema.updates == 5 and state.ema.state_dict()["n_averaged"].item() == 5


@pytest.fixture(scope="module")
def training_images(real_data):
    """950 real training images: nine batches of 100 and a last one of 50."""
    split = data.load("train", download=False)
    return data.Split(split.images[:950], split.labels[:950])


GRAPHED = {   # what an epoch's graph must read from the device as it goes, and what it must keep as it was
    "seed": dict(),                                                                  # constant, fused Adam
    "tuned-ema": dict(schedule="onecycle", ema=0.9, flip=True, shift=1, label_smoothing=0.1),  # Adam's beta moves
    "cosine-amp": dict(schedule="cosine", amp=True, weight_decay=0.05),              # bf16 on CUDA, fp32 on CPU
}


@pytest.mark.parametrize("options", GRAPHED.values(), ids=GRAPHED.keys())
def test_an_epoch_graph_takes_the_steps_of_the_loop(device, training_images, options):
    # The same run twice from the same weights and generator: the loop step by step (train_epoch), and the
    # epoch as one CUDA graph (on the CPU the same steps, uncaptured). Two epochs: the second replays the graph.
    config = recipe("seed", epochs=2, lr=1e-3, device=device, **options)   # lr: rounding grows slower
    amp_dtype = autocast_dtype(config.amp, torch.device(device))
    images, labels = data.to_tensors(training_images, device)

    def fresh():
        torch.manual_seed(0)
        return TrainingState(config, torch.device(device), steps_per_epoch=10, amp_dtype=amp_dtype)

    loop, graphed = fresh(), fresh()
    real_step, loop_losses = make_step(loop.model, loop, config.label_smoothing, amp_dtype), []

    def recorded_step(batch, batch_labels):
        loss, correct = real_step(batch, batch_labels)
        loop_losses.append(loss.item())
        return loss, correct

    epoch_graph = EpochGraph(graphed.model, graphed, config, len(images), amp_dtype, capture=device == "cuda")
    assert (epoch_graph.graph is not None) == (device == "cuda")
    # Rounding differs (torch's fused Adam or adam_step; TF32 and bf16 on CUDA), and Adam amplifies it where a
    # gradient is near its eps
    closeness = dict(rel=5e-2 if amp_dtype else 1e-2) if device == "cuda" else dict(rel=1e-3)
    for _ in range(2):
        loop_losses.clear()
        loop_total, loop_correct = train_epoch(recorded_step, images, labels, config, loop.order)
        total, correct = epoch_graph.run(images, labels, graphed.order)
        assert epoch_graph.losses.tolist() == pytest.approx(loop_losses, **closeness)
        assert total.item() == pytest.approx(loop_total.item(), **closeness)
        assert abs(int(correct) - int(loop_correct)) <= (0 if device == "cpu" else 20)
    # The weights (the average's, with --ema) ended far closer to each other than to where they started.
    start = torch.cat([p.flatten() for p in fresh().network().parameters()])
    ends = [torch.cat([p.detach().flatten() for p in state.network().parameters()]) for state in (loop, graphed)]
    moved, apart = (ends[0] - start).abs().max().item(), (ends[0] - ends[1]).abs().max().item()
    assert apart < 0.25 * moved
    # Everything the checkpoint keeps is where the loop left it: its schedule, Adam's state, the average's count.
    saved, loop_saved = graphed.state_dict(), loop.state_dict()
    assert saved["scheduler"] == loop_saved["scheduler"] and saved["order"].equal(loop_saved["order"])
    assert saved["optimizer"]["param_groups"] == loop_saved["optimizer"]["param_groups"]
    shapes = {k: [(key, v.dtype, v.device, v.shape, float(v) if key == "step" else None) for key, v in state.items()]
              for k, state in saved["optimizer"]["state"].items()}
    assert shapes == {k: [(key, v.dtype, v.device, v.shape, float(v) if key == "step" else None)
                          for key, v in state.items()] for k, state in loop_saved["optimizer"]["state"].items()}
    if config.ema:
        assert saved["ema"]["n_averaged"].item() == loop_saved["ema"]["n_averaged"].item() == 20


def test_an_epoch_graph_waits_for_the_gpu_once(device, training_images):
    # A replayed epoch queues its work without the host waiting for the device (CUDA's sync debug mode makes
    # any wait an error); the one wait is the caller's, when it reads the loss.
    config = recipe("seed", ema=0.9, schedule="onecycle", shift=1, device=device)
    state = TrainingState(config, torch.device(device), steps_per_epoch=10)
    images, labels = data.to_tensors(training_images, device)
    epoch_graph = EpochGraph(state.model, state, config, len(images), capture=device == "cuda")
    epoch_graph.run(images, labels, state.order)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = epoch_graph.run(images, labels, state.order)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total) and state.ema.updates == 20


def test_an_epoch_graphs_average_copies_the_first_weights_then_moves_a_share(device, training_images):
    config = recipe("seed", ema=0.75, device=device)   # 100 images, batch 100: one step an epoch
    state = TrainingState(config, torch.device(device), steps_per_epoch=1)
    images, labels = data.to_tensors(training_images, device)
    images, labels = images[:100], labels[:100]
    epoch_graph = EpochGraph(state.model, state, config, len(images), capture=device == "cuda")
    epoch_graph.run(images, labels, state.order)
    first = [p.detach().clone() for p in state.model.parameters()]
    assert all(torch.allclose(a, w, rtol=0, atol=1e-7) for a, w in zip(state.ema.module.parameters(), first,
                                                                        strict=True))
    epoch_graph.run(images, labels, state.order)
    for average, was, now in zip(state.ema.module.parameters(), first, state.model.parameters(), strict=True):
        assert not torch.equal(was, now)
        assert torch.allclose(average, 0.75 * was + 0.25 * now, rtol=0, atol=1e-6)
    assert state.ema.updates == 2
