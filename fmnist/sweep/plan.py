"""What a sweep varies: the options of `fmnist train` that change what is learned. Lists of values make a grid
(every combination runs once); a range (`lo..hi`) with a number of trials makes a search (Optuna's default
sampler picks the values). Each trial is an ordinary training run in its own folder under the sweep's folder.
"""

import itertools
import json
from dataclasses import dataclass
from typing import Any

from fmnist import FmnistError
from fmnist.config import LEARNED, TrainConfig, declaration, flag

# The options a sweep may vary, with their types (the defaults'), in the order of the trial folders' names;
# how each may vary is declared with its TrainConfig field (fmnist.config.learned).
SWEEPABLE = {"recipe": str, **{name: type(getattr(TrainConfig(), name)) for name in LEARNED}}
RANGES = {name for name in LEARNED if declaration(name).sweep in ("range", "log")}
LOG_SCALE = {name for name in LEARNED if declaration(name).sweep == "log"}
BOOLEANS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


@dataclass(frozen=True)
class Range:
    low: float
    high: float


def parse_values(name: str, text: str, cli_name: str | None = None) -> "Range | list":
    """An option's text: a comma-separated list of values, or a range `lo..hi` (numbers only)."""
    kind, option = SWEEPABLE[name], cli_name or flag(name)
    if ".." in text:
        if kind not in (int, float):
            raise FmnistError(f"{option} {text}: a range lo..hi is for numbers; give a list, e.g. {option} a,b")
        if name not in RANGES:
            raise FmnistError(f"{option} {text}: {option} takes a list, not a range; e.g. {option} 0,1,2")
        low, high = (_value(kind, option, part.strip()) for part in text.split("..", 1))
        if not low < high:
            raise FmnistError(f"{option} {text}: a range needs lo < hi, e.g. {option} 1e-4..1e-2")
        return Range(low, high)
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise FmnistError(f"{option}: give one or more values, comma-separated (e.g. {option} 1,2) or a range lo..hi")
    if not all(parts):
        raise FmnistError(f"{option} {text}: an empty value in the list; separate values with single commas")
    values = [_value(kind, option, part) for part in parts]
    if len(set(values)) != len(values):
        raise FmnistError(f"{option} {text}: a value is repeated; give each once")
    return values


def _value(kind, option: str, text: str):
    try:
        if kind is bool:
            return BOOLEANS[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        expected = {bool: "on or off", int: "whole numbers", float: "numbers", str: "names"}[kind]
        raise FmnistError(f"{option}: {text!r} is not one of the values it takes ({expected})") from None


@dataclass(frozen=True)
class Sweep:
    """What a sweep varies. Stored in the study, so that a rerun can tell it is the same sweep."""
    values: dict            # option name -> list of values (one value: the same in every trial) or Range
    trials: int | None = None   # how many trials a search runs; None for a grid
    prune: bool = False     # stop trials that fall behind the median of the others at the same epoch

    @property
    def swept(self) -> list[str]:
        """The options whose value differs between trials, in SWEEPABLE's order."""
        return [name for name in SWEEPABLE if name in self.values
                and (isinstance(self.values[name], Range) or len(self.values[name]) > 1)]

    @property
    def fixed(self) -> dict:
        return {name: v[0] for name, v in self.values.items() if not isinstance(v, Range) and len(v) == 1}

    @property
    def is_search(self) -> bool:
        return any(isinstance(v, Range) for v in self.values.values())

    def grid(self) -> list[dict]:
        """Every combination of the listed values, as the params of one trial each."""
        names = self.swept
        return [dict(zip(names, combination, strict=True))
                for combination in itertools.product(*(self.values[n] for n in names))]

    def as_json(self) -> str:
        values = {n: {"range": [v.low, v.high]} if isinstance(v, Range) else v for n, v in self.values.items()}
        return json.dumps({"values": values, "trials": self.trials, "prune": self.prune}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Sweep":
        saved = json.loads(text)
        values = {n: Range(*v["range"]) if isinstance(v, dict) else v for n, v in saved["values"].items()}
        return cls(values, saved["trials"], saved["prune"])


def from_options(texts: dict[str, str | None], trials: int | None, prune: bool) -> Sweep:
    """The sweep of `fmnist sweep`'s option texts (name -> "0.01,0.001", "1e-4..1e-2", or None: not given)."""
    values = {name: parse_values(name, text, "--seeds" if name == "seed" else None)
              for name, text in texts.items() if text is not None}
    return make_sweep(values, trials, prune)


def make_sweep(values: dict, trials: int | None, prune: bool) -> Sweep:
    """The sweep of the options' values, each checked up front: every grid point and both ends of every
    range must make a config that `fmnist train` accepts."""
    from fmnist.config import check

    values = {name: v for name, v in values.items() if v is not None}
    sweep = Sweep(values, trials, prune)
    if sweep.is_search and trials is None:
        raise FmnistError("a range lo..hi is searched: say how many trials with --trials N")
    if trials is not None and not sweep.is_search:
        raise FmnistError("--trials is for a search over ranges (lo..hi); lists run as a grid, each combination once")
    if trials is not None and trials < 1:
        raise FmnistError(f"--trials {trials}: must be 1 or more")
    corners = {n: (v.low, v.high) if isinstance(v, Range) else v for n, v in values.items()}
    for params in itertools.product(*corners.values()):   # an unknown recipe fails here too, in one line
        check(trial_config(dict(zip(corners, params, strict=True)), {}, "."))
    return sweep


def folder_name(params: dict) -> str:
    """A grid point's folder: its values, e.g. lr-0.01_batch-size-100 ("run" for a grid of one point)."""
    def text(value):
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    return "_".join(f"{flag(name)[2:]}-{text(params[name])}" for name in SWEEPABLE if name in params) or "run"


def trial_config(params: dict, fixed: dict, out: str, **placement: Any) -> TrainConfig:
    """The TrainConfig of one trial: its recipe, with the swept and fixed values put over it."""
    from fmnist.config import recipe

    options = {**fixed, **params}
    return recipe(options.pop("recipe", "tuned"), **options, out=out, **placement)
