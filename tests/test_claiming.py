"""How a sweep's workers share its trials, without training any: a worker claims a queued trial (exactly one wins
it), names itself on it, and fails it; a trial whose worker is gone (a process of this machine that exited, or on a
database a worker whose heartbeat stopped) is failed and queued again with its values and folder; a search hands out
new trials until --trials have started, a resumed one counted once. Real Optuna studies on a journal file in
tmp_path, real processes, and a real PostgreSQL server where heartbeats are needed."""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from fmnist.sweep import plan as plans, study as studies, workers
from fmnist.sweep.plan import Range

HOST = socket.gethostname()
GRID = {"lr": [0.01, 0.001]}   # two points: folders lr-0.01 and lr-0.001, in that order


def journal_study(tmp_path, values=None, trials=None, name="claims"):
    """A sweep's study on a journal file in tmp_path, its grid (if any) queued: (study, sweep)."""
    sweep = plans.make_sweep(values or GRID, trials, False)
    studies.quiet_optuna()
    return studies.open_study(studies.open_storage(None, tmp_path), name, sweep), sweep


def states(study) -> Counter:
    return Counter(t.state.name for t in study.get_trials())


def stored(study, trial):
    """A trial as the storage holds it now."""
    return study._storage.get_trial(trial._trial_id)


def exited_pid() -> int:
    """The pid of a process of this machine that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def alive():
    """A process of this machine that runs while the test does."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def start(study, sweep, worker: str):
    """A trial taken as run_trial takes it: claimed, its values suggested, its folder and its worker written."""
    trial = workers.next_trial(study, sweep)
    params = workers.suggest(trial, sweep)
    trial.set_user_attr("folder", trial.user_attrs.get("folder") or f"trial-{trial.number:04d}")
    trial.set_user_attr("worker", worker)
    return trial, params


# ---- claiming, failing ------------------------------------------------------------------------------------------

def test_a_waiting_trial_is_claimed_by_one_worker_only(tmp_path):
    study, _ = journal_study(tmp_path)
    first, second = study.get_trials(states=(TrialState.WAITING,))
    taken = studies.claim(study, first)
    assert taken is not None and taken.number == first.number == 0
    assert stored(study, taken).state.name == "RUNNING" and taken.user_attrs == {"folder": "lr-0.01"}
    assert studies.claim(study, first) is None   # a second worker, with the same look at the queue: too late
    assert states(study) == Counter({"RUNNING": 1, "WAITING": 1})
    assert stored(study, second).state.name == "WAITING"


def test_a_finished_trial_cannot_be_claimed(tmp_path):
    study, _ = journal_study(tmp_path)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert studies.fail(study, stored(study, studies.claim(study, waiting)))
    assert studies.claim(study, waiting) is None
    assert states(study) == Counter({"FAIL": 1, "WAITING": 1})


def test_failing_a_trial_says_whether_it_was_still_running(tmp_path):
    study, sweep = journal_study(tmp_path)
    taken = workers.next_trial(study, sweep)
    record = stored(study, taken)
    assert studies.fail(study, record) is True and stored(study, taken).state.name == "FAIL"
    assert studies.fail(study, record) is False   # another worker released it first
    assert states(study) == Counter({"FAIL": 1, "WAITING": 1})


def test_frozen_is_a_live_trial_as_the_storage_holds_it_now(tmp_path):
    study, sweep = journal_study(tmp_path)
    trial, params = start(study, sweep, "elsewhere:1")
    record = studies.frozen(study, trial)
    assert record.number == trial.number and record.state.name == "RUNNING" and record.params == params
    assert record.user_attrs == {"folder": "lr-0.01", "worker": "elsewhere:1"}


# ---- which workers are dead -------------------------------------------------------------------------------------

def test_a_worker_is_named_by_its_machine_and_its_process():
    host, colon, pid = workers.worker_id().rpartition(":")
    assert (host, colon, int(pid)) == (HOST, ":", os.getpid())


def test_only_a_process_of_this_machine_that_is_gone_is_dead(alive):
    gone = exited_pid()
    assert workers._is_dead(f"{HOST}:{gone}") is True
    assert workers._is_dead(f"{HOST}:{2**22 + 12345}") is True   # above any pid_max: never a process
    assert workers._is_dead(f"{HOST}:{alive.pid}") is False
    with pytest.raises(subprocess.TimeoutExpired):
        alive.wait(timeout=0.2)   # looked up, not signalled
    assert workers._is_dead(workers.worker_id()) is False
    assert workers._is_dead(f"{HOST}:1") is False   # init: alive, whether or not it may be signalled
    assert workers._is_dead(f"another-{HOST}:{gone}") is False   # judged by the database's heartbeat instead
    assert workers._is_dead(f"{gone}") is False   # no machine named
    assert workers._is_dead(f"{HOST}:a-pid") is False
    assert workers._is_dead(None) is False and workers._is_dead("") is False   # not yet written


# ---- queueing again, releasing --------------------------------------------------------------------------------

def test_a_stopped_trial_is_queued_again_with_its_values_and_folder_and_resumes_them(tmp_path):
    study, sweep = journal_study(tmp_path)
    trial, params = start(study, sweep, f"{HOST}:{exited_pid()}")
    assert params == {"lr": 0.01}
    assert studies.fail(study, stored(study, trial))
    workers.requeue(study, studies.frozen(study, trial))
    original, other, again = study.get_trials()
    assert (again.state.name, again.params, again.distributions) == ("WAITING", params, original.distributions)
    assert again.user_attrs == {"folder": "lr-0.01"}   # not the worker: it is the next one's to write
    assert again.system_attrs == {"fixed_params": params, "retry_of": original.number}
    assert workers.next_trial(study, sweep).number == other.number   # the queue's order
    resumed = workers.next_trial(study, sweep)
    assert resumed.number == again.number and workers.suggest(resumed, sweep) == params
    assert resumed.user_attrs["folder"] == "lr-0.01"


def test_a_running_trial_whose_process_is_gone_is_failed_and_queued_again(tmp_path, alive):
    study, sweep = journal_study(tmp_path)
    dead, params = start(study, sweep, f"{HOST}:{exited_pid()}")
    living, _ = start(study, sweep, f"{HOST}:{alive.pid}")
    workers.release_stale(study)
    assert stored(study, dead).state.name == "FAIL" and stored(study, living).state.name == "RUNNING"
    [again] = study.get_trials(states=(TrialState.WAITING,))
    assert (again.params, again.user_attrs, again.system_attrs["retry_of"]) == (params, {"folder": "lr-0.01"},
                                                                                dead.number)
    workers.release_stale(study)   # once: the retry has no worker yet, and the failed one is not running
    assert states(study) == Counter({"FAIL": 1, "RUNNING": 1, "WAITING": 1})


def test_only_running_trials_are_released(tmp_path):
    """A queued trial that carries a dead worker's name (as Optuna's retry of a stale trial does: it copies the
    user_attrs) stays queued, and a finished one stays as it ended."""
    study, sweep = journal_study(tmp_path)
    dead = f"{HOST}:{exited_pid()}"
    done, _ = start(study, sweep, dead)
    study.tell(done, 0.5)
    study.enqueue_trial({"lr": 0.01}, user_attrs={"folder": "lr-0.01", "worker": dead})
    workers.release_stale(study)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "WAITING", "WAITING"]


def test_a_trial_of_another_machine_is_left_to_the_heartbeat(tmp_path):
    study, sweep = journal_study(tmp_path)
    trial, _ = start(study, sweep, f"another-{HOST}:{exited_pid()}")
    workers.release_stale(study)
    assert stored(study, trial).state.name == "RUNNING" and states(study) == Counter({"RUNNING": 1, "WAITING": 1})


# ---- handing out the next trial ---------------------------------------------------------------------------------

def test_a_grid_hands_out_each_queued_point_once_then_nothing(tmp_path):
    study, sweep = journal_study(tmp_path)
    first, second = workers.next_trial(study, sweep), workers.next_trial(study, sweep)
    assert (first.number, first.user_attrs["folder"]) == (0, "lr-0.01")
    assert (second.number, second.user_attrs["folder"]) == (1, "lr-0.001")
    assert workers.next_trial(study, sweep) is None
    assert states(study) == Counter({"RUNNING": 2}) and len(study.get_trials()) == 2


def test_a_search_hands_out_new_trials_until_its_number_have_started(tmp_path):
    study, sweep = journal_study(tmp_path, {"lr": Range(1e-3, 1e-2)}, trials=2)
    first, second = workers.next_trial(study, sweep), workers.next_trial(study, sweep)
    assert (first.number, second.number) == (0, 1) and "folder" not in first.user_attrs
    assert workers.next_trial(study, sweep) is None
    study.tell(first, 0.5)
    assert workers.next_trial(study, sweep) is None
    assert states(study) == Counter({"COMPLETE": 1, "RUNNING": 1})


def test_a_search_trial_stopped_and_resumed_counts_once(tmp_path):
    study, sweep = journal_study(tmp_path, {"lr": Range(1e-3, 1e-2)}, trials=2)
    stopped, params = start(study, sweep, workers.worker_id())
    study.tell(stopped, state=TrialState.FAIL)   # Ctrl-C: failed, and queued again
    workers.requeue(study, studies.frozen(study, stopped))
    resumed = workers.next_trial(study, sweep)
    assert resumed.user_attrs == {"folder": "trial-0000"} and workers.suggest(resumed, sweep) == params
    study.tell(resumed, 0.5)
    last = workers.next_trial(study, sweep)
    assert last is not None and last.number == 2 and last.params == {}   # new: its values not yet sampled
    assert workers.next_trial(study, sweep) is None   # two points started: trial-0000 (twice) and this one
    assert states(study) == Counter({"FAIL": 1, "COMPLETE": 1, "RUNNING": 1})


def test_a_search_trial_that_failed_for_its_values_is_replaced(tmp_path):
    study, sweep = journal_study(tmp_path, {"lr": Range(1e-3, 1e-2)}, trials=1)
    failed = workers.next_trial(study, sweep)
    study.tell(failed, state=TrialState.FAIL)   # e.g. a loss that became NaN: not queued again
    replaced = workers.next_trial(study, sweep)
    assert replaced is not None and replaced.number == 1
    assert workers.next_trial(study, sweep) is None


def test_a_search_trial_samples_each_range_and_list(tmp_path):
    values = {"lr": Range(1e-3, 1e-2), "label_smoothing": Range(0.0, 0.2), "batch_size": Range(100, 200),
              "schedule": ["constant", "cosine"], "epochs": [3]}
    study, sweep = journal_study(tmp_path, values, trials=1)
    trial = workers.next_trial(study, sweep)
    params = workers.suggest(trial, sweep)
    record = stored(study, trial)
    assert params == record.params and set(params) == {"lr", "label_smoothing", "batch_size", "schedule"}
    assert 1e-3 <= params["lr"] <= 1e-2 and 0 <= params["label_smoothing"] <= 0.2
    assert isinstance(params["batch_size"], int) and 100 <= params["batch_size"] <= 200
    assert record.distributions == {
        "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),   # rates: on a log scale
        "label_smoothing": optuna.distributions.FloatDistribution(0.0, 0.2),
        "batch_size": optuna.distributions.IntDistribution(100, 200),
        "schedule": optuna.distributions.CategoricalDistribution(["constant", "cosine"])}


# ---- heartbeats -------------------------------------------------------------------------------------------------

def test_a_journal_keeps_no_heartbeat_and_lets_a_trials_error_through(tmp_path):
    study, sweep = journal_study(tmp_path)
    assert studies.heartbeat_storage(study) is None
    trial = workers.next_trial(study, sweep)
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="the trial's own"), studies.Heartbeat(study, trial) as beat:
        assert isinstance(beat, studies.Heartbeat) and threading.active_count() == threads
        raise RuntimeError("the trial's own error")
    assert stored(study, trial).state.name == "RUNNING"


@pytest.fixture
def database_study(tmp_path, postgres_url):
    """A sweep's study of the grid in PostgreSQL, with heartbeats, deleted afterwards: (study, sweep, engine)."""
    import sqlalchemy

    sweep = plans.make_sweep(GRID, None, False)
    studies.quiet_optuna()
    name = f"test-claiming-{uuid.uuid4().hex[:8]}"
    study = studies.open_study(studies.open_storage(postgres_url, tmp_path), name, sweep)
    engine = sqlalchemy.create_engine(studies._with_driver(postgres_url))
    yield study, sweep, engine
    optuna.delete_study(study_name=name, storage=study._storage)
    engine.dispose()


def last_beat(engine, trial):
    """When the database last heard from the trial's worker (None: never)."""
    import sqlalchemy

    with engine.connect() as db:
        return db.execute(sqlalchemy.text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :id"),
                          {"id": trial._trial_id}).scalar()


def test_heartbeats_are_kept_by_a_database_that_has_them_on(database_study, postgres_url):
    study, _, _ = database_study
    assert studies.heartbeat_storage(study) is study._storage
    name = f"test-claiming-{uuid.uuid4().hex[:8]}"
    plain = optuna.storages.RDBStorage(studies._with_driver(postgres_url))   # no heartbeat_interval
    without = optuna.create_study(storage=plain, study_name=name)
    try:
        assert studies.heartbeat_storage(without) is None
    finally:
        optuna.delete_study(study_name=name, storage=plain)


def test_a_trial_on_a_database_beats_while_it_runs_and_stops_when_it_ends(database_study, monkeypatch):
    monkeypatch.setattr(studies, "HEARTBEAT_SECONDS", 0.05)   # a beat every 50 ms instead of every 20 s
    study, sweep, engine = database_study
    trial, _ = start(study, sweep, "elsewhere:1")
    assert last_beat(engine, trial) is None
    with pytest.raises(RuntimeError, match="the trial's own"), studies.Heartbeat(study, trial) as beat:
        first = last_beat(engine, trial)
        assert first is not None and beat.thread.is_alive() and beat.thread.daemon   # never holds the exit up
        deadline = time.monotonic() + 3
        while last_beat(engine, trial) == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert last_beat(engine, trial) > first   # beaten again
        raise RuntimeError("the trial's own error")
    assert not beat.thread.is_alive()
    ended = last_beat(engine, trial)
    time.sleep(0.3)
    assert last_beat(engine, trial) == ended


def test_a_trial_whose_worker_elsewhere_went_silent_is_failed_and_queued_again(database_study):
    import sqlalchemy

    study, sweep, engine = database_study
    trial, params = start(study, sweep, "another-machine:4242")
    with studies.Heartbeat(study, trial):
        pass
    workers.release_stale(study)
    assert stored(study, trial).state.name == "RUNNING"   # heard from a moment ago
    with engine.begin() as db:
        db.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour' "
                                   "WHERE trial_id = :id"), {"id": trial._trial_id})
    workers.release_stale(study)
    assert stored(study, trial).state.name == "FAIL"
    again = [t for t in study.get_trials() if t.state.name == "WAITING" and t.user_attrs["folder"] == "lr-0.01"]
    assert [t.params for t in again] == [params] and len(study.get_trials()) == 3
