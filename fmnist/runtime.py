"""onnxruntime sessions: evaluate and predict with an exported model, without torch.

Nothing here imports torch, so `fmnist predict` answers one image in a fraction of a second.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import numpy as np

from fmnist import FmnistError

if TYPE_CHECKING:   # for hints alone: onnxruntime is imported where a session is made
    import onnxruntime as ort


def session(path: str | Path, threads: int = 0, spinning: bool = True) -> "ort.InferenceSession":
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


def class_names(sess: "ort.InferenceSession") -> list[str]:
    """The class names that `fmnist export` stored in the model's metadata."""
    names = sess.get_modelmeta().custom_metadata_map.get("classes")
    if names is None:
        raise FmnistError("this ONNX model has no class names in its metadata; export it with `fmnist export --onnx`")
    return json.loads(names)


def run(sess: "ort.InferenceSession", images: np.ndarray,
        batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N, 10) and ood_score (N,) for float32 images (N, 1, 28, 28) with pixels in [0, 1], run
    `batch_size` at a time. The score is None for a model exported without it (by an older fmnist)."""
    name, outputs = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
    wanted = outputs[:1] + (["ood_score"] if "ood_score" in outputs else [])
    results = [sess.run(wanted, {name: images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
    scores = np.concatenate([r[1] for r in results]) if len(wanted) == 2 else None
    return np.concatenate([r[0] for r in results]), scores


def ood_threshold(sess: "ort.InferenceSession") -> float | None:
    """The ood_score above which an image is not a Fashion-MNIST item (stored at export), or None for a model
    that cannot tell."""
    threshold = sess.get_modelmeta().custom_metadata_map.get("ood_threshold")
    if threshold is None or "ood_score" not in [o.name for o in sess.get_outputs()]:
        return None
    return float(threshold)


CANNOT_FLAG = ("this model cannot flag images that are not Fashion-MNIST items (exported by an older fmnist); "
               "export it again with `fmnist export --onnx` to get that")


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) as the model takes them: float32 (N, 1, 28, 28) in [0, 1]."""
    return (images.astype(np.float32) / 255)[:, None]


# ---- evaluation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    accuracy: float                 # fraction of all images classified right
    per_class: list[float]          # accuracy on the images of each class (recall)
    confusion: list[list[int]]      # confusion[true][predicted], counts

    def as_dict(self, classes: Sequence[str]) -> dict:
        return {"accuracy": self.accuracy, "classes": list(classes),
                "per_class_accuracy": dict(zip(classes, self.per_class, strict=True)),
                "confusion_matrix": self.confusion}


def evaluation(labels: np.ndarray, predicted: np.ndarray, num_classes: int = 10) -> Evaluation:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return Evaluation(float((labels == predicted).mean()), per_class.tolist(), confusion.tolist())


# ---- prediction on image files -------------------------------------------------------------------

TOP = 3        # how many classes a prediction lists unless asked (predict --top, /predict?top=)
MAX_TOP = 10   # the most classes a prediction lists: there are 10
TRIM_TOLERANCE = 0.05 * 255   # the paper's trimming: pixels within 5% of the corner colour are background
PLAIN_TOLERANCE = 0.10 * 255  # a plain background: most of the border within 10% of its median level (JPEG noise
STUDIO_LEVEL = 40            # a background negated to this level or under (a photo's of 215..255) goes to black
PLAIN_SHARE = 0.8             # and a shadow pass, uniform noise has about a fifth of its border there)


class Prepared(NamedTuple):
    """An image file made into the model's input, and what was decided on the way."""
    input: np.ndarray    # (1, 1, 28, 28) float32 in [0, 1]
    negated: bool        # its grey levels were negated (255 - level)
    background: str      # its border: "light" or "dark" (one plain level), or "mixed" (no plain background)


def load_image(path: str | Path | IO[bytes], invert: bool | None = None, name: str | None = None,
               max_pixels: int | None = None) -> Prepared:
    """An image file of any size and mode as a model input (1, 1, 28, 28), prepared the way Fashion-MNIST's
    images were made from product photos (Xiao et al. 2017, section 2): trim the edges that are close to the
    corner colour, resize the longest edge to 28, sharpen, centre on a 28 x 28 canvas, negate, take a light
    studio background to black (a levels stretch), 8-bit grey.

    Negating is decided from the image: a light border (a garment photographed on a light background, the
    common case) is negated, so that it becomes a light garment on a dark background as in Fashion-MNIST; a
    dark one is not; a border that is no plain background (noise, a crop of a busy photo) is negated when most of
    it is light, and `background` says "mixed", so that nobody is told of a light background that is not there.
    invert=True or False overrides that. An image of 28 x 28 is taken as already made that way (a Fashion-MNIST
    image): only the negating applies.

    path: a file's path, or an open binary file (an upload; `name` is then what errors call it). max_pixels:
    refuse larger images before decoding them (a server's guard against decompression bombs); None for PIL's
    own limit.
    """
    gray = _decode(path, invert, name or str(path), max_pixels)
    border = _border(gray)
    light = float(np.median(border)) > 127
    plain = np.mean(np.abs(border - np.median(border)) <= PLAIN_TOLERANCE) >= PLAIN_SHARE
    negate = light if invert is None else invert
    if gray.shape != (28, 28):
        gray = _fashion_mnist_geometry(gray)
    pixels = 255 - gray if negate else gray   # levels 0..255, as _decode gives them
    if negate and light and plain:   # a studio photo: its background to Fashion-MNIST's black
        pixels = _background_to_black(pixels)
    model_input = to_model_input(pixels.round().astype(np.uint8)[None])
    return Prepared(model_input, negate, ("light" if light else "dark") if plain else "mixed")


def _decode(path, invert: bool | None, name: str, max_pixels: int | None) -> np.ndarray:
    """The image as float grey levels 0..255 (H, W). Transparency is laid
    on the background first (white, or black under --no-invert), so the colour stored under transparent
    pixels plays no part; 16-bit, 32-bit and float images are scaled by their range, not clipped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise FmnistError(f"{name}: {image.width} x {image.height} pixels is more than this accepts "
                                  f"({max_pixels:,} pixels); scale it down first")
            image = ImageOps.exif_transpose(image)
            image.load()
    except Image.DecompressionBombError:
        assert Image.MAX_IMAGE_PIXELS is not None   # PIL raises this only while it has a limit
        raise FmnistError(f"{name}: too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels); "
                          "scale it down first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = ("not an image file PIL can decode" if isinstance(e, UnidentifiedImageError)
                  else getattr(e, "strerror", None) or str(e))
        raise FmnistError(f"{name}: cannot read this image ({reason})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255) if invert is False else (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode.startswith("I;16"):                                # I;16, I;16B (big-endian)...
        gray = np.asarray(image) * (255 / 65535)                     # 16-bit: 0..65535
    elif image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)                 # 32-bit: their own range
        low, high = float(values.min()), float(values.max())
        gray = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    else:
        gray = np.asarray(image.convert("RGB").convert("L"), dtype=np.float64)   # CMYK, palette, RGB...
    return gray


def _fashion_mnist_geometry(gray: np.ndarray) -> np.ndarray:
    """Trim to the garment, resize its longest edge to 28, sharpen, centre on 28 x 28 (on the corner colour)."""
    from PIL import Image, ImageFilter

    corner = float(np.median([gray[0, 0], gray[0, -1], gray[-1, 0], gray[-1, -1]]))
    rows, cols = np.nonzero(np.abs(gray - corner) > TRIM_TOLERANCE)
    if len(rows):   # a blank image stays whole
        gray = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = gray.shape
    size = (max(1, round(28 * w / max(h, w))), max(1, round(28 * h / max(h, w))))
    small = Image.fromarray(gray.round().astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    small = small.filter(ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0))   # Gaussian, radius 1
    canvas = Image.new("L", (28, 28), int(round(corner)))
    canvas.paste(small, ((28 - size[0]) // 2, (28 - size[1]) // 2))
    return np.asarray(canvas, dtype=np.float64)


def _border(levels: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of an image (H, W), as one array."""
    return np.concatenate([levels[0], levels[-1], levels[:, 0], levels[:, -1]])


def _background_to_black(pixels: np.ndarray) -> np.ndarray:
    """A levels stretch: the border's level (a light studio background negated: 23 for a grey of 232) becomes
    0, as every Fashion-MNIST image's background is, and the image's own maximum stays where it is."""
    background = float(np.median(_border(pixels)))
    top = float(pixels.max())
    if top <= background or background > STUDIO_LEVEL:   # a blank image stays blank; a darker ground (a
        return pixels                                     # coloured page, a gradient) is no studio's: kept
    return np.clip((pixels - background) * (top / (top - background)), 0, 255)


def predict_file(sess: "ort.InferenceSession", path: str | Path, invert: bool | None = None, k: int = TOP) -> dict:
    """`fmnist predict`'s answer for one image file: its name, whether it was negated and its border's kind
    (load_image), its k most probable classes, and whether it looks like a Fashion-MNIST item."""
    prepared = load_image(path, invert)
    [prediction] = predictions(sess, prepared.input, k)
    return answer(str(path), prepared, prediction)


def answer(name: str, prepared: Prepared, prediction: dict) -> dict:
    """One image's answer, as `fmnist predict --json` and the server's /predict give it."""
    return {"image": name, "negated": prepared.negated, "background": prepared.background, **prediction}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def predictions(sess: "ort.InferenceSession", images: np.ndarray, k: int = TOP) -> list[dict]:
    """For each image (N, 1, 28, 28): its k most probable classes, most probable first, and whether it is out of
    Fashion-MNIST's distribution with its ood_score (both None where the model cannot tell)."""
    all_logits, scores = run(sess, images)
    return predictions_from(all_logits, scores, class_names(sess), ood_threshold(sess), k)


def predictions_from(all_logits: np.ndarray, scores: np.ndarray | None, names: list[str], threshold: float | None,
                     k: int = TOP) -> list[dict]:
    """`predictions` from outputs already computed (the server's batches)."""
    results = []
    for i, probabilities in enumerate(softmax(all_logits)):
        top = [{"class": names[j], "probability": float(probabilities[j])} for j in np.argsort(-probabilities)[:k]]
        score = flagged = None   # the model cannot tell
        if threshold is not None:
            assert scores is not None   # ood_threshold gives a threshold only to a model with ood_score
            score = float(scores[i])
            flagged = score > threshold
        results.append({"top": top, "out_of_distribution": flagged, "ood_score": score})
    return results
