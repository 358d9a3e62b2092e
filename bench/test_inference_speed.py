"""Inference throughput at batch 1, 64 and 1024: torch eager (the baseline), torch compiled, onnxruntime on
the Network alone and on the whole exported model (with its ood_score, as `fmnist export` writes it: what
predict, evaluate and serve run), and torch on CUDA when present.

Before a path is timed, its logits on the batch are checked against eager torch on the CPU.
"""

import os

import numpy as np
import pytest
import torch

from bench.common import cuda_or_skip, new_network, record
from fmnist import ood, runtime
from fmnist.export import to_onnx

BATCH_SIZES = [1, 64, 1024]


@pytest.fixture(scope="module")
def model():
    return new_network().eval()


@pytest.fixture(scope="module")
def compiled(model):
    return torch.compile(model, dynamic=False)   # one graph per batch size, as a server with fixed batches


@pytest.fixture(scope="module")
def ort_session(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "fmnist.onnx"
    path.write_bytes(to_onnx(model).SerializeToString())
    # All cores, and no spinning: idle onnxruntime threads that spin slow torch in the same process
    # (onnxruntime issue 13808).
    return runtime.session(path, threads=os.cpu_count(), spinning=False)


@pytest.fixture(scope="module")
def whole_session(model, train_split, tmp_path_factory):
    """The whole exported model: the Network and its ood_score, fitted to the training images as export fits it."""
    detector, threshold = ood.fit(model, runtime.to_model_input(train_split.images), train_split.labels)
    path = tmp_path_factory.mktemp("onnx") / "whole.onnx"
    path.write_bytes(to_onnx(detector, threshold).SerializeToString())
    return runtime.session(path, threads=os.cpu_count(), spinning=False)


def batch_of(test_split, batch_size: int) -> np.ndarray:
    return runtime.to_model_input(test_split.images[:batch_size])


def check_and_time(benchmark, run, model, images: np.ndarray, **labels) -> None:
    """Check run()'s logits against eager torch's on `images` (a fast wrong path cannot win), then time it."""
    np.testing.assert_allclose(run(), eager_logits(model, images), atol=1e-4, rtol=0)
    benchmark(run)
    record(benchmark, samples=len(images), batch_size=len(images), **labels)


def eager_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_torch_eager(benchmark, model, test_split, batch_size):
    images = batch_of(test_split, batch_size)
    check_and_time(benchmark, lambda: eager_logits(model, images), model, images, path="torch eager", device="cpu")


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_torch_compiled(benchmark, model, compiled, test_split, batch_size):
    images = batch_of(test_split, batch_size)
    check_and_time(benchmark, lambda: eager_logits(compiled, images), model, images,
                   path="torch compiled", device="cpu")


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_onnxruntime(benchmark, model, ort_session, test_split, batch_size):
    images = batch_of(test_split, batch_size)
    check_and_time(benchmark, lambda: runtime.run(ort_session, images, batch_size)[0], model, images,
                   path="onnxruntime", device="cpu")


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_onnxruntime_with_the_score(benchmark, model, whole_session, test_split, batch_size):
    images = batch_of(test_split, batch_size)
    check_and_time(benchmark, lambda: runtime.run(whole_session, images, batch_size)[0], model, images,
                   path="onnxruntime, with ood_score", device="cpu")


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_torch_cuda(benchmark, model, test_split, batch_size):
    cuda_or_skip("cuda")
    images = batch_of(test_split, batch_size)
    on_gpu = new_network("cuda").eval()
    on_gpu.load_state_dict(model.state_dict())
    gpu_images = torch.from_numpy(images).cuda()

    def run():
        with torch.inference_mode():
            return on_gpu(gpu_images).cpu().numpy()   # .cpu() waits for the GPU: the time is the whole answer

    check_and_time(benchmark, run, model, images, path="torch eager", device="cuda")
