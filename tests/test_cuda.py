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
from fmnist.train import TrainingState, autocast_dtype, make_step, recipe, train

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
