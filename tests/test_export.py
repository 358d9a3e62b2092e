import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from fmnist import FmnistError, data, export
from fmnist.model import CLASSES
from tests import tutorial
from tests.conftest import run_cli
from tests.images import product_photo


@pytest.fixture(scope="module")
def test_images(real_data):
    test = data.load("test", download=False)
    return (test.images.astype(np.float32) / 255)[:, None], test.labels


def fresh_session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_one_self_contained_verified_file(exported):
    path, result = exported
    assert sorted(p.name for p in path.parent.iterdir() if "onnx" in p.name) == ["m.onnx"]   # no m.onnx.data
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert "onnxruntime test accuracy" in result.stdout and "verified against torch" in result.stdout


@pytest.mark.parametrize("batch_size", [1, 37, 10_000])
def test_onnxruntime_matches_the_tutorial_class_on_every_test_image(exported, trained, test_images, batch_size):
    path, _ = exported
    images, _ = test_images
    model = tutorial.Network()
    model.load_state_dict(torch.load(trained[0] / "fmnist.pt", weights_only=True)["model"])
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    sess = fresh_session(path)
    got = np.concatenate([sess.run(["logits"], {"images": images[i:i + batch_size]})[0]
                          for i in range(0, len(images), batch_size)])
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_dynamic_batch_axis_and_metadata(exported):
    model = onnx.load(str(exported[0]))
    (images,), (logits, score) = model.graph.input, model.graph.output
    assert images.name == "images" and logits.name == "logits" and score.name == "ood_score"   # logits first
    assert images.type.tensor_type.shape.dim[0].dim_param          # symbolic, not a fixed size
    assert [d.dim_value for d in images.type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES) and "[0, 1]" in meta["input"]
    sess = fresh_session(exported[0])
    for n in (2, 5, 128):
        logits, scores = sess.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})
        assert logits.shape == (n, 10) and scores.shape == (n,)


def test_failed_verification_keeps_nothing_new_and_loses_nothing(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", 0.0)     # no float32 export matches to the last bit
    fresh, existing = tmp_path / "new.onnx", tmp_path / "old.onnx"
    existing.write_text("the user's earlier model")
    for output in (fresh, existing):
        with pytest.raises(FmnistError, match="onnxruntime disagrees with torch"):
            export.export_onnx(trained[0] / "fmnist.pt", output)
    assert not fresh.exists() and existing.read_text() == "the user's earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["old.onnx"]


def test_evaluate_with_torch_and_onnxruntime_agree(exported, trained):
    by_torch = run_cli("evaluate", "--checkpoint", trained[0] / "fmnist.pt", "--json")
    by_onnx = run_cli("evaluate", "--onnx", exported[0], "--json")
    assert by_torch.exit_code == 0 and by_onnx.exit_code == 0, by_torch.output + by_onnx.output
    a, b = json.loads(by_torch.stdout), json.loads(by_onnx.stdout)
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["accuracy"] == b["accuracy"]
    confusion = np.array(b["confusion_matrix"])
    assert confusion.sum() == 10_000 and (confusion.sum(axis=1) == 1_000).all()
    assert b["accuracy"] == pytest.approx(np.trace(confusion) / 10_000)
    recorded = torch.load(trained[0] / "fmnist.pt", weights_only=True)["metrics"][-1]["test_accuracy"]
    assert b["accuracy"] == pytest.approx(recorded, abs=1e-6)
    assert b["per_class_accuracy"]["Trouser"] == pytest.approx(confusion[1, 1] / 1_000)


def test_evaluate_prints_tables(exported):
    result = run_cli("evaluate", "--onnx", exported[0])
    assert result.exit_code == 0 and "confusion matrix" in result.stdout and "Ankle boot" in result.stdout


@pytest.fixture(scope="module")
def pngs(test_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    images, _ = test_images
    paths = []
    for i in range(12):
        paths.append(folder / f"test{i}.png")
        Image.fromarray((images[i, 0] * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def top1(result) -> dict[str, str]:
    """{file name: most probable class} from `fmnist predict --json`."""
    return {row["image"].rsplit("/", 1)[-1]: row["top"][0]["class"] for row in json.loads(result.stdout)}


def test_predict_agrees_with_evaluate(exported, pngs, test_images):
    images, _ = test_images
    result = run_cli("predict", *pngs, "--onnx", exported[0], "--json")
    assert result.exit_code == 0, result.output
    classes = fresh_session(exported[0]).run(None, {"images": images[:12]})[0].argmax(1)
    assert top1(result) == {p.name: CLASSES[c] for p, c in zip(pngs, classes, strict=True)}
    human = run_cli("predict", pngs[0], "--onnx", exported[0], "--top", "2")
    assert human.stdout.startswith(f"{pngs[0]}: {CLASSES[classes[0]]} ") and human.stdout.count("%") == 2


def test_predict_negates_by_the_background_and_the_flags_override(exported, pngs, tmp_path):
    dark_on_light = tmp_path / "dark.png"
    Image.eval(Image.open(pngs[0]), lambda v: 255 - v).save(dark_on_light)
    auto = run_cli("predict", pngs[0], dark_on_light, "--onnx", exported[0], "--json")
    assert auto.exit_code == 0, auto.output
    rows = {row["image"].rsplit("/", 1)[-1]: row for row in json.loads(auto.stdout)}
    assert rows["dark.png"]["negated"] is True and rows[pngs[0].name]["negated"] is False
    assert rows["dark.png"]["top"][0] == pytest.approx(rows[pngs[0].name]["top"][0])   # the same input, in the end
    forced = run_cli("predict", dark_on_light, "--no-invert", "--onnx", exported[0], "--json")
    assert json.loads(forced.stdout)[0]["negated"] is False


def test_predict_says_light_background_only_where_there_is_one(exported, test_images, tmp_path):
    """Noise has no background: it is negated when its border is mostly light, and told so in words that are true;
    a photo on white is told its light background; --invert is told it was asked."""
    images, _ = test_images
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(90, 256, (300, 300), dtype=np.uint8)).save(noise)
    photo = product_photo((images[0, 0] * 255).round().astype(np.uint8), tmp_path / "photo.jpg")
    as_json = run_cli("predict", noise, photo, "--onnx", exported[0], "--json")
    rows = {Path(row["image"]).name: row for row in json.loads(as_json.stdout)}
    assert (rows["noise.png"]["negated"], rows["noise.png"]["background"]) == (True, "mixed")
    assert (rows["photo.jpg"]["negated"], rows["photo.jpg"]["background"]) == (True, "light")
    lines = run_cli("predict", noise, photo, "--onnx", exported[0]).stdout.splitlines()
    assert "(negated: no plain background; its border is mostly light)" in lines[0] and "light background" \
        not in lines[0]
    assert "(negated: light background)" in lines[1]
    dark = tmp_path / "dark.png"
    Image.new("L", (28, 28), 0).save(dark)
    asked = run_cli("predict", dark, "--invert", "--onnx", exported[0])
    assert "(negated, as asked)" in asked.stdout and "background" not in asked.stdout


@pytest.mark.parametrize("name, options", [
    ("jpeg", dict(mode="RGB")), ("cmyk.jpg", dict(mode="CMYK")), ("palette.png", dict(mode="P")),
    ("sixteen-bit.png", dict(mode="I;16")), ("cutout.png", dict(alpha=True)),
])
def test_product_photos_are_classified_like_the_test_images_they_show(exported, test_images, tmp_path, name, options):
    images, _ = test_images
    count = 60
    suffix = ".jpg" if name.endswith(("jpeg", ".jpg")) else ".png"
    photos = [product_photo((images[i, 0] * 255).round().astype(np.uint8), tmp_path / f"{i}{suffix}", **options)
              for i in range(count)]
    result = run_cli("predict", *photos, "--onnx", exported[0], "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(row["negated"] for row in rows)                     # a white background: negated, unasked
    originals = fresh_session(exported[0]).run(None, {"images": images[:count]})[0].argmax(1)
    got = top1(result)
    agree = sum(got[f"{i}{suffix}"] == CLASSES[originals[i]] for i in range(count))
    # Trimmed, resized and sharpened back to 28 x 28 from a 10x, JPEG'd copy: not bit for bit the original.
    # Measured with a trained model on 300 test images: 92-93% of photos get the original's class.
    assert agree >= 0.85 * count, f"{agree} of {count} agree"


def test_an_image_too_large_to_decode_is_one_line_and_the_others_are_classified(exported, pngs, tmp_path,
                                                                                   monkeypatch):
    from PIL import Image as PILImage

    big = tmp_path / "huge.png"
    PILImage.new("L", (300, 300), 255).save(big)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000)       # 90,000 pixels: over twice the limit
    result = run_cli("predict", pngs[0], big, pngs[1], "--onnx", exported[0], "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {big}: too large to decode safely (over 40,000 pixels); "
                                     "scale it down first")
    assert set(top1(result)) == {pngs[0].name, pngs[1].name}


def test_predict_names_a_bad_image_and_still_classifies_the_others(exported, pngs, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(pngs[0].read_bytes()[:40])
    result = run_cli("predict", pngs[0], corrupt, pngs[1], "--onnx", exported[0], "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {corrupt}: cannot read this image" in result.stderr
    assert set(top1(result)) == {pngs[0].name, pngs[1].name}


def test_predict_does_not_import_torch(exported, pngs):
    code = ("import sys; from typer.testing import CliRunner; from fmnist.cli import app; "
            f"r = CliRunner().invoke(app, ['predict', {str(pngs[0])!r}, '--onnx', {str(exported[0])!r}]); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("args, message", [
    (["predict", "x.png", "--onnx", "missing.onnx"], "error: ONNX model missing.onnx not found"),
    (["evaluate", "--onnx", "missing.onnx"], "error: ONNX model missing.onnx not found"),
    (["export", "--onnx", "--checkpoint", "missing.pt"], "error: checkpoint missing.pt not found"),
    (["evaluate", "--checkpoint", "missing.pt"], "error: checkpoint missing.pt not found"),
    (["export"], "error: say which format: `fmnist export --onnx`"),
])
def test_missing_model_is_a_clear_error(args, message, real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert result.exit_code == 1 and result.stderr.startswith(message) and "Traceback" not in result.output


def test_logits_that_onnxruntime_gets_wrong_by_more_than_the_tolerance_are_refused(trained, tmp_path):
    """export.verify against torch: the exported file with its last layer's bias moved by 2e-3 (no predicted
    class changes, the logits are off by 2e-3, over the 1e-4 tolerance) is refused; moved by 2e-5, kept."""
    from onnx import numpy_helper

    from fmnist import ood, runtime
    from fmnist.checkpoint import load_network

    train, test = data.load("train"), data.load("test")
    detector, threshold = ood.fit(load_network(trained[0] / "fmnist.pt"),
                                  runtime.to_model_input(train.images[:3000]), train.labels[:3000])
    proto = export.to_onnx(detector, threshold)
    [bias] = [i for i in proto.graph.initializer if i.name.endswith("out.bias")]
    original = numpy_helper.to_array(bias).copy()
    path = tmp_path / "m.onnx"

    def shifted(shift: float) -> Path:
        bias.CopyFrom(numpy_helper.from_array(original + np.float32(shift), bias.name))
        onnx.save(proto, path)
        return path

    verification = export.verify(shifted(2e-5), detector, test, threshold)   # float noise: kept
    assert max(verification.max_abs_diff.values()) == pytest.approx(2e-5, rel=0.2)
    with pytest.raises(FmnistError, match=r"onnxruntime disagrees with torch at batch size 1 \(max abs "
                                          r"difference 2\.0\de-03, tolerance 1e-04\)"):
        export.verify(shifted(2e-3), detector, test, threshold)
