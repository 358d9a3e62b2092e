import json

import pytest
import torch

from fmnist import data
from fmnist.train import evaluate
from tests import tutorial

METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_seconds",
               "samples_per_second", "compile_seconds"}


def test_one_epoch_writes_checkpoint_and_metrics(trained):
    out, result = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and METRIC_KEYS <= rows[0].keys() and rows[0]["epoch"] == 1
    assert 0.80 <= rows[0]["test_accuracy"] <= 1.0 and 0 <= rows[0]["train_accuracy"] <= 1.0
    # timed by the loop, checked against a clock outside it: the epoch cannot take longer than the command
    assert 0 < rows[0]["train_seconds"] < result.wall_seconds and rows[0]["samples_per_second"] > 60_000 / result.wall_seconds
    assert "epoch 1/1" in result.stdout and f"{rows[0]['test_accuracy']:.2%}" in result.stdout
    assert rows[0]["compile_seconds"] == 0.0 and "torch.compile" not in result.stdout   # no --compile
    assert f"{rows[0]['train_seconds']:.3g} s (the epochs' training passes)" in result.stdout
    assert not list(out.glob(".*tmp*")), "temporary files were left behind"


def test_checkpoint_loads_into_the_tutorial_class_and_reproduces_its_accuracy(trained):
    out, _ = trained
    checkpoint = torch.load(out / "fmnist.pt", weights_only=True)   # plain types only, no pickled code
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["epochs"] == 1
    assert {"state", "param_groups"} <= checkpoint["training"]["optimizer"].keys()
    model = tutorial.Network()
    model.load_state_dict(checkpoint["model"])
    images, labels = data.to_tensors(data.load("test", download=False), "cpu")
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    recorded = checkpoint["metrics"][-1]["test_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6) and accuracy >= 0.80


def test_evaluate_counts_every_test_image(real_data):
    images, labels = data.to_tensors(data.load("test", download=False), "cpu")
    model = tutorial.Network()
    loss, accuracy = evaluate(model, images, labels)
    with torch.no_grad():
        logits = model(images)
    assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-7)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
