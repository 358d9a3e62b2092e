"""The images the tests and bench/ood.py make (tests/images.py) are what their names say."""

import numpy as np
from PIL import Image

from tests.images import PHOTO_VARIATIONS, product_photo


def garment() -> np.ndarray:
    """A light square garment on black, 28 x 28, as Fashion-MNIST has them."""
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 8:20] = 200
    return image


def test_each_photo_variation_makes_the_photo_it_names(tmp_path):
    plain = np.asarray(product_photo(garment()), np.int64)
    assert plain.shape == (25 + 280 + 25, 70 + 280 + 70, 3) and (plain[0, 0] == 255).all()
    made = {name: np.asarray(product_photo(garment(), **options).convert("L"), np.int64)
            for name, options in PHOTO_VARIATIONS.items()}
    assert made["4x"].shape == (10 + 112 + 10, 30 + 112 + 30) and made["12x"].shape == (40 + 336 + 40,) * 2
    assert made["off-centre, wide canvas"].shape == (400, 700) and made["off-centre, tall canvas"].shape == (600, 360)
    tall = made["off-centre, tall canvas"] < 128                      # the garment: dark on the light background
    rows = np.nonzero(tall.any(1))[0]
    assert rows.min() > 250 and rows.max() < 600 - 40                  # low on its canvas, not centred
    assert made["off-white (245)"][0, 0] == 245 and made["light grey (232)"][0, 0] == 232
    assert made["light grey (232)"].max() == 232                       # the garment's white is lowered with it
    grey = plain[..., 0]
    assert (np.diff(made["blurred (radius 1)"], axis=1) ** 2).sum() < 0.97 * (np.diff(grey, axis=1) ** 2).sum()
    assert not np.array_equal(made["bicubic"], grey) and not np.array_equal(made["Lanczos"], made["bicubic"])
    for quality in (60, 90):
        product_photo(garment(), tmp_path / f"{quality}.jpg", quality=quality)
    assert (tmp_path / "60.jpg").stat().st_size < (tmp_path / "90.jpg").stat().st_size
    with Image.open(tmp_path / "90.jpg") as saved:
        assert saved.format == "JPEG" and saved.size == (420, 330)
