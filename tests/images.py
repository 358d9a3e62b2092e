"""Images made for the tests and benchmarks, never downloaded: Fashion-MNIST test images as product photos,
and sets of images that are not Fashion-MNIST items at all (fmnist.ood's tests and bench/ood.py's table).

Every maker takes a numpy Generator and returns a PIL image of its own size and mode, as a person's file
would be; the tests save them and run them through `fmnist predict`'s preparation.
"""

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


def product_photo(image: np.ndarray, path=None, scale=10, margins=(70, 25), mode="RGB", alpha=False,
                  resample=Image.Resampling.BILINEAR, background=255, canvas=None, blur=0.0, quality=90):
    """A test image as a product photo: a dark garment on a white background, larger, with margins.
    Saved to `path` (JPEG of `quality` for .jpg) and the path returned, or the image itself without a path.

    The other ways a photo is made (PHOTO_VARIATIONS): `resample`, the enlargement filter; `background`, the
    studio's level (the garment's white lowered with it, as a darker exposure would); `canvas`, the photo's
    (width, height), with the garment `margins` from its top left corner (off-centre); `blur`, a Gaussian's radius.
    """
    garment = Image.fromarray(255 - image).resize((28 * scale, 28 * scale), resample)
    if background != 255:
        garment = Image.fromarray((np.asarray(garment) * (background / 255)).round().astype(np.uint8))
    photo = Image.new("L", canvas or (28 * scale + 2 * margins[0], 28 * scale + 2 * margins[1]), background)
    photo.paste(garment, margins)
    if blur:
        photo = photo.filter(ImageFilter.GaussianBlur(blur))
    if alpha:   # a cut-out: the background transparent, and black (not white) under the transparency
        opaque = Image.fromarray(((np.asarray(photo) < 250) * 255).astype(np.uint8))
        photo = Image.merge("RGBA", [Image.eval(photo, lambda v: 0 if v >= 250 else v)] * 3 + [opaque])
    elif mode == "I;16":
        photo = Image.fromarray((np.asarray(photo).astype(np.uint16) * 257))   # 16-bit: 0..65535
    else:
        photo = photo.convert(mode)
    if path is None:
        return photo
    photo.save(path, **({"quality": quality} if str(path).endswith(".jpg") else {}))
    return path


# Product photos made in other ordinary ways than product_photo's defaults (issue #26's list): its options.
PHOTO_VARIATIONS = {
    "bicubic": dict(resample=Image.Resampling.BICUBIC),
    "Lanczos": dict(resample=Image.Resampling.LANCZOS),
    "JPEG quality 60": dict(quality=60),
    "4x": dict(scale=4, margins=(30, 10)),
    "12x": dict(scale=12, margins=(40, 40)),
    "off-centre, wide canvas": dict(canvas=(700, 400), margins=(40, 30)),
    "off-centre, tall canvas": dict(canvas=(360, 600), margins=(60, 250)),
    "off-white (245)": dict(background=245),
    "light grey (232)": dict(background=232),
    "blurred (radius 1)": dict(blur=1.0),
}


# ---- not Fashion-MNIST items ----------------------------------------------------------------------

def _size(rng, low=40, high=300) -> tuple[int, int]:
    return int(rng.integers(low, high)), int(rng.integers(low, high))


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def digit(rng) -> Image.Image:
    """A handwritten digit from scikit-learn's bundled set (8 x 8, 17 levels), enlarged: dark ink on paper,
    or light on dark, as a person might photograph or draw one."""
    images = _digit_images()
    ink = images[rng.integers(len(images))] * (255 / 16)
    pixels = 255 - ink if rng.random() < 0.5 else ink
    side = int(rng.integers(32, 200))
    return Image.fromarray(pixels.round().astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)


@functools.cache
def _digit_images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images


WORDS = ("fmnist", "Hello", "A", "k", "Q7", "SALE", "ONNX", "zebra", "42", "torch", "x", "Wq")


def text(rng) -> Image.Image:
    """A letter or word in PIL's own font, black or coloured on a plain background, of any size."""
    word = WORDS[rng.integers(len(WORDS))]
    font = ImageFont.load_default(size=int(rng.integers(16, 90)))
    left, top, right, bottom = font.getbbox(word)
    margin = int(rng.integers(2, 40))
    background = (255, 255, 255) if rng.random() < 0.7 else _colour(rng)
    image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), background)
    ImageDraw.Draw(image).text((margin - left, margin - top), word, font=font,
                               fill=(0, 0, 0) if rng.random() < 0.6 else _colour(rng))
    return image


def noise(rng) -> Image.Image:
    """Uniform noise, colour or grey."""
    h, w = _size(rng, 20, 200)
    shape = (h, w, 3) if rng.random() < 0.5 else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def solid(rng) -> Image.Image:
    """One colour, all over."""
    return Image.new("RGB", _size(rng), _colour(rng))


def gradient(rng) -> Image.Image:
    """A linear blend between two colours, in any direction."""
    h, w = _size(rng)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray((a + (b - a) * t[..., None]).round().astype(np.uint8))


def checkerboard(rng) -> Image.Image:
    """Squares of two colours, of any size."""
    h, w = _size(rng)
    square = int(rng.integers(2, 40))
    y, x = np.mgrid[0:h, 0:w]
    board = ((y // square + x // square) % 2).astype(bool)
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray(np.where(board[..., None], a, b).astype(np.uint8))


def photo_crop(rng) -> Image.Image:
    """A random crop of one of the two photos that ship with scikit-learn (a temple, a flower)."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    h, w = int(rng.integers(30, photo.shape[0])), int(rng.integers(30, photo.shape[1]))
    top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
    return Image.fromarray(photo[top:top + h, left:left + w])


@functools.cache
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


NOT_GARMENTS = {
    "digits": digit, "text": text, "noise": noise, "solid colours": solid, "gradients": gradient,
    "checkerboards": checkerboard, "photo crops": photo_crop,
}


def not_garments(name: str, count: int, seed: int = 0) -> list[Image.Image]:
    """`count` images of one of the NOT_GARMENTS sets, the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    return [NOT_GARMENTS[name](rng) for _ in range(count)]
