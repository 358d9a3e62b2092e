"""`fmnist evaluate`: the 10,000 test images through a checkpoint (torch) or an exported model (onnxruntime)."""

from dataclasses import dataclass
from pathlib import Path

from fmnist import FmnistError, data, runtime


@dataclass(frozen=True)
class Report:
    model: str                   # the file evaluated
    result: runtime.Evaluation   # accuracy, per class, confusion matrix
    flagged: float | None        # the share of test images the model calls not Fashion-MNIST; None: it cannot tell
    note: str | None = None      # what the user should know about the model (an ONNX model that cannot flag)


def evaluate(checkpoint: Path | None = None, onnx: Path | None = None, data_dir: Path | None = None) -> Report:
    """The test set's accuracy with onnxruntime (`onnx`) or torch (`checkpoint`, by default export/fmnist.pt)."""
    if checkpoint and onnx:
        raise FmnistError("give --checkpoint or --onnx, not both")
    if onnx:
        sess = runtime.session(onnx)
        threshold = runtime.ood_threshold(sess)
        test = data.load("test", data_dir)
        logits, scores = runtime.run(sess, runtime.to_model_input(test.images))
        flagged = float((scores > threshold).mean()) if threshold is not None and scores is not None else None
        return Report(str(onnx), runtime.evaluation(test.labels, logits.argmax(axis=1)), flagged,
                      None if flagged is not None else runtime.CANNOT_FLAG)
    import torch

    from fmnist.checkpoint import load_network
    from fmnist.train import infer

    checkpoint = checkpoint or Path("export/fmnist.pt")
    network = load_network(checkpoint)
    test = data.load("test", data_dir)
    predicted = infer(network, torch.from_numpy(runtime.to_model_input(test.images))).argmax(dim=1).numpy()
    return Report(str(checkpoint), runtime.evaluation(test.labels, predicted), None)
