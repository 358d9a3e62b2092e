import json

import pytest
import torch

from fmnist import data
from fmnist.loop import MovingAverage
from fmnist.model import Network
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
    assert 0 < rows[0]["train_seconds"] < result.wall_seconds
    assert rows[0]["samples_per_second"] > 60_000 / result.wall_seconds
    [line] = [line for line in result.stdout.splitlines() if line.startswith("1/1 ")]   # under the header
    assert f"{rows[0]['test_accuracy']:.2%}" in line and f"{rows[0]['train_loss']:.4f}" in line
    assert rows[0]["compile_seconds"] == 0.0 and "compile and capture" not in result.stdout   # no --compile
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


def test_moving_average_is_averaged_models_ema_with_its_state_dict():
    """fmnist's MovingAverage against torch's AveragedModel with get_ema_multi_avg_fn, the one --ema used
    before: the same average, bit for bit, after every update, and the same state_dict, which loads both
    ways, so that runs saved with either resume with either."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def torchs(model):
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    def moved(model):   # a training step's worth of change in every weight
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))

    def same(a: dict, b: dict) -> bool:   # keys in order, then values bit for bit, dtypes, devices, layouts
        return list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype and
                                          a[k].stride() == b[k].stride() for k in a)

    def network():
        return Network().to(memory_format=torch.channels_last)   # as TrainingState makes it

    torch.manual_seed(0)
    model = network()
    ours, reference = MovingAverage(model, 0.9), torchs(model)
    for _ in range(4):   # the first update copies the weights, the later ones average
        moved(model)
        ours.update_parameters(model)
        reference.update_parameters(model)
        assert same(ours.state_dict(), reference.state_dict())
    saved = ours.state_dict()
    assert list(saved)[0] == "n_averaged" and saved["n_averaged"].item() == 4
    assert {k.removeprefix("module.") for k in list(saved)[1:]} == Network().state_dict().keys()

    # Resumed from the other's state_dict (an older run's checkpoint, and back): both go on alike.
    resumed, back = MovingAverage(network(), 0.9), torchs(network())
    resumed.load_state_dict(reference.state_dict())
    back.load_state_dict(saved)
    moved(model)
    for average in (ours, reference, resumed, back):
        average.update_parameters(model)
    assert same(resumed.state_dict(), reference.state_dict()) and same(back.state_dict(), reference.state_dict())
    assert same(ours.state_dict(), reference.state_dict())


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_schedule_is_planned_over_the_whole_run_not_one_epoch(schedule):
    """Stepped once a batch, the step size follows one curve over all the run's steps: down to about 0 only at
    the run's end (cosine from its peak, one-cycle after rising to it), never back up midway."""
    from fmnist.loop import TrainingState
    from fmnist.train import recipe

    config = recipe("tuned", schedule=schedule, epochs=4, lr=0.01, device="cpu")
    state = TrainingState(config, torch.device("cpu"), steps_per_epoch=25)
    rates = []
    for _ in range(4 * 25):
        rates.append(state.optimizer.param_groups[0]["lr"])
        state.optimizer.step()
        state.scheduler.step()
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(0.01, rel=0.01)
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:], strict=False))   # falls, once it falls
    assert rates[-1] < 0.0002 and rates[25] > 0.003 and rates[50] > 0.001   # still well up after epochs 1 and 2


def test_an_ema_runs_checkpoint_holds_the_weights_whose_accuracy_its_metrics_record(tmp_path, real_data):
    """With --ema, the moving average is what is evaluated, and so what fmnist.pt's "model" must hold (the raw
    weights are kept apart, under "training", for --resume)."""
    from fmnist.checkpoint import load_network
    from fmnist.train import recipe, train

    history = train(recipe("tuned", epochs=2, batch_size=1000, ema=0.9, device="cpu", out=str(tmp_path)))
    images, labels = data.to_tensors(data.load("test"), "cpu")
    _, accuracy = evaluate(load_network(tmp_path / "fmnist.pt"), images, labels)
    assert abs(accuracy - history[-1]["test_accuracy"]) <= 2e-4   # the same weights (2 images: float noise)
    saved = torch.load(tmp_path / "fmnist.pt", weights_only=True)
    raw = saved["training"]["model"]
    assert any(not torch.equal(saved["model"][k], raw[k]) for k in saved["model"])   # the average is not the raw
