"""What a training run learns with, in one typed config, and the recipes that set its defaults.

Nothing here imports torch, so the CLI can show the defaults in --help at once.
"""

from dataclasses import dataclass
from typing import Any

from fmnist import FmnistError

TRAIN_IMAGES = 60_000   # the size of Fashion-MNIST's training set


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30              # full passes over the 60,000 training images
    batch_size: int = 128         # images per step
    lr: float = 0.005             # Adam's step size; with a schedule, its peak
    schedule: str = "onecycle"    # constant | onecycle | cosine: how the step size moves, step by step
    flip: bool = False            # random horizontal flips of the training images
    shift: int = 1                # random shifts of the training images, up to this many pixels each way
    label_smoothing: float = 0.1  # cross-entropy against targets this much spread over the other classes
    ema: float = 0.0              # decay of an exponential moving average of the weights; 0 turns it off
    seed: int = 0                 # weights' initialisation, batches' order, augmentation
    device: str = "auto"          # auto | cpu | cuda; auto takes CUDA when present
    compile: bool = False         # torch.compile the Network
    amp: bool = False             # CUDA autocast: bf16 where supported, else fp16 with a GradScaler
    data_dir: str | None = None   # where Fashion-MNIST is (see fmnist.data); None searches
    out: str = "export"           # where fmnist.pt, metrics.jsonl and curves.png are written


# A recipe is a set of defaults for the options that change what is learned; options given explicitly win.
RECIPES = {
    "tuned": {},   # TrainConfig's own defaults: see the README for what each part is worth
    "seed": dict(epochs=10, batch_size=100, lr=0.01, schedule="constant", flip=False, shift=0,
                 label_smoothing=0.0, ema=0.0),   # the tutorial's recipe, exactly
}
SCHEDULES = ("constant", "onecycle", "cosine")


def recipe(name: str, **options: Any) -> TrainConfig:
    """The config of a recipe, with the options that are not None put over it."""
    if name not in RECIPES:
        raise FmnistError(f"--recipe {name}: choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **{k: v for k, v in options.items() if v is not None}})


def check(config: TrainConfig) -> None:
    """Refuse, with the option's name, a config that cannot train."""
    problems = [
        (config.epochs < 1, f"--epochs {config.epochs}: must be 1 or more"),
        (config.batch_size < 1, f"--batch-size {config.batch_size}: must be 1 or more"),
        (config.batch_size > TRAIN_IMAGES, f"--batch-size {config.batch_size}: more than the {TRAIN_IMAGES:,} "
                                           f"training images; at most {TRAIN_IMAGES}"),
        (not config.lr > 0, f"--lr {config.lr}: must be greater than 0"),
        (config.schedule not in SCHEDULES, f"--schedule {config.schedule}: choose one of {', '.join(SCHEDULES)}"),
        (not 0 <= config.shift <= 8, f"--shift {config.shift}: must be 0 to 8 pixels"),
        (not 0 <= config.label_smoothing < 1, f"--label-smoothing {config.label_smoothing}: must be in [0, 1)"),
        (not 0 <= config.ema < 1, f"--ema {config.ema}: must be in [0, 1), 0 for off"),
    ]
    for bad, message in problems:
        if bad:
            raise FmnistError(message)


# The options that change what is learned: a recipe sets them, a sweep varies them, a command repeats them.
LEARNED = ("epochs", "batch_size", "lr", "schedule", "flip", "shift", "label_smoothing", "ema", "seed")


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
