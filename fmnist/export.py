"""ONNX export of a trained Network with its out-of-distribution score (fmnist.ood), verified against torch
before the file is kept."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from fmnist import FmnistError, __version__, data, ood, runtime
from fmnist.checkpoint import load_network
from fmnist.files import atomic_path, file_target
from fmnist.model import CLASSES

# Batch sizes the exported model is checked at, each over all 10,000 test images: one image at a time,
# an odd size that leaves a partial last batch (10,000 = 10 x 999 + 10), and the whole set at once.
VERIFY_BATCH_SIZES = (1, 999, 10_000)
TOLERANCE = 1e-4   # max abs difference of logits, onnxruntime against torch
SCORE_TOLERANCE = 1e-3   # of ood_score, relative to max(1, |score|): a sum of 784 squares in float32

METADATA = {
    "classes": json.dumps(list(CLASSES)),
    "input": "images: float32 (batch, 1, 28, 28), pixels in [0, 1] (divide 8-bit values by 255), "
             "a light garment on a dark background as in Fashion-MNIST",
    "output": "logits: float32 (batch, 10), no softmax; class i is classes[i]. ood_score: float32 (batch,), "
              "how unlike a Fashion-MNIST image it is; above ood_threshold: not a Fashion-MNIST item",
    "fmnist_version": __version__,
}


@dataclass(frozen=True)
class Verification:
    max_abs_diff: dict[int, float]  # batch size: max abs difference of the logits from torch's
    accuracy: float                 # onnxruntime's accuracy on the 10,000 test images
    threshold: float                # the ood_score that keeps ood.KEEP of the training images
    flagged: float                  # the share of the test images whose ood_score is above it


def to_onnx(model: torch.nn.Module, threshold: float | None = None) -> onnx.ModelProto:
    """The eval-mode model as one ONNX model: input `images` with a dynamic batch axis; output `logits`, and
    `ood_score` beside it for an ood.Detector (whose `threshold` goes into the metadata)."""
    detector = isinstance(model, ood.Detector)
    example = torch.rand(2, 1, 28, 28)   # batch >= 2: a batch of 1 would specialise the batch axis
    program = torch.onnx.export(
        model.eval(), (example,), input_names=["images"],
        output_names=["logits", "ood_score"] if detector else ["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False)
    assert program is not None   # dynamo=True: the exporter returns its ONNXProgram
    proto = program.model_proto
    metadata = dict(METADATA, ood_threshold=repr(threshold)) if detector else METADATA
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_onnx(checkpoint: str | Path, output: str | Path, data_dir: str | Path | None = None) -> Verification:
    """Export a checkpoint's Network and its out-of-distribution score, fitted to the training images, to
    `output`: written to a temporary name, kept only once verified."""
    output = file_target(output, "--output")
    network = load_network(checkpoint)
    train, test = data.load("train", data_dir), data.load("test", data_dir)
    detector, threshold = ood.fit(network, runtime.to_model_input(train.images), train.labels)
    proto = to_onnx(detector, threshold)

    with atomic_path(output) as tmp:
        onnx.save(proto, tmp)   # weights inside: one self-contained file
        return verify(tmp, detector, test, threshold)


@torch.inference_mode()
def verify(path: Path, detector: ood.Detector, test: data.Split, threshold: float) -> Verification:
    """Check the ONNX file, then compare onnxruntime with torch on every test image at each batch size."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise FmnistError(f"the exported model fails onnx's checker ({str(e).splitlines()[0]})") from None
    images = runtime.to_model_input(test.images)
    expected_logits, expected_scores = (t.numpy() for t in detector.eval()(torch.from_numpy(images)))
    sess = runtime.session(path)
    diffs = {}
    for batch_size in VERIFY_BATCH_SIZES:
        logits, scores = runtime.run(sess, images, batch_size)
        diffs[batch_size] = float(np.abs(logits - expected_logits).max())
        if diffs[batch_size] > TOLERANCE or (logits.argmax(1) != expected_logits.argmax(1)).any():
            raise FmnistError(f"onnxruntime disagrees with torch at batch size {batch_size} (max abs difference "
                              f"{diffs[batch_size]:.2e}, tolerance {TOLERANCE:.0e}); nothing was written")
        score_diff = np.abs(scores - expected_scores) / np.maximum(1, np.abs(expected_scores))
        if score_diff.max() > SCORE_TOLERANCE:
            raise FmnistError(f"onnxruntime's ood_score disagrees with torch's at batch size {batch_size} (relative "
                              f"difference {score_diff.max():.2e}, tolerance {SCORE_TOLERANCE:.0e}); "
                              "nothing was written")
    accuracy = float((logits.argmax(1) == test.labels).mean())
    assert scores is not None   # the model was exported with its ood_score just now
    return Verification(diffs, accuracy, threshold, float((scores > threshold).mean()))
