"""Each option that changes what is learned is declared once, as its TrainConfig field (fmnist.config.learned):
its bounds, `fmnist train`'s and `fmnist sweep`'s options and --help, TensorBoard's hparams and the sweep's
plan are made from that declaration."""

import dataclasses

import pytest
import typer.main
from typer.testing import CliRunner

from fmnist import FmnistError
from fmnist.cli import app
from fmnist.cli.usage import SWEPT
from fmnist.config import LEARNED, TrainConfig, check, declaration, flag
from fmnist.sweep import plan
from fmnist.tensorboard import HPARAMS

# Both sides of each bound: values that train, and values refused with the option's own words.
BOUNDS = {
    "epochs": ([1, 500], [(0, "must be 1 or more"), (-3, "must be 1 or more")]),
    "batch_size": ([1, 60_000], [(0, "must be 1 or more"),
                                 (60_001, "more than the 60,000 training images; at most 60000")]),
    "lr": ([1e-9, 3.0], [(0.0, "must be greater than 0"), (-1e-3, "must be greater than 0")]),
    "schedule": (["constant", "onecycle", "cosine"], [("step", "choose one of constant, onecycle, cosine")]),
    "shift": ([0, 8], [(-1, "must be 0 to 8 pixels"), (9, "must be 0 to 8 pixels")]),
    "label_smoothing": ([0.0, 0.999], [(1.0, "must be in [0, 1)"), (-0.1, "must be in [0, 1)")]),
    "ema": ([0.0, 0.9999], [(1.0, "must be in [0, 1), 0 for off"), (-0.5, "must be in [0, 1), 0 for off")]),
    "weight_decay": ([0.0, 0.5], [(-1e-4, "must be 0 or more, 0 for off")]),
}


@pytest.mark.parametrize("name", BOUNDS)
def test_each_bound_takes_the_values_inside_and_refuses_the_ones_outside(name):
    good, bad = BOUNDS[name]
    for value in good:
        check(TrainConfig(**{name: value}))
    for value, why in bad:
        with pytest.raises(FmnistError) as caught:
            check(TrainConfig(**{name: value}))
        assert str(caught.value) == f"{flag(name)} {value}: {why}"


def test_the_learned_options_are_the_fields_declared_so():
    declared = [f.name for f in dataclasses.fields(TrainConfig) if "learned" in f.metadata]
    assert list(LEARNED) == declared and "device" not in LEARNED and "out" not in LEARNED
    assert HPARAMS == LEARNED
    assert list(plan.SWEEPABLE) == ["recipe", *LEARNED]
    assert plan.LOG_SCALE == {name for name in LEARNED if declaration(name).sweep == "log"} and "lr" in plan.LOG_SCALE
    assert set(SWEPT) == {"--recipe"} | {flag(n) for n in LEARNED if not isinstance(getattr(TrainConfig(), n), bool)}


def options_of(command: str) -> dict:
    group = typer.main.get_command(app)
    return {param.name: param for param in group.commands[command].params}   # type: ignore[attr-defined]


@pytest.mark.parametrize("name", LEARNED)
def test_train_and_sweep_offer_each_learned_option_as_declared(name):
    declared, default = declaration(name), getattr(TrainConfig(), name)
    train, sweep = options_of("train")[name], options_of("sweep")[name]
    assert train.help == declared.help and train.default is None   # None: the recipe's value
    if isinstance(default, bool):
        assert train.opts == [flag(name)] and train.secondary_opts == ["--no-" + flag(name)[2:]]
    else:
        assert train.opts == [flag(name)] and train.show_default == str(default)
    assert sweep.opts == [declared.sweep_flag or flag(name)] and declared.example in sweep.help
    assert sweep.metavar == ("LIST|RANGE" if declared.sweep in ("range", "log") else "LIST")
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert flag(name) in help_text and max(len(line) for line in help_text.splitlines()) <= 80


def test_a_list_only_option_refuses_a_range_and_a_range_option_takes_one():
    assert plan.parse_values("lr", "1e-4..1e-2") == plan.Range(1e-4, 1e-2)
    assert plan.parse_values("shift", "0..2") == plan.Range(0, 2)
    with pytest.raises(FmnistError, match=r"--seeds 0\.\.3: --seeds takes a list, not a range"):
        plan.parse_values("seed", "0..3", "--seeds")
    with pytest.raises(FmnistError, match="a range lo..hi is for numbers"):
        plan.parse_values("schedule", "a..b")


def test_a_sweep_takes_weight_decay_as_a_list_or_a_range():
    grid = plan.from_options({"weight_decay": "0,1e-4,1e-3", "epochs": "1"}, None, False)
    assert grid.grid() == [{"weight_decay": 0.0}, {"weight_decay": 1e-4}, {"weight_decay": 1e-3}]
    assert plan.trial_config(grid.grid()[1], grid.fixed, "out").weight_decay == 1e-4
    search = plan.from_options({"weight_decay": "0..1e-3"}, 4, False)
    assert search.values["weight_decay"] == plan.Range(0.0, 1e-3) and "weight_decay" not in plan.LOG_SCALE
    with pytest.raises(FmnistError, match="--weight-decay -0.001: must be 0 or more"):
        plan.from_options({"weight_decay": "-1e-3,0"}, None, False)
