"""ONNX export of a trained Network, verified against torch before the file is kept."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from fmnist import FmnistError, __version__, data, runtime
from fmnist.model import CLASSES
from fmnist.files import atomic_path, file_target
from fmnist.checkpoint import load_network
from fmnist.train import infer

# Batch sizes the exported model is checked at, each over all 10,000 test images: one image at a time,
# an odd size that leaves a partial last batch (10,000 = 10 x 999 + 10), and the whole set at once.
VERIFY_BATCH_SIZES = (1, 999, 10_000)
TOLERANCE = 1e-4   # max abs difference of logits, onnxruntime against torch

METADATA = {
    "classes": json.dumps(list(CLASSES)),
    "input": "images: float32 (batch, 1, 28, 28), pixels in [0, 1] (divide 8-bit values by 255), "
             "a light garment on a dark background as in Fashion-MNIST",
    "output": "logits: float32 (batch, 10), no softmax; class i is classes[i]",
    "fmnist_version": __version__,
}


@dataclass(frozen=True)
class Verification:
    max_abs_diff: dict[int, float]  # batch size: max abs difference of the logits from torch's
    accuracy: float                 # onnxruntime's accuracy on the 10,000 test images


def to_onnx(model: torch.nn.Module) -> onnx.ModelProto:
    """The eval-mode Network as one ONNX model: input `images` with a dynamic batch axis, output `logits`."""
    example = torch.rand(2, 1, 28, 28)   # batch >= 2: a batch of 1 would specialise the batch axis
    program = torch.onnx.export(
        model.eval(), (example,), input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False)
    proto = program.model_proto
    for key, value in METADATA.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_onnx(checkpoint: str | Path, output: str | Path, data_dir=None) -> Verification:
    """Export a checkpoint's Network to `output`: written to a temporary name, kept only once verified."""
    output = file_target(output, "--output")
    model = load_network(checkpoint)
    test = data.load("test", data_dir)
    proto = to_onnx(model)

    with atomic_path(output) as tmp:
        onnx.save(proto, tmp)   # weights inside: one self-contained file
        return verify(tmp, model, test)


def verify(path: Path, model: torch.nn.Module, test: data.Split) -> Verification:
    """Check the ONNX file, then compare onnxruntime with torch on every test image at each batch size."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise FmnistError(f"the exported model fails onnx's checker ({str(e).splitlines()[0]})") from None
    images = runtime.to_model_input(test.images)
    expected = infer(model, torch.from_numpy(images)).numpy()
    sess = runtime.session(path)
    diffs = {}
    for batch_size in VERIFY_BATCH_SIZES:
        got = runtime.logits(sess, images, batch_size)
        diffs[batch_size] = float(np.abs(got - expected).max())
        if diffs[batch_size] > TOLERANCE or (got.argmax(1) != expected.argmax(1)).any():
            raise FmnistError(f"onnxruntime disagrees with torch at batch size {batch_size} (max abs difference "
                              f"{diffs[batch_size]:.2e}, tolerance {TOLERANCE:.0e}); nothing was written")
    accuracy = float((got.argmax(1) == test.labels).mean())
    return Verification(diffs, accuracy)
