"""How `fmnist predict` (and /predict, and the page) makes an image file into the model's input, on its own:
each step of the recipe by which Fashion-MNIST was made from product photos (Xiao et al. 2017, section 2),
the negating decided from the border, and every kind of file PIL decodes, with the words of each refusal."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fmnist import FmnistError, data
from fmnist.runtime import TRIM_TOLERANCE, load_image


@pytest.fixture(scope="module")
def garment(real_data) -> np.ndarray:
    """A real test image (a light garment on black, uint8 28 x 28)."""
    return data.load("test", download=False).images[0]


def saved(image: Image.Image, fmt: str = "PNG", **options) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    buffer.seek(0)
    return buffer


def the_recipe(gray: np.ndarray) -> np.ndarray:
    """The paper's steps, written out one by one for a photo on a light background (grey levels 0..255 as
    float): trim what is within 5% of the corner colour, resize the longest edge to 28 (Lanczos), sharpen
    (unsharp mask, Gaussian radius 1), centre on a 28 x 28 canvas of the corner colour, negate."""
    corner = np.median([gray[0, 0], gray[0, -1], gray[-1, 0], gray[-1, -1]])
    rows, cols = np.nonzero(np.abs(gray - corner) > 0.05 * 255)
    trimmed = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = trimmed.shape
    size = (round(28 * w / max(h, w)), round(28 * h / max(h, w)))
    small = Image.fromarray(trimmed.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    small = small.filter(ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0))
    canvas = Image.new("L", (28, 28), round(corner))
    canvas.paste(small, ((28 - size[0]) // 2, (28 - size[1]) // 2))
    return 255 - np.asarray(canvas, dtype=np.float64)


def as_input(levels: np.ndarray) -> np.ndarray:
    """Grey levels 0..255 as the model's pixels: rounded to 8 bits, then float32 in [0, 1]."""
    return levels.round().astype(np.uint8).astype(np.float32) / 255


def photo(garment: np.ndarray, size=(300, 200), at=(40, 10), scale=(150, 180), level=255) -> np.ndarray:
    """The test image as a dark garment on a plain light background of `level`, enlarged to `scale` (w, h),
    its top-left corner at `at`."""
    canvas = Image.new("L", size, level)
    canvas.paste(Image.fromarray(255 - garment).resize(scale, Image.Resampling.BILINEAR), at)
    return np.array(canvas)


def sharp(garment: int = 0, bar: int = 255) -> np.ndarray:
    """A rectangle with a bar across it on white: edges the sharpening visibly steepens (grey ones: unclipped)."""
    gray = np.full((160, 120), 255, np.uint8)
    gray[30:130, 20:100] = garment
    gray[70:80, 20:100] = bar
    return gray


@pytest.mark.parametrize("scale, at", [((150, 180), (40, 10)), ((250, 90), (5, 100)), ((60, 60), (200, 0)),
                                       ((95, 190), (10, 5)), ((190, 95), (100, 100)), ("sharp", (0, 255)),
                                       ("sharp", (60, 190))])
def test_a_photo_is_made_the_way_fashion_mnist_was(garment, scale, at):
    gray = sharp(*at) if scale == "sharp" else photo(garment, at=at, scale=scale)
    prepared = load_image(saved(Image.fromarray(gray)))
    assert prepared.negated and prepared.background == "light"
    assert prepared.input.shape == (1, 1, 28, 28) and prepared.input.dtype == np.float32
    np.testing.assert_array_equal(prepared.input[0, 0], as_input(the_recipe(gray.astype(np.float64))))


@pytest.mark.parametrize("low", [(0, 0), (0, -1), (-1, 0), (-1, -1)])
def test_the_background_is_the_median_of_the_four_corners(garment, low):
    """Two darker corners (beside white pixels) and two white ones: the background is their median, 177.5, and
    so the white is no background, nor the garment all there is (the whole photo is kept, on a canvas of 178)."""
    gray = photo(garment)
    other = (low[0], -1 - low[1]) if low[0] == low[1] else (-1 - low[0], low[1])   # a corner beside it
    for corner in (low, other):
        gray[corner] = 100
    prepared = load_image(saved(Image.fromarray(gray))).input[0, 0]
    np.testing.assert_array_equal(prepared, as_input(the_recipe(gray.astype(np.float64))))
    assert prepared.max() > 0.3 and prepared.min() == 0   # not the garment alone on black


@pytest.mark.parametrize("tall", [True, False])
def test_a_garment_one_pixel_thin_stays_one_pixel_thin(tall):
    gray = np.full((300, 300), 255, np.uint8)
    gray[(slice(None), 150) if tall else (150, slice(None))] = 0   # a line across the photo
    lit = load_image(saved(Image.fromarray(gray))).input[0, 0] > 0.5
    assert lit.sum() == 28 and (lit.any(0).sum(), lit.any(1).sum()) == ((1, 28) if tall else (28, 1))


def test_the_trim_keeps_the_garments_faint_edge_and_drops_the_background_around_it(garment):
    gray = photo(garment).astype(np.float64)
    gray[5, 290] = 255 - TRIM_TOLERANCE - 1    # a speck just past 5% of white: part of the picture, kept
    with_speck = load_image(saved(Image.fromarray(gray.astype(np.uint8)))).input
    gray[5, 290] = 255 - TRIM_TOLERANCE + 1    # within 5%: background, trimmed away
    without = load_image(saved(Image.fromarray(gray.round().astype(np.uint8)))).input
    np.testing.assert_array_equal(without, load_image(saved(Image.fromarray(photo(garment)))).input)
    assert not np.array_equal(with_speck, without)


def test_a_fashion_mnist_image_is_taken_as_it_is_and_negated_only_when_its_border_is_light(garment):
    prepared = load_image(saved(Image.fromarray(garment)))
    assert (prepared.negated, prepared.background) == (False, "dark")
    np.testing.assert_array_equal(prepared.input[0, 0], garment / np.float32(255))
    light = load_image(saved(Image.fromarray(255 - garment)))
    assert (light.negated, light.background) == (True, "light")
    np.testing.assert_array_equal(light.input, prepared.input)
    forced = load_image(saved(Image.fromarray(garment)), invert=True)
    assert forced.negated and forced.background == "dark"
    np.testing.assert_array_equal(forced.input[0, 0], (255 - garment) / np.float32(255))
    kept = load_image(saved(Image.fromarray(255 - garment)), invert=False)
    assert not kept.negated
    np.testing.assert_array_equal(kept.input[0, 0], (255 - garment) / np.float32(255))


@pytest.mark.parametrize("edge", ["top", "bottom", "left", "right"])
def test_every_edge_of_the_border_counts(edge):
    """A light picture, one edge of it dark: 40 of the border's 160 pixels, so it is no plain background."""
    gray = np.full((40, 40), 230, np.uint8)
    gray[{"top": (0, slice(None)), "bottom": (-1, slice(None)), "left": (slice(None), 0),
          "right": (slice(None), -1)}[edge]] = 20
    assert load_image(saved(Image.fromarray(gray)))[1:] == (True, "mixed")


def test_a_border_lighter_than_127_is_light():
    assert load_image(saved(Image.new("L", (28, 28), 127))).negated is False
    assert load_image(saved(Image.new("L", (28, 28), 128))).negated is True


def test_a_border_level_half_a_tolerance_from_its_median_is_plain():
    """The border's median can be a half level: 200.5 here, and 175 lies exactly 25.5 (10%) below it."""
    gray = np.full((30, 30), 226, np.uint8)
    gray[0, :] = 175      # the top row, whose corners count in the side columns too: 32 of the border's 120
    gray[-1, 1:-1] = 175  # and 28 more: half the border at 175, half at 226, so the median is 200.5
    assert load_image(saved(Image.fromarray(gray))).background == "light"


def test_a_border_that_is_no_plain_background_is_mixed_and_negated_when_mostly_light():
    rng = np.random.default_rng(0)
    mostly_light = rng.integers(140, 256, (40, 40)).astype(np.uint8)   # noise: no plain level, median > 127
    prepared = load_image(saved(Image.fromarray(mostly_light)))
    assert (prepared.negated, prepared.background) == (True, "mixed")
    mostly_dark = rng.integers(0, 116, (40, 40)).astype(np.uint8)
    assert load_image(saved(Image.fromarray(mostly_dark)))[1:] == (False, "mixed")
    # A plain border: at least 80% of its 120 pixels within 10% (25.5 levels) of its median.
    border = np.full((30, 30), 200, np.uint8)
    edge = [(0, j) for j in range(1, 29)] + [(29, j) for j in range(1, 29)]   # each once in the border
    for i, j in edge[:24]:                                  # 24 of the 120 border pixels far off: 80%, plain
        border[i, j] = 0
    assert load_image(saved(Image.fromarray(border)))[1:] == (True, "light")
    for i, j in edge[24:25]:                                # 25 of 120 off: no longer plain
        border[i, j] = 0
    assert load_image(saved(Image.fromarray(border)))[1:] == (True, "mixed")


def test_a_blank_photo_stays_whole(garment):
    blank = load_image(saved(Image.new("L", (300, 200), 255)))
    assert blank.negated and blank.background == "light"
    np.testing.assert_array_equal(blank.input, np.zeros((1, 1, 28, 28), np.float32))


def test_colour_transparency_and_high_bit_depths_are_grey_levels_in_their_own_range(garment):
    gray = photo(garment)
    gray[100, 150] = 0   # in the garment: levels 0 to 255, so that a range of its own is the 8-bit one
    plain = load_image(saved(Image.fromarray(gray))).input
    rgb = load_image(saved(Image.fromarray(gray).convert("RGB"), "JPEG", quality=100)).input
    assert np.abs(rgb - plain).max() <= 3 / 255                       # JPEG at its best: a level or two
    wide = load_image(saved(Image.fromarray(gray.astype(np.uint16) * 257))).input
    np.testing.assert_array_equal(wide, plain)                        # 16-bit: 0..65535 is 0..255
    as_int = Image.fromarray(gray.astype(np.int32) * 1000 - 7000)     # 32-bit: scaled by its own range
    np.testing.assert_array_equal(load_image(saved(as_int, "TIFF")).input, plain)
    as_float = Image.fromarray(gray.astype(np.float32) / 255)
    np.testing.assert_array_equal(load_image(saved(as_float, "TIFF")).input, plain)
    flat = load_image(saved(Image.fromarray(np.full((30, 30), 5.0, np.float32)), "TIFF"))
    assert (flat.negated, float(flat.input.max())) == (False, 0.0)   # one level: black, not a division by 0
    # Transparent pixels count as the background whatever colour they store: white, or black with invert=False.
    opaque = gray < 255   # the white background alone is transparent
    cutout = np.stack([np.where(opaque, gray, 0)] * 3 + [opaque * 255], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(load_image(saved(Image.fromarray(cutout, "RGBA"))).input, plain)
    dark = load_image(saved(Image.fromarray(cutout, "RGBA")), invert=False)
    assert dark.background == "dark" and not dark.negated
    la = Image.fromarray(cutout, "RGBA").convert("LA")
    np.testing.assert_array_equal(load_image(saved(la)).input, plain)


def test_a_photo_stored_sideways_is_turned_by_its_exif_orientation(garment):
    gray = photo(garment)
    upright = load_image(saved(Image.fromarray(gray))).input
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(gray)))   # stored turned a quarter left
    exif = Image.Exif()
    exif[0x0112] = 6                                                   # "rotate 90 clockwise to view"
    turned = load_image(saved(sideways, "JPEG", quality=100, exif=exif)).input
    assert np.abs(turned - upright).mean() < 2 / 255
    assert np.abs(load_image(saved(sideways, "JPEG", quality=100)).input - upright).mean() > 20 / 255


def test_files_that_are_not_images_or_too_large_are_refused_in_words(tmp_path):
    with pytest.raises(FmnistError) as caught:
        load_image(io.BytesIO(b"not an image"), name="notes.txt")
    assert str(caught.value) == "notes.txt: cannot read this image (not an image file PIL can decode)"
    with pytest.raises(FmnistError) as caught:
        load_image(saved(Image.new("L", (101, 100))), name="big.png", max_pixels=10_000)
    assert str(caught.value) == ("big.png: 101 x 100 pixels is more than this accepts (10,000 pixels); "
                                 "scale it down first")
    assert load_image(saved(Image.new("L", (100, 100))), max_pixels=10_000).input.shape == (1, 1, 28, 28)
    cut = saved(Image.new("L", (64, 64), 128), "PNG").getvalue()[:60]
    with pytest.raises(FmnistError, match=r"^cut.png: cannot read this image \("):
        load_image(io.BytesIO(cut), name="cut.png")
    missing = tmp_path / "gone.png"
    with pytest.raises(FmnistError) as caught:
        load_image(missing)
    assert str(caught.value) == f"{missing}: cannot read this image (No such file or directory)"


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) if crc is None
                                                                      else crc)


def test_a_decompression_bomb_and_a_broken_file_are_refused_in_words():
    import struct
    import zlib

    from PIL import Image as PIL

    header = b"\x89PNG\r\n\x1a\n"
    wide = struct.pack(">IIBBBBB", 20_000, 10_000, 8, 0, 0, 0, 0)   # 200 million pixels, said in 13 bytes
    bomb = header + png_chunk(b"IHDR", wide) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    with pytest.raises(FmnistError) as caught:
        load_image(io.BytesIO(bomb), name="bomb.png")
    assert str(caught.value) == (f"bomb.png: too large to decode safely (over {2 * PIL.MAX_IMAGE_PIXELS:,} pixels); "
                                 "scale it down first")
    rows = zlib.compress(b"".join(b"\x00" + b"\x80" * 8 for _ in range(8)))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    broken = header + ihdr + png_chunk(b"IDAT", b"not zlib") + png_chunk(b"IEND", b"")   # an OSError, no strerror
    with pytest.raises(FmnistError) as caught:
        load_image(io.BytesIO(broken), name="broken.png")
    assert str(caught.value) == "broken.png: cannot read this image (broken data stream when reading image file)"
    assert load_image(io.BytesIO(header + ihdr + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))).input.shape \
        == (1, 1, 28, 28)   # the same file, its data whole
    with pytest.raises(FmnistError) as caught:   # a ValueError of PIL's
        load_image(io.BytesIO(b"P6\n3 5\n0\n" + bytes(45)), name="zero.ppm")
    assert str(caught.value) == ("zero.ppm: cannot read this image (maxval must be greater than 0 and less than "
                                 "65536)")


def test_transparency_of_every_kind_is_laid_on_the_background(garment):
    gray = photo(garment)
    plain = load_image(saved(Image.fromarray(gray))).input
    opaque = gray < 255
    la = Image.merge("LA", [Image.fromarray(np.where(opaque, gray, 0).astype(np.uint8)),
                            Image.fromarray((opaque * 255).astype(np.uint8))])
    pa = la.convert("RGBA").convert("PA")
    assert Image.open(saved(pa, "TIFF")).mode == "PA"
    np.testing.assert_array_equal(load_image(saved(pa, "TIFF")).input, plain)
    palette = Image.fromarray(np.where(opaque, gray, 0).astype(np.uint8)).convert("P")
    palette.info["transparency"] = None
    index = Image.fromarray(np.where(opaque, gray, 0).astype(np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    hidden = np.asarray(index)[~opaque][0]                      # the palette entry the background uses
    stored = saved(index, "PNG", transparency=int(hidden))
    assert "transparency" in Image.open(stored).info and Image.open(stored).mode == "P"
    on_white = load_image(stored).input
    without = load_image(saved(index, "PNG")).input             # the same palette image, nothing transparent
    assert (load_image(stored).background, load_image(saved(index, "PNG")).background) == ("light", "dark")
    assert not np.array_equal(on_white, without)
    # A transparent colour key on a grey or an RGB image, as PNG keeps it: that level is background too.
    level = min(set(range(256)) - set(gray[opaque].tolist()))   # a level the garment does not use
    keyed = np.where(opaque, gray, level).astype(np.uint8)
    for image in (Image.fromarray(keyed), Image.fromarray(keyed).convert("RGB")):
        key = level if image.mode == "L" else (level,) * 3
        assert Image.open(saved(image, "PNG", transparency=key)).info["transparency"] == key
        np.testing.assert_array_equal(load_image(saved(image, "PNG", transparency=key)).input, plain)
    # With --no-invert, transparency is black: the image is then the cut-out's own levels on black.
    on_black = load_image(saved(la), invert=False)
    expected = load_image(saved(Image.fromarray(np.where(opaque, gray, 0).astype(np.uint8))), invert=False)
    np.testing.assert_array_equal(on_black.input, expected.input)


def test_sixteen_and_thirty_two_bit_levels_are_scaled_not_rounded_first():
    wide = np.zeros((28, 28), np.uint16)
    wide[10, 10] = 65407    # 254.502 of 255: an 8-bit 255 (by 65536 it would be 254.498, a 254)
    for array in (wide, wide.astype(">u2")):                    # I;16 and I;16B (big-endian, from TIFF)
        image = Image.fromarray(array)
        assert Image.open(saved(image, "TIFF")).mode == ("I;16" if array.dtype == np.uint16 else "I;16B")
        prepared = load_image(saved(image, "TIFF")).input[0, 0]
        assert prepared[10, 10] == 1.0 and prepared.sum() == 1.0
    extremes = np.zeros((28, 28), np.int32)
    extremes[0, :], extremes[1:, :] = np.iinfo(np.int32).min, np.iinfo(np.int32).max   # the whole 32-bit range
    prepared = load_image(saved(Image.fromarray(extremes), "TIFF"), invert=False).input[0, 0]
    assert prepared[0].max() == 0.0 and prepared[1:].min() == 1.0   # no overflow of the range's width


def test_lab_is_grey_through_rgb(garment):
    """PIL has no direct LAB to grey conversion; through RGB there is one."""
    lab = Image.fromarray(photo(garment)).convert("RGB").convert("LAB")
    assert Image.open(saved(lab, "TIFF")).mode == "LAB"
    assert load_image(saved(lab, "TIFF")).input.max() > 0.5


def test_cmyk_is_grey_as_its_rgb_is(garment):
    gray = photo(garment)
    colour = Image.fromarray(np.stack([gray, gray // 2, 255 - gray // 3], -1).astype(np.uint8), "RGB")
    cmyk = colour.convert("CMYK")
    np.testing.assert_array_equal(load_image(saved(cmyk, "TIFF")).input,
                                  load_image(saved(cmyk.convert("RGB"))).input)
