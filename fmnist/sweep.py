"""`fmnist sweep`: many training runs compared, on Optuna. This module: what a sweep varies, and its study.

A sweep varies the options of `fmnist train` that change what is learned. Lists of values make a grid (every
combination runs once); a range (`lo..hi`) with a number of trials makes a search (Optuna's default sampler
picks the values). Each trial is an ordinary training run in its own folder under the sweep's folder, so any
trial can be evaluated, exported or resumed like any other run (fmnist.workers runs them).

The sweep's state lives in an Optuna storage: by default a journal file in the sweep's folder, which several
processes on one machine share; with --storage, a database that workers on many machines share. The grid is
enqueued once, as WAITING trials, by whichever worker created the study.
"""

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist import FmnistError
from fmnist.config import LEARNED, TrainConfig, flag

if TYPE_CHECKING:   # for hints alone: optuna is imported where a sweep runs
    import optuna

# The options a sweep may vary, with their types (the defaults'), in the order of the trial folders' names.
SWEEPABLE = {"recipe": str, **{name: type(getattr(TrainConfig(), name)) for name in LEARNED}}
LOG_SCALE = {"lr"}        # rates are searched on a log scale
JOURNAL = "sweep.journal"  # the default storage, in the sweep's folder
# A worker holds the journal's lock file for the milliseconds of one write; one killed while holding it leaves
# the file behind, and the others take it over once it has not changed for this long (Optuna's default: 30 s).
JOURNAL_LOCK_GRACE_SECONDS = 10
HEARTBEAT_SECONDS = 20     # a database hears from each worker this often; 3 missed beats: the worker is dead
BOOLEANS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


# ---- what a sweep varies -------------------------------------------------------------------------

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


def trial_config(params: dict, fixed: dict, out: str, **runtime: Any) -> TrainConfig:
    """The TrainConfig of one trial: its recipe, with the swept and fixed values put over it."""
    from fmnist.config import recipe

    options = {**fixed, **params}
    return recipe(options.pop("recipe", "tuned"), **options, out=out, **runtime)


# ---- the study -----------------------------------------------------------------------------------

def open_storage(url: str | None, folder: Path) -> "optuna.storages.BaseStorage":
    """The Optuna storage: the journal file in `folder` by default, else the database at `url`."""
    import optuna

    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(folder / JOURNAL)
        lock = JournalFileOpenLock(path, grace_period=JOURNAL_LOCK_GRACE_SECONDS)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=lock))
    given, url = url, _with_driver(url)
    try:
        # The heartbeat lets a worker on another machine tell that a trial's worker died: a RUNNING trial
        # whose worker has not been heard from for grace_period seconds is failed and queued again.
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=3 * HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
            engine_kwargs={"pool_pre_ping": True})
    except ImportError:   # SQLAlchemy found no driver for this kind of database
        hint = 'pip install "fmnist[postgres]"' if url.startswith("postgres") else "install its SQLAlchemy driver"
        raise FmnistError(f"--storage {_hide_password(given)}: "
                          f"no Python driver for this database here; {hint}") from None
    except Exception as e:   # SQLAlchemy's errors: a bad URL, a server that does not answer, a bad password
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmnistError(f"--storage {_hide_password(given)}: cannot use this database ({first}); check the URL "
                          "and that the server is running") from None



def _with_driver(url: str) -> str:
    """postgresql://... means psycopg2 to SQLAlchemy; fmnist's postgres extra installs psycopg (3)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg2  # noqa: F401
        except ModuleNotFoundError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_study(storage: "optuna.storages.BaseStorage", name: str, sweep: Sweep) -> "optuna.Study":
    """The sweep's study: created, with its grid enqueued, by the first worker; loaded by the others."""
    import optuna

    # --prune: once 3 trials have finished, a trial whose test accuracy at an epoch (from the 2nd on) is below
    # the median of the others' at that epoch is stopped.
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2) if sweep.prune
              else optuna.pruners.NopPruner())
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner)
        return _wait_until_ready(study, sweep)
    study.set_user_attr("sweep", sweep.as_json())
    _enqueue_grid(study, sweep)
    return study


def open_study_to_show(url: str | None, folder: Path, name: str) -> "optuna.Study":
    """The study of an existing sweep, for --show."""
    import optuna

    if url is None and not (folder / JOURNAL).is_file():
        raise FmnistError(f"no sweep in {folder} (no {JOURNAL}); start one with `fmnist sweep ... --out {folder}`, "
                          "or give --storage for a sweep in a database")
    quiet_optuna()
    try:
        study = optuna.load_study(storage=open_storage(url, folder), study_name=name)
    except KeyError:
        raise FmnistError(f"no sweep named {name} in that storage; "
                          "give --study NAME (or the --out it ran with)") from None
    if "sweep" not in study.user_attrs:
        raise FmnistError(f"study {name} was not made by `fmnist sweep`")
    return study


def _enqueue_grid(study, sweep: Sweep, skip_if_exists: bool = False) -> None:
    if not sweep.is_search:
        for params in sweep.grid():
            study.enqueue_trial(params, user_attrs={"folder": folder_name(params)}, skip_if_exists=skip_if_exists)
    study.set_user_attr("ready", True)


def _wait_until_ready(study, sweep: Sweep, seconds: float = 30.0):
    """A study that another worker is still setting up is waited for; one whose setup never finished (its
    worker stopped while enqueueing) is finished here."""
    deadline = time.monotonic() + seconds
    while True:
        attrs = study.user_attrs
        if "sweep" in attrs and attrs["sweep"] != sweep.as_json():
            raise FmnistError(f"study {study.study_name} holds another sweep ({attrs['sweep']}); run the same "
                              "options to continue it, or give another --out (or --study) for a new sweep")
        if attrs.get("ready"):
            return study
        if time.monotonic() > deadline:
            study.set_user_attr("sweep", sweep.as_json())
            _enqueue_grid(study, sweep, skip_if_exists=True)
            return study
        time.sleep(0.5)


def quiet_optuna() -> None:
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Waiting out a dead worker's journal lock (JOURNAL_LOCK_GRACE_SECONDS) is expected, not worth a warning
    logging.getLogger("optuna.storages.journal._file").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # A search asks for its trials itself (Study.ask) and keeps the heartbeat itself (fmnist.workers.Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
