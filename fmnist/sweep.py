"""`fmnist sweep`: many training runs compared, on Optuna.

A sweep varies the options of `fmnist train` that change what is learned. Lists of values make a grid (every
combination runs once); a range (`lo..hi`) with a number of trials makes a search (Optuna's default sampler
picks the values). Each trial is an ordinary training run in its own folder under the sweep's folder, so any
trial can be evaluated, exported or resumed like any other run.

The sweep's state lives in an Optuna storage: by default a journal file in the sweep's folder, which several
processes on one machine share; with --storage, a database that workers on many machines share. Handing each
grid point to exactly one worker: the grid is enqueued once, as WAITING trials, by whichever worker created
the study; a worker takes a trial by moving it from WAITING to RUNNING, and the storage lets exactly one
worker make that move (a journal replays its log in one order; a database updates the row under a lock).
Optuna's GridSampler alone does not promise that: its docs say concurrent workers may suggest the same point.

A trial that stops before it ends (Ctrl-C, or a worker that died) is put back in the queue with the same
values and the same folder, and the worker that takes it resumes it from its last completed epoch.
"""

import itertools
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fmnist import FmnistError

# The options a sweep may vary, with their types, in the order of the trial folders' names.
SWEEPABLE = {"recipe": str, "epochs": int, "batch_size": int, "lr": float, "schedule": str, "flip": bool,
             "shift": int, "label_smoothing": float, "ema": float, "seed": int}
LOG_SCALE = {"lr"}        # rates are searched on a log scale
JOURNAL = "sweep.journal"  # the default storage, in the sweep's folder
BOOLEANS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- what a sweep varies -------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    low: float
    high: float


def parse_values(name: str, text: str, cli_name: str | None = None):
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
        return [dict(zip(names, combination)) for combination in itertools.product(*(self.values[n] for n in names))]

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
    from fmnist.config import check, recipe

    values = {name: v for name, v in values.items() if v is not None}
    sweep = Sweep(values, trials, prune)
    if sweep.is_search and trials is None:
        raise FmnistError("a range lo..hi is searched: say how many trials with --trials N")
    if trials is not None and not sweep.is_search:
        raise FmnistError("--trials is for a search over ranges (lo..hi); lists run as a grid, each combination once")
    if trials is not None and trials < 1:
        raise FmnistError(f"--trials {trials}: must be 1 or more")
    for name in values.get("recipe", []):
        recipe(name)   # an unknown recipe is a one-line error
    corners = [{n: (v.low, v.high) if isinstance(v, Range) else v for n, v in values.items()}]
    for params in itertools.product(*(corners[0][n] for n in values)):
        check(trial_config(dict(zip(values, params)), {}, "."))
    return sweep


def folder_name(params: dict) -> str:
    """A grid point's folder: its values, e.g. lr-0.01_batch-size-100 ("run" for a grid of one point)."""
    def text(value):
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    return "_".join(f"{name.replace('_', '-')}-{text(params[name])}" for name in SWEEPABLE if name in params) or "run"


def trial_config(params: dict, fixed: dict, out: str, **runtime):
    """The TrainConfig of one trial: its recipe, with the swept and fixed values put over it."""
    from fmnist.config import recipe

    options = {**fixed, **params}
    return recipe(options.pop("recipe", "tuned"), **options, out=out, **runtime)


# ---- the study -----------------------------------------------------------------------------------

def open_storage(url: str | None, folder: Path):
    """The Optuna storage: the journal file in `folder` by default, else the database at `url`."""
    import optuna

    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(folder / JOURNAL)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
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
        raise FmnistError(f"--storage {_hide_password(given)}: no Python driver for this database here; {hint}") from None
    except Exception as e:   # SQLAlchemy's errors: a bad URL, a server that does not answer, a bad password
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmnistError(f"--storage {_hide_password(given)}: cannot use this database ({first}); check the URL "
                          "and that the server is running") from None


HEARTBEAT_SECONDS = 20


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


def open_study(storage, name: str, sweep: Sweep):
    """The sweep's study: created, with its grid enqueued, by the first worker; loaded by the others."""
    import optuna

    # --prune: once 3 trials have finished, a trial whose test accuracy at an epoch (from the 2nd on) is below
    # the median of the others' at that epoch is stopped.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2) if sweep.prune else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner)
        return _wait_until_ready(study, sweep)
    study.set_user_attr("sweep", sweep.as_json())
    _enqueue_grid(study, sweep)
    return study


def open_study_to_show(url: str | None, folder: Path, name: str):
    """The study of an existing sweep, for --show."""
    import optuna

    if url is None and not (folder / JOURNAL).is_file():
        raise FmnistError(f"no sweep in {folder} (no {JOURNAL}); start one with `fmnist sweep ... --out {folder}`, "
                          "or give --storage for a sweep in a database")
    quiet_optuna()
    try:
        study = optuna.load_study(storage=open_storage(url, folder), study_name=name)
    except KeyError:
        raise FmnistError(f"no sweep named {name} in that storage; give --study NAME (or the --out it ran with)") from None
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


# ---- workers -------------------------------------------------------------------------------------

def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_dead(worker: str | None) -> bool:
    """Whether the worker that holds a trial is known to be gone: a process of this machine that no longer
    exists. Workers on other machines are judged by the database's heartbeat instead."""
    if not worker:
        return False   # taken an instant ago, its worker not yet written
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def requeue(study, trial) -> None:
    """Queue a trial that stopped before it ended again: same values, same folder (so it resumes there)."""
    import optuna

    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"folder": trial.user_attrs["folder"]},
        system_attrs={"fixed_params": trial.params, "retry_of": trial.number}))


def release_stale(study) -> None:
    """Fail and queue again the RUNNING trials whose worker died: on this machine, a worker process that is
    gone; on a database, also a worker that missed its heartbeats (Optuna's fail_stale_trials)."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "folder" in trial.user_attrs and _is_dead(trial.user_attrs.get("worker")):
            try:
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue   # another worker released it first
            requeue(study, trial)


def next_trial(study, sweep: Sweep):
    """The next trial for this worker: a queued one (a grid point, or one to resume), else in a search a new
    one while fewer than --trials have been started; None when the sweep has nothing left to hand out."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):   # exactly one worker wins
                return optuna.Trial(study, waiting._trial_id)
        except UpdateFinishedTrialError:
            continue
    if sweep.is_search:
        started = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        started = [t for t in started if "retry_of" not in t.system_attrs]   # a resumed trial counts once
        if len(started) < sweep.trials:
            return study.ask()
    return None


def suggest(trial, sweep: Sweep) -> dict:
    """The trial's values of the swept options: fixed for a grid point or a resumed trial, sampled otherwise."""
    params = {}
    for name in sweep.swept:
        values = sweep.values[name]
        if isinstance(values, Range):
            if SWEEPABLE[name] is int:
                params[name] = trial.suggest_int(name, int(values.low), int(values.high))
            else:
                params[name] = trial.suggest_float(name, values.low, values.high, log=name in LOG_SCALE)
        else:
            params[name] = trial.suggest_categorical(name, values)
    return params


@dataclass
class Runtime:
    """Where and how the trials run; none of it changes what is learned."""
    out: Path
    device: str = "auto"
    compile: bool = False
    amp: bool = False
    data_dir: str | None = None
    tensorboard: bool = False


def work(study, sweep: Sweep, runtime: Runtime, say=print) -> int:
    """Run trials until the sweep has none left for this worker. Returns how many this worker trained."""
    count = 0
    while True:
        release_stale(study)
        trial = next_trial(study, sweep)
        if trial is None:
            return count
        run_trial(study, trial, sweep, runtime, say)
        count += 1


def run_trial(study, trial, sweep: Sweep, runtime: Runtime, say=print) -> None:
    """One trial: an ordinary training run in its folder, resumed there if a checkpoint exists. Its test
    accuracy is reported every epoch (the pruner may stop it); the last one is the trial's value."""
    import optuna
    from fmnist.checkpoint import load_checkpoint
    from fmnist.train import train
    from optuna.trial import TrialState

    params = suggest(trial, sweep)
    folder = trial.user_attrs.get("folder") or f"trial-{trial.number:04d}"
    trial.set_user_attr("folder", folder)
    trial.set_user_attr("worker", worker_id())
    out = runtime.out / folder
    config = trial_config(params, sweep.fixed, str(out), device=runtime.device, compile=runtime.compile,
                          amp=runtime.amp, data_dir=runtime.data_dir)
    resume = (out / "fmnist.pt").is_file()
    if resume:
        _check_same_run(load_checkpoint(out / "fmnist.pt")["config"], config, out)
    report = TrialReporter(trial, folder, say)
    if runtime.tensorboard:
        from fmnist.tensorboard import TensorBoardReporter

        report = TensorBoardReporter(out, config, report)
    say(f"{folder}: {'resumed' if resume else 'started'} (trial {trial.number})")
    with Heartbeat(study, trial):
        try:
            history = train(config, report, resume=resume)
        except optuna.TrialPruned:
            _record(trial, report.history)
            study.tell(trial, state=TrialState.PRUNED)
            say(f"{folder}: pruned after epoch {len(report.history)} (behind the median)")
            return
        except FmnistError as e:   # a real outcome of these values, e.g. a loss that became NaN: not retried
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            say(f"{folder}: failed: {e}")
            return
        except BaseException:     # Ctrl-C, or a crash: queued again, to resume from the last epoch
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, study._storage.get_trial(trial._trial_id))
            raise
    _record(trial, history)
    study.tell(trial, history[-1]["test_accuracy"])
    say(f"{folder}: test accuracy {history[-1]['test_accuracy']:.2%} after {len(history)} epochs")


def _check_same_run(saved: dict, config, out: Path) -> None:
    from fmnist.config import LEARNED

    differ = [name for name in LEARNED if saved.get(name) != getattr(config, name)]
    if differ:
        raise FmnistError(f"{out} holds a run with another {flag(differ[0])} ({saved.get(differ[0])}); move it "
                          "away or sweep into another --out")


def _record(trial, history: list[dict]) -> None:
    """The trial's results in the study too, so that the table can be made from any machine of the sweep."""
    if not history:
        return
    best = max(history, key=lambda row: row["test_accuracy"])
    trial.set_user_attr("result", {
        "epochs_done": len(history),
        "final_test_accuracy": history[-1]["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"], "best_epoch": best["epoch"],
        "train_seconds": sum(row["train_seconds"] for row in history),
        "samples_per_second": sum(row["samples_per_second"] for row in history) / len(history),
        "curve": [row["test_accuracy"] for row in history]})


class TrialReporter:
    """fmnist.train.Reporter for one trial: a line per epoch, the epoch's test accuracy to Optuna, and a
    stop (optuna.TrialPruned) when the pruner says the trial falls behind."""

    def __init__(self, trial, name: str, say=print):
        self.trial, self.name, self.say = trial, name, say
        self.history: list[dict] = []

    def note(self, message: str) -> None:
        self.say(f"{self.name}: note: {message}")

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None:
        self.epochs = epochs

    def step(self, samples_done: int, loss) -> None: ...

    def epoch_end(self, row: dict) -> None:
        import optuna

        self.history.append(row)
        self.say(f"{self.name}: epoch {row['epoch']}/{self.epochs}  test acc {row['test_accuracy']:.2%}  "
                 f"{row['train_seconds']:.3g} s  {row['samples_per_second']:,.0f} samples/s")
        self.trial.report(row["test_accuracy"], row["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned()


class Heartbeat:
    """While a trial runs, tell a database every HEARTBEAT_SECONDS that its worker lives (a journal file
    has no heartbeat: there, a dead worker is a process of this machine that is gone)."""

    def __init__(self, study, trial):
        from optuna.storages import RDBStorage

        self.storage, self.trial_id = study._storage, trial._trial_id
        self.enabled = isinstance(self.storage, RDBStorage)
        self.stop = threading.Event()

    def __enter__(self):
        if self.enabled:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self):
        while not self.stop.wait(HEARTBEAT_SECONDS):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()
        return False


def worker_process(url: str | None, name: str, sweep: Sweep, runtime: Runtime, threads: int) -> None:
    """The body of one of --workers N processes on this machine: torch's threads divided between them."""
    import sys

    import torch

    torch.set_num_threads(threads)
    quiet_optuna()
    try:
        work(open_study(open_storage(url, runtime.out), name, sweep), sweep, runtime)
    except KeyboardInterrupt:
        pass   # the trial was queued again; the parent reports the interruption
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def quiet_optuna() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_workers(url: str | None, name: str, sweep: Sweep, runtime: Runtime, workers: int) -> None:
    """--workers N: N processes, each taking trials until none is left."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")   # a fresh interpreter each: no torch state forked
    processes = [context.Process(target=worker_process, args=(url, name, sweep, runtime, threads))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            process.join()
        raise
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise FmnistError(f"{len(failed)} of {workers} workers stopped with an error (exit code {failed[0]}); "
                          "run the same command again to continue the sweep")
