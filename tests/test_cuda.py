"""The CUDA paths: what can be checked without a GPU runs everywhere; the rest is skipped without CUDA (and
runs in bench/gpu.sh on a GPU machine)."""

import os
import subprocess
import sys

import pytest
import torch

from fmnist.train import TrainingState, autocast_dtype, make_step, recipe, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")


def test_amp_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    # A card before Ampere: torch says bf16 is supported when emulation counts, not otherwise.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(True, torch.device("cuda")) == torch.float16          # fp16 with its loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # Ampere on
    assert autocast_dtype(True, torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype(False, torch.device("cuda")) is None and autocast_dtype(True, torch.device("cpu")) is None


@needs_cuda
def test_amp_on_this_gpu_follows_its_compute_capability():
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert autocast_dtype(True, torch.device("cuda")) == expected


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


@needs_cuda
def test_a_cuda_checkpoint_holds_cpu_tensors_and_resumes_on_cuda(tmp_path, real_data):
    config = recipe("seed", epochs=2, batch_size=1000, ema=0.9, device="cuda", out=str(tmp_path))
    train(recipe("seed", epochs=1, batch_size=1000, ema=0.9, device="cuda", out=str(tmp_path)))
    checkpoint = torch.load(tmp_path / "fmnist.pt", weights_only=True)   # the README's snippet, as it is
    assert {t.device.type for t in tensors(checkpoint)} == {"cpu"}
    history = train(config, resume=True)                                 # constant schedule: may grow
    assert [row["epoch"] for row in history] == [1, 2]
    # A CPU-only process reads it with the README's snippet, and evaluates it.
    code = ("import torch; from fmnist.train import load_network; assert not torch.cuda.is_available(); "
            f"torch.load({str(tmp_path / 'fmnist.pt')!r}, weights_only=True); load_network({str(tmp_path / 'fmnist.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@needs_cuda
def test_fp16_loss_scale_is_saved_and_restored(real_data):
    config = recipe("seed", device="cuda", amp=True)
    images, labels = torch.rand(500, 1, 28, 28, device="cuda"), torch.randint(0, 10, (500,), device="cuda")
    torch.manual_seed(0)
    state = TrainingState(config, torch.device("cuda"), steps_per_epoch=5, amp_dtype=torch.float16)
    step = make_step(state.model, state, amp_dtype=torch.float16)
    for i in range(5):
        step(images[i * 100:(i + 1) * 100], labels[i * 100:(i + 1) * 100])
    saved = state.state_dict()
    assert saved["scaler"]["_growth_tracker"] == 5        # five good steps counted towards growing the scale
    resumed = TrainingState(config, torch.device("cuda"), steps_per_epoch=5, amp_dtype=torch.float16)
    resumed.load_state_dict(saved)
    assert resumed.scaler.state_dict() == saved["scaler"]
