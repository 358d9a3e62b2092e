"""Where a sweep's study is kept, and the one file that touches Optuna's private API (so that an Optuna upgrade
changes lines here alone).

The study lives in an Optuna storage: by default a journal file in the sweep's folder, which several processes
on one machine share; with --storage, a database that workers on many machines share. The grid is enqueued
once, as WAITING trials, by whichever worker created the study. A worker takes a trial by moving it from WAITING
to RUNNING (claim), which the storage lets exactly one worker do.
"""

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fmnist import FmnistError
from fmnist.sweep.plan import Sweep, folder_name

if TYPE_CHECKING:   # for hints alone: optuna is imported where a sweep runs
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import FrozenTrial

JOURNAL = "sweep.journal"  # the default storage, in the sweep's folder
# A worker holds the journal's lock file for the milliseconds of one write; one killed while holding it leaves
# the file behind, and the others take it over once it has not changed for this long (Optuna's default: 30 s).
JOURNAL_LOCK_GRACE_SECONDS = 10
HEARTBEAT_SECONDS = 20     # a database hears from each worker this often; 3 missed beats: the worker is dead


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
        return _database(url)
    except ImportError:   # SQLAlchemy found no driver for this kind of database
        hint = 'pip install "fmnist[postgres]"' if url.startswith("postgres") else "install its SQLAlchemy driver"
        raise FmnistError(f"--storage {_hide_password(given)}: "
                          f"no Python driver for this database here; {hint}") from None
    except Exception as e:   # SQLAlchemy's errors: a bad URL, a server that does not answer, a bad password
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmnistError(f"--storage {_hide_password(given)}: cannot use this database ({first}); check the URL "
                          "and that the server is running") from None


def _database(url: str, tries: int = 5) -> "optuna.storages.RDBStorage":
    """Optuna's storage in the database at `url`. Workers that start together on a new database each create its
    tables, and PostgreSQL lets one of them win (the others: UniqueViolation, an IntegrityError); the others
    then find the tables made, on a second try."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    for attempt in range(tries):
        try:
            # The heartbeat lets a worker on another machine tell that a trial's worker died: a RUNNING trial
            # whose worker has not been heard from for grace_period seconds is failed and queued again.
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=3 * HEARTBEAT_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"pool_pre_ping": True})
        except IntegrityError:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


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
    # A search asks for its trials itself (Study.ask) and keeps the heartbeat itself (Heartbeat, below)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


# ---- Optuna's private API, used here alone --------------------------------------------------------------------

def claim(study: "optuna.Study", waiting: "FrozenTrial") -> "optuna.Trial | None":
    """Take a WAITING trial by moving it to RUNNING: the storage lets exactly one worker win; None if another did."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        if study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
            return optuna.Trial(study, waiting._trial_id)
    except UpdateFinishedTrialError:
        pass
    return None


def fail(study: "optuna.Study", running: "FrozenTrial") -> bool:
    """Mark a RUNNING trial as failed; False if it had finished already (another worker released it first)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        study._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    return True


def frozen(study: "optuna.Study", trial: "optuna.Trial") -> "FrozenTrial":
    """A live trial's record as the storage holds it now (its params, attrs and state)."""
    return study._storage.get_trial(trial._trial_id)


def heartbeat_storage(study: "optuna.Study") -> "BaseHeartbeat | None":
    """The study's storage where it keeps heartbeats (a database), else None (a journal file). Optuna wraps a
    database in its cache (_CachedStorage), which is not an RDBStorage but passes the heartbeats through."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study._storage
    return storage if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage) else None


class Heartbeat:
    """While a trial runs, tell a database every HEARTBEAT_SECONDS that its worker lives (a journal file
    has no heartbeat: there, a dead worker is a process of this machine that is gone)."""

    def __init__(self, study: "optuna.Study", trial: "optuna.Trial") -> None:
        self.trial_id = trial._trial_id
        self.database = heartbeat_storage(study)   # None: a journal file
        self.stop = threading.Event()

    def __enter__(self) -> "Heartbeat":
        if self.database is not None:
            self.database.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, args=(self.database,), daemon=True)
            self.thread.start()
        return self

    def _beat(self, database: "BaseHeartbeat") -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            database.record_heartbeat(self.trial_id)

    def __exit__(self, *exc: object) -> Literal[False]:
        self.stop.set()
        if self.database is not None:
            self.thread.join()
        return False
