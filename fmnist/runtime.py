"""onnxruntime sessions: evaluate and predict with an exported model, without torch.

Nothing here imports torch, so `fmnist predict` answers one image in a fraction of a second.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist import FmnistError


def session(path: str | Path, threads: int = 0, spinning: bool = True):
    """An onnxruntime CPU session for an exported model.

    threads: intra-op threads, 0 for onnxruntime's choice (one per core). spinning=False stops idle
    worker threads from busy-waiting, which otherwise slows torch running in the same process
    (onnxruntime issue 13808).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"ONNX model {path} not found; write one with `fmnist export --onnx` or pass --onnx PATH")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3   # errors only: no warnings on stderr for a valid model
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmnistError(f"{path} is not a valid ONNX model ({first_line}); export it again") from None


def class_names(sess) -> list[str]:
    """The class names that `fmnist export` stored in the model's metadata."""
    names = sess.get_modelmeta().custom_metadata_map.get("classes")
    if names is None:
        raise FmnistError("this ONNX model has no class names in its metadata; export it with `fmnist export --onnx`")
    return json.loads(names)


def logits(sess, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits (N, 10) for float32 images (N, 1, 28, 28) with pixels in [0, 1], run `batch_size` at a time."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) as the model takes them: float32 (N, 1, 28, 28) in [0, 1]."""
    return (images.astype(np.float32) / 255)[:, None]


# ---- evaluation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    accuracy: float                 # fraction of all images classified right
    per_class: list[float]          # accuracy on the images of each class (recall)
    confusion: list[list[int]]      # confusion[true][predicted], counts

    def as_dict(self, classes) -> dict:
        return {"accuracy": self.accuracy, "classes": list(classes),
                "per_class_accuracy": dict(zip(classes, self.per_class)), "confusion_matrix": self.confusion}


def evaluation(labels: np.ndarray, predicted: np.ndarray, num_classes: int = 10) -> Evaluation:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return Evaluation(float((labels == predicted).mean()), per_class.tolist(), confusion.tolist())


# ---- prediction on image files -------------------------------------------------------------------

def load_image(path: str | Path, invert: bool = False) -> np.ndarray:
    """An image file of any size and mode as a model input (1, 1, 28, 28).

    Fashion-MNIST shows a light garment on a dark background; a photo of a dark item on a light
    background needs invert=True. The image keeps its aspect ratio, padded with the background.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            gray = ImageOps.exif_transpose(image).convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = ("not an image file PIL can decode" if isinstance(e, UnidentifiedImageError)
                  else getattr(e, "strerror", None) or str(e))
        raise FmnistError(f"{path}: cannot read this image ({reason})") from None
    gray = ImageOps.pad(gray, (28, 28), method=Image.Resampling.BILINEAR, color=255 if invert else 0)
    if invert:
        gray = ImageOps.invert(gray)
    return to_model_input(np.asarray(gray, dtype=np.uint8)[None])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_classes(sess, image: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
    """The k most probable classes of one image, as (name, probability), most probable first."""
    probabilities = softmax(logits(sess, image)[0])
    names = class_names(sess)
    return [(names[i], float(probabilities[i])) for i in np.argsort(-probabilities)[:k]]
