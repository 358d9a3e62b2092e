"""Checkpoints and metrics on disk: written atomically, read safely, checked before use.

A checkpoint holds the Network's weights under "model" and, beside them, plain-typed metadata and under
"training" what --resume needs; every tensor in it is on the CPU, so a GPU run's checkpoint loads anywhere.
"""

import io
import json
import pickle
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fmnist import FmnistError, __version__
from fmnist.config import TrainConfig
from fmnist.files import atomic_path
from fmnist.model import Network


def save_checkpoint(path: Path, weights: dict, training: dict, config: TrainConfig, history: list[dict]) -> None:
    """The Network's weights under "model" (the moving average when there is one), plain-typed metadata beside
    them, and under "training" what --resume needs (a TrainingState's state_dict), so that
    torch.load(path, weights_only=True) reads it all."""
    checkpoint = {
        "model": on_cpu({k: v.contiguous() for k, v in weights.items()}),
        "epoch": history[-1]["epoch"],
        "config": asdict(config),
        "metrics": history,
        "versions": {"fmnist": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
        "training": on_cpu(training),
    }
    buffer = io.BytesIO()   # serialised first: a full disk is then an OSError of the write, not torch's
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def on_cpu(value: Any) -> Any:
    """`value` with every tensor in it moved to the CPU: a GPU run's checkpoint then loads on any machine,
    torch.load(path, weights_only=True) as it is. Resuming puts each tensor back on the training device
    (load_state_dict copies weights into the device's tensors; Adam moves its state to its parameters')."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


# What --resume reads beside the weights, and of which type.
FOR_RESUME = {"config": dict, "metrics": list, "training": dict}


def load_checkpoint(path: str | Path, resume: bool = False) -> dict:
    """A checkpoint written by save_checkpoint, read safely (weights_only: a hostile file cannot run code)
    and checked: weights under "model"; with `resume`, also what --resume needs."""
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"checkpoint {path} not found; train one with `fmnist train` or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FmnistError(f"{path} is not a readable fmnist checkpoint: {_why_unreadable(path, e)}; pass a "
                          "fmnist.pt written by `fmnist train`") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise FmnistError(f"{path} is not an fmnist checkpoint (no 'model' entry); pass a fmnist.pt written by "
                          "`fmnist train`")
    model = checkpoint["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise FmnistError(f"{path} is not an fmnist checkpoint (its 'model' is not a set of weights); pass a "
                          "fmnist.pt written by `fmnist train`")
    for key, kind in FOR_RESUME.items() if resume else ():
        if not isinstance(checkpoint.get(key), kind):
            raise FmnistError(f"{path} cannot be resumed: its '{key}' entry is missing or not a {kind.__name__} "
                              "(not written by `fmnist train`, or by an older version); train afresh")
    return checkpoint


def _why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load refused, in words: torch.save writes a zip archive."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"   # a zip's first bytes, there even when its end is cut off
    if not zipped:
        return "it is not a file that torch.save wrote (a text file, an image, or empty?)"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds Python objects besides tensors and plain values, which are never loaded (they could run code)"
    return "the file is damaged or cut short"


def saved_epoch(folder: str | Path) -> int | None:
    """The epoch the run in `folder` has saved (what an interrupted run kept), None if it saved none."""
    path = Path(folder) / "fmnist.pt"
    return load_checkpoint(path).get("epoch") if path.is_file() else None


def load_network(path: str | Path) -> Network:
    """The Network with a checkpoint's weights, in eval mode on the CPU."""
    model = Network()
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except RuntimeError:
        raise FmnistError(f"{path} holds the weights of another architecture, not the tutorial's Network") from None
    return model.eval()


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl: one JSON object per epoch, rewritten whole (and atomically) after each epoch."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
