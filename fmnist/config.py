"""What a training run learns with, in one typed config, and the recipes that set its defaults.

Nothing here imports torch, so the CLI can show the defaults in --help at once.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from fmnist import FmnistError

TRAIN_IMAGES = 60_000   # the size of Fashion-MNIST's training set


@dataclass(frozen=True)
class Learned:
    """How an option that changes what is learned is declared, once: `fmnist train`'s and `fmnist sweep`'s
    options, their --help, check(), LEARNED, TensorBoard's hparams and the sweep's plan are made from this."""
    help: str                                    # --help's sentence for fmnist train
    rules: tuple[tuple[Callable[[Any], bool], str], ...] = ()   # (whether a value can train, what to say when
                                                 # it cannot, after "--option value: "), each in turn
    sweep: str = "list"                          # what fmnist sweep takes: "list", "range", or "log" (a range
    example: str = ""                            # searched on a log scale); example: sweep's --help
    choices: tuple[str, ...] = ()                # the only values of a named option
    sweep_flag: str = ""                         # sweep's option where it differs from train's (--seeds)


def learned(default: Any, help: str, **declared: Any) -> Any:
    """A TrainConfig field that changes what is learned, with its declaration (Learned) as the field's metadata."""
    return field(default=default, metadata={"learned": Learned(help, **declared)})


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = learned(
        30, "Full passes over the 60,000 training images.",
        rules=((lambda n: n >= 1, "must be 1 or more"),), sweep="range", example="5 or 10,20 or 10..40")
    batch_size: int = learned(
        128, "Images per step.", rules=(
            (lambda n: n >= 1, "must be 1 or more"),
            (lambda n: n <= TRAIN_IMAGES, f"more than the {TRAIN_IMAGES:,} training images; at most {TRAIN_IMAGES}")),
        sweep="range", example="100,1000")
    lr: float = learned(
        0.005, "Adam's learning rate; with a schedule, its peak.",
        rules=((lambda x: x > 0, "must be greater than 0"),), sweep="log", example="0.01,0.001 or 1e-4..1e-2")
    schedule: str = learned(
        "onecycle", "How the step size moves, batch by batch.", choices=("constant", "onecycle", "cosine"),
        example="constant,onecycle")
    flip: bool = learned(False, "Random horizontal flips.", example="on, off or on,off")
    shift: int = learned(
        1, "Random shifts of up to this many pixels (0: off).",
        rules=((lambda n: 0 <= n <= 8, "must be 0 to 8 pixels"),), sweep="range", example="0,1,2 or 0..2")
    label_smoothing: float = learned(
        0.1, "Label smoothing of the loss (0: off).",
        rules=((lambda x: 0 <= x < 1, "must be in [0, 1)"),), sweep="range", example="0..0.2")
    ema: float = learned(
        0.0, "Decay of a moving average of the weights, which is then evaluated and saved (0: off).",
        rules=((lambda x: 0 <= x < 1, "must be in [0, 1), 0 for off"),), sweep="range",
        example="0,0.999 or 0.99..0.999")
    weight_decay: float = learned(
        0.0, "AdamW's decoupled weight decay: each step shrinks the weights by the step size times this (0: off).",
        rules=((lambda x: x >= 0, "must be 0 or more, 0 for off"),), sweep="range",
        example="0,1e-4,1e-3 or 0..1e-3")
    seed: int = learned(
        0, "Seed for the initial weights, batch order and augmentation.", sweep_flag="--seeds",
        example="0,1,2: each point once per seed")
    device: str = "auto"          # auto | cpu | cuda; auto takes CUDA when present
    compile: bool = False         # torch.compile the Network
    amp: bool = False             # CUDA autocast: bf16 where supported, else fp16 with a GradScaler
    data_dir: str | None = None   # where Fashion-MNIST is (see fmnist.data); None searches
    out: str = "export"           # where fmnist.pt, metrics.jsonl and curves.png are written


# The options that change what is learned, in their order: a recipe sets them, a sweep varies them, a command
# repeats them, TensorBoard records them.
LEARNED_FIELDS = {f.name: f for f in fields(TrainConfig) if "learned" in f.metadata}
LEARNED = tuple(LEARNED_FIELDS)


def declaration(name: str) -> Learned:
    return LEARNED_FIELDS[name].metadata["learned"]


# A recipe is a set of defaults for the options that change what is learned; options given explicitly win.
RECIPES = {
    "tuned": {},   # TrainConfig's own defaults: bench/RECIPES.md says what each part is worth
    "seed": dict(epochs=10, batch_size=100, lr=0.01, schedule="constant", flip=False, shift=0,
                 label_smoothing=0.0, ema=0.0),   # the tutorial's recipe, exactly
}
SCHEDULES = declaration("schedule").choices


def recipe(name: str, **options: Any) -> TrainConfig:
    """The config of a recipe, with the options that are not None put over it."""
    if name not in RECIPES:
        raise FmnistError(f"--recipe {name}: choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **{k: v for k, v in options.items() if v is not None}})


def check(config: TrainConfig) -> None:
    """Refuse, with the option's name, a config that cannot train."""
    for name in LEARNED:
        value, declared = getattr(config, name), declaration(name)
        if declared.choices and value not in declared.choices:
            raise FmnistError(f"{flag(name)} {value}: choose one of {', '.join(declared.choices)}")
        for valid, why_not in declared.rules:
            if not valid(value):
                raise FmnistError(f"{flag(name)} {value}: {why_not}")


def flag(name: str) -> str:
    """The command-line option of a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def train_command(config: TrainConfig, out: str | None = None) -> str:
    """The `fmnist train` command that trains this config again: the learned options that differ from the
    defaults (on a CPU, with the same threads, the same seed gives the same run)."""
    default, words = TrainConfig(), ["fmnist train"]
    for name in LEARNED:
        value = getattr(config, name)
        if value != getattr(default, name):
            words.append((flag(name) if value else f"--no-{name}") if isinstance(value, bool)
                         else f"{flag(name)} {value}")
    return " ".join(words + ([f"--out {out}"] if out else []))
