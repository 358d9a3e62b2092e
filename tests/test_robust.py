"""Bad input, interruption, divergence and resume: clear one-line errors, nothing lost."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from fmnist import FmnistError
from fmnist.train import Reporter, recipe, train
from tests.conftest import run_cli


def one_line_error(result, *fragments):
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    one_line_error(run_cli("export", "--onnx", "--checkpoint", junk, "--output", tmp_path / "m.onnx"),
                   f"{junk} is not a readable fmnist checkpoint")
    assert not (tmp_path / "m.onnx").exists()


def test_a_dict_without_weights_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "is not an fmnist checkpoint (no 'model' entry)")


def test_another_architecture(tmp_path, real_data):
    path = tmp_path / "resnet-ish.pt"
    torch.save({"model": torch.nn.Linear(784, 10).state_dict()}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "weights of another architecture")


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_a_hostile_checkpoint_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hostile.pt"
    torch.save({"model": Hostile()}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "is not a readable fmnist checkpoint")
    assert not (tmp_path / "hacked").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_DEBUG", "")   # --debug sets it in this process: put it back afterwards
    one_line_error(run_cli("train", "--batch-size", "0", "--out", tmp_path), "--batch-size 0")
    result = run_cli("--debug", "train", "--batch-size", "0", "--out", tmp_path)
    assert isinstance(result.exception, FmnistError)


def test_an_image_that_cannot_be_decoded(tmp_path, trained):
    out, _ = trained
    assert run_cli("export", "--onnx", "--checkpoint", out / "fmnist.pt", "--output", tmp_path / "m.onnx").exit_code == 0
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    one_line_error(run_cli("predict", bad, "--onnx", tmp_path / "m.onnx"), f"{bad}: cannot read this image")


class InterruptAt(Reporter):
    """Ctrl-C as the given epoch starts."""

    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_start(self, epoch, epochs, samples):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def quick(out, **options):
    """A short real run: batch 1000 keeps each epoch to 60 steps."""
    return recipe("tuned", epochs=3, batch_size=1000, ema=0.9, device="cpu", out=str(out), **options)


def test_interrupt_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, real_data):
    whole = train(quick(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path / "cut"), InterruptAt(3))
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and torch.load(tmp_path / "cut" / "fmnist.pt", weights_only=True)["epoch"] == 2
    resumed = train(quick(tmp_path / "cut"), resume=True)

    a = torch.load(tmp_path / "whole" / "fmnist.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "fmnist.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["training"]["model"][k], b["training"]["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("train_seconds", "samples_per_second")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


def test_ctrl_c_exits_non_zero_and_keeps_the_last_epoch(tmp_path, real_data, monkeypatch):
    from fmnist import cli

    monkeypatch.setattr(cli.RichReporter, "epoch_start", lambda self, epoch, *a: InterruptAt(2).epoch_start(epoch, *a))
    monkeypatch.setattr(cli.RichReporter, "step", lambda *a: None)
    monkeypatch.setattr(cli.RichReporter, "epoch_end", lambda *a: None)
    result = run_cli("train", "--epochs", "2", "--batch-size", "1000", "--out", tmp_path)
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.output
    assert torch.load(tmp_path / "fmnist.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_refuses_a_changed_recipe_and_a_missing_run(tmp_path, trained):
    one_line_error(run_cli("train", "--resume", "--out", tmp_path), "--resume: no checkpoint in")
    shutil.copy(trained[0] / "fmnist.pt", tmp_path / "fmnist.pt")
    one_line_error(run_cli("train", "--resume", "--lr", "0.1", "--out", tmp_path), "leave out --lr")
    one_line_error(run_cli("train", "--resume", "--epochs", "5", "--out", tmp_path),
                   "onecycle schedule was planned for 1 epochs")


def test_a_diverging_run_stops_with_advice_and_keeps_the_last_good_checkpoint(tmp_path, trained):
    shutil.copy(trained[0] / "fmnist.pt", tmp_path / "fmnist.pt")
    before = (tmp_path / "fmnist.pt").read_bytes()
    result = run_cli("train", "--recipe", "seed", "--lr", "1e30", "--epochs", "1", "--out", tmp_path)
    one_line_error(result, "the loss became infinite or NaN in epoch 1; try a lower --lr")
    assert (tmp_path / "fmnist.pt").read_bytes() == before


def test_pictures_are_valid_pngs(tmp_path, trained):
    out, _ = trained
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] > 400
    result = run_cli("evaluate", "--checkpoint", out / "fmnist.pt", "--plot", tmp_path / "confusion.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "confusion.png") as confusion:
        assert confusion.format == "PNG" and confusion.size[0] > 400
        confusion.verify()


def test_a_truncated_data_file(tmp_path, real_data):
    for path in real_data.values():
        shutil.copy(path, tmp_path / path.name)
    labels = next(tmp_path.glob("t10k-labels-idx1-ubyte*"))
    labels.write_bytes(labels.read_bytes()[:len(labels.read_bytes()) // 2])
    result = run_cli("evaluate", "--checkpoint", "missing.pt", "--data-dir", tmp_path)
    one_line_error(result, "checkpoint missing.pt not found")      # the model is checked first, then the data
    result = run_cli("train", "--epochs", "1", "--data-dir", tmp_path, "--out", tmp_path / "out")
    one_line_error(result, str(labels))
    assert not (tmp_path / "out" / "fmnist.pt").exists()


def test_resume_on_another_kind_of_device_is_refused(tmp_path, trained):
    checkpoint = torch.load(trained[0] / "fmnist.pt", weights_only=True)
    checkpoint["training"]["device"] = "cuda"      # as if trained on a GPU
    torch.save(checkpoint, tmp_path / "fmnist.pt")
    one_line_error(run_cli("train", "--resume", "--device", "cpu", "--out", tmp_path),
                   "this run was trained on cuda: resume it with --device cuda")


def test_a_run_moved_to_another_folder_resumes_there(tmp_path, trained):
    checkpoint = torch.load(trained[0] / "fmnist.pt", weights_only=True)
    checkpoint["training"]["device"] = "cpu"
    torch.save(checkpoint, tmp_path / "fmnist.pt")
    result = run_cli("train", "--resume", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0 and f"the run in {tmp_path} has done 1 of 1 epochs" in result.stderr
    assert (tmp_path / "curves.png").exists()
