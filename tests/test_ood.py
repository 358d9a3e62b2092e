"""Images that are not Fashion-MNIST items are flagged; Fashion-MNIST's own, and photos made from them, are not.

The model is the shared one-epoch run (tests/conftest.py), exported through the CLI; the images that are not
garments are made here (tests/images.py), never downloaded. The bounds are the issue's: at most 6% of the
test images and 10% of the product photos flagged, at least 90% of each set of non-garments.
"""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from fmnist import data, ood, runtime
from fmnist.checkpoint import load_network
from fmnist.export import METADATA, to_onnx
from tests.conftest import run_cli
from tests.images import NOT_GARMENTS, PHOTO_VARIATIONS, not_garments, product_photo
from tests.test_score import textbook

PER_SET = 100


def threshold_of(path) -> float:
    return float({p.key: p.value for p in onnx.load(str(path)).metadata_props}["ood_threshold"])


def predict_json(paths, model) -> list[dict]:
    result = run_cli("predict", *paths, "--onnx", model, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_threshold_keeps_95_percent_of_the_training_images(exported, real_data):
    path, result = exported
    train = data.load("train", download=False)
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, scores = sess.run(None, {"images": runtime.to_model_input(train.images)})
    kept = (scores <= threshold_of(path)).mean()
    assert kept == pytest.approx(ood.KEEP, abs=0.001)
    assert f"out-of-distribution threshold {threshold_of(path):.3g}: keeps 95%" in result.stdout


def test_fashion_mnist_test_images_are_rarely_flagged(exported):
    result = run_cli("evaluate", "--onnx", exported[0], "--json")
    assert result.exit_code == 0, result.output
    rate = json.loads(result.stdout)["out_of_distribution_rate"]
    assert 0 < rate <= 0.06, rate                  # 0 would mean a threshold that flags nothing at all
    human = run_cli("evaluate", "--onnx", exported[0])
    assert f"flagged as not Fashion-MNIST items: {rate:.1%} of the test images" in human.stdout


def test_product_photos_of_test_images_are_rarely_flagged(exported, real_data, tmp_path):
    test = data.load("test", download=False)
    photos = [product_photo(test.images[i], tmp_path / f"{i}.jpg") for i in range(PER_SET)]
    flagged = sum(row["out_of_distribution"] for row in predict_json(photos, exported[0]))
    assert flagged <= 0.10 * PER_SET, f"{flagged} of {PER_SET} flagged"


@pytest.fixture(scope="module")
def test_image_classes(exported, tmp_path_factory, real_data):
    """The top class of each of the first PER_SET test images, as the model gives it for the 28 x 28 image."""
    folder = tmp_path_factory.mktemp("test-images")
    test = data.load("test", download=False)
    paths = [folder / f"{i}.png" for i in range(PER_SET)]
    for i, path in enumerate(paths):
        Image.fromarray(test.images[i]).save(path)
    return [row["top"][0]["class"] for row in predict_json(paths, exported[0])]


@pytest.mark.parametrize("variation", list(PHOTO_VARIATIONS))
def test_photos_made_other_ways_are_classified_as_their_test_image_and_rarely_flagged(
        exported, test_image_classes, tmp_path, variation):
    test = data.load("test", download=False)
    options = PHOTO_VARIATIONS[variation]
    photos = [product_photo(test.images[i], tmp_path / f"{i}.jpg", **options) for i in range(PER_SET)]
    rows = predict_json(photos, exported[0])
    same = sum(row["top"][0]["class"] == c for row, c in zip(rows, test_image_classes, strict=True))
    flagged = sum(row["out_of_distribution"] for row in rows)
    assert same >= 0.85 * PER_SET, f"{variation}: {same} of {PER_SET} classified as their test image"
    assert flagged <= 0.10 * PER_SET, f"{variation}: {flagged} of {PER_SET} flagged"


@pytest.mark.parametrize("name", list(NOT_GARMENTS))
def test_images_that_are_not_garments_are_flagged(exported, tmp_path, name):
    paths = []
    for i, image in enumerate(not_garments(name, PER_SET, seed=1)):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    rows = predict_json(paths, exported[0])
    flagged = sum(row["out_of_distribution"] for row in rows)
    assert flagged >= 0.90 * PER_SET, f"{name}: {flagged} of {PER_SET} flagged"
    assert all(len(row["top"]) == 3 for row in rows)          # the classes are still given


BLANKS = {"black 28 x 28": ((28, 28), 0, "png"), "white 28 x 28": ((28, 28), 255, "png"),
          "white 300 x 300 photo": ((300, 300), 255, "jpg"), "black 200 x 120": ((200, 120), 0, "png")}


def test_blank_images_of_any_size_are_flagged(exported, tmp_path):
    paths = []
    for name, (size, level, kind) in BLANKS.items():
        paths.append(tmp_path / f"{name}.{kind}")
        Image.new("RGB", size, (level,) * 3).save(paths[-1])
    rows = predict_json(paths, exported[0])
    assert {row["image"]: row["out_of_distribution"] for row in rows} == {str(p): True for p in paths}
    assert [row["ood_score"] for row in rows] == pytest.approx([ood.INK_BLANK] * len(paths), abs=1e-3)


def test_a_v2_request_of_blank_images_is_flagged(server, exported):
    import urllib.request

    body = json.dumps({"inputs": [{"name": "images", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                   "data": [0.0] * 784 + [0.5] * 784}]}).encode()
    request = urllib.request.Request(server.url + "/v2/models/fmnist/infer", body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        outputs = {o["name"]: o["data"] for o in json.loads(reply.read())["outputs"]}
    blank, grey = outputs["ood_score"]
    assert blank == pytest.approx(ood.INK_BLANK, abs=1e-3) and blank > threshold_of(exported[0])
    assert grey != pytest.approx(ood.INK_BLANK, abs=1)   # all 0.5 has ink: judged by the other parts


def test_predict_says_it_in_plain_words(exported, tmp_path, real_data):
    garment, noise = tmp_path / "garment.png", tmp_path / "noise.png"
    Image.fromarray(data.load("test", download=False).images[0]).save(garment)
    not_garments("noise", 1)[0].save(noise)
    result = run_cli("predict", garment, noise, "--onnx", exported[0])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert "does not look like a Fashion-MNIST item" in lines[str(noise)]
    assert "does not look like" not in lines[str(garment)] and "%" in lines[str(noise)]


def test_the_score_is_the_textbook_formulas_on_a_trained_network(trained, real_data):
    """The exported form of the Detector (projections, squares, summing matrices) against the textbook formulas
    in float64 (tests/test_score.py's), with a trained Network's maps and 12,000 training images."""
    network = load_network(trained[0] / "fmnist.pt")
    train, test = data.load("train", download=False), data.load("test", download=False)
    x, y = runtime.to_model_input(train.images[:12_000]), train.labels[:12_000]
    detector, _ = ood.fit(network, x, y)
    images = runtime.to_model_input(test.images[:50])
    with torch.inference_mode():
        _, pixels, conv, _ = (t.double().numpy() for t in detector.parts(torch.from_numpy(images)))
    expected_pixels, expected_conv = textbook(network, x, y, images)
    np.testing.assert_allclose(pixels[:, 0], expected_pixels, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(conv, expected_conv, rtol=1e-3, atol=1e-3)


def test_a_model_exported_without_the_score_still_predicts_with_a_note(trained, tmp_path, real_data):
    old = tmp_path / "old.onnx"
    proto = to_onnx(load_network(trained[0] / "fmnist.pt"))   # the Network alone, as fmnist 0.1 exported it
    assert [o.name for o in proto.graph.output] == ["logits"] and {p.key for p in proto.metadata_props} == set(METADATA)
    onnx.save(proto, old)
    image = tmp_path / "garment.png"
    Image.fromarray(data.load("test", download=False).images[0]).save(image)
    result = run_cli("predict", image, "--onnx", old, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"note: {runtime.CANNOT_FLAG}"
    [row] = json.loads(result.stdout)
    assert row["out_of_distribution"] is None and row["ood_score"] is None and len(row["top"]) == 3
    evaluated = run_cli("evaluate", "--onnx", old, "--json")
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["out_of_distribution_rate"] is None
