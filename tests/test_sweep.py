"""`fmnist sweep`: real training runs, a real journal file, real worker processes and a real PostgreSQL server."""

import csv
import json
import os
import socket
import subprocess
import sys
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from fmnist.config import LEARNED
from fmnist.sweep import plan as plans, results, study as studies, workers
from tests import tutorial
from tests.conftest import run_cli
from tests.test_robust import one_line_error

GRID = ["--lr", "0.01,0.001", "--batch-size", "1000,2000", "--epochs", "1", "--device", "cpu"]
FOLDERS = {"batch-size-1000_lr-0.01", "batch-size-1000_lr-0.001", "batch-size-2000_lr-0.01", "batch-size-2000_lr-0.001"}


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def trials(out, study=None, storage=None):
    """The sweep's trials as its storage holds them."""
    import optuna

    studies.quiet_optuna()
    return optuna.load_study(storage=studies.open_storage(storage, out), study_name=study or out.name).trials


def started(output: str) -> Counter:
    """How many times each trial folder was started or resumed, from the workers' lines."""
    return Counter(line.split(":")[0] for line in output.splitlines()
                   if ": started (trial" in line or ": resumed (trial" in line)


def complete_once(all_trials) -> bool:
    done = Counter(t.user_attrs["folder"] for t in all_trials if t.state.name == "COMPLETE")
    return set(done) == FOLDERS and set(done.values()) == {1}


def test_a_grid_runs_every_combination_once_and_a_rerun_trains_nothing(tmp_path, real_data):
    out = tmp_path / "lr-bs"
    result = run_cli("sweep", *GRID, "--tensorboard", "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir() if p.is_dir()} == FOLDERS
    assert started(result.stdout) == Counter({folder: 1 for folder in FOLDERS})

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {row["folder"] for row in table} == FOLDERS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in table:
        folder = out / row["folder"]
        rows = metrics(folder)
        assert len(rows) == 1 and float(row["final_test_accuracy"]) == round(rows[-1]["test_accuracy"], 4)
        assert float(row["train_seconds"]) == round(rows[-1]["train_seconds"], 2)   # metrics.jsonl: full precision
        assert f"{rows[-1]['test_accuracy']:.2%}" in result.stdout
        checkpoint = torch.load(folder / "fmnist.pt", weights_only=True)   # an ordinary run, in every way
        assert checkpoint["config"]["lr"] == float(row["lr"])
        assert checkpoint["config"]["batch_size"] == int(row["batch_size"])
        tutorial.Network().load_state_dict(checkpoint["model"])
        events = EventAccumulator(str(folder))
        events.Reload()
        assert [e.value for e in events.Scalars("test/accuracy")] == pytest.approx([rows[-1]["test_accuracy"]])
    accuracies = [float(row["final_test_accuracy"]) for row in table]
    assert accuracies == sorted(accuracies, reverse=True)
    assert f"best: {table[0]['folder']}" in result.stdout
    assert f"--batch-size {table[0]['batch_size']} --lr {table[0]['lr']}" in result.stdout
    with Image.open(out / "sweep.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 800

    before = {folder: (out / folder / "metrics.jsonl").read_bytes() for folder in FOLDERS}
    again = run_cli("sweep", *GRID, "--out", out)
    assert again.exit_code == 0, again.output
    assert not started(again.stdout) and len(trials(out)) == 4
    assert before == {folder: (out / folder / "metrics.jsonl").read_bytes() for folder in FOLDERS}
    shown = run_cli("sweep", "--show", "--out", out)
    assert shown.exit_code == 0 and all(folder in shown.stdout for folder in FOLDERS)


def test_an_interrupted_sweep_resumes_the_trial_it_stopped_in(tmp_path, real_data, monkeypatch):
    out = tmp_path / "cut"
    options = ["--lr", "0.01,0.001", "--batch-size", "2000", "--epochs", "2", "--device", "cpu", "--out", out]
    real_epoch_start = workers.TrialReporter.epoch_start

    def ctrl_c_in_the_second_trial(self, epoch, epochs, samples):
        if self.name == "lr-0.001" and epoch == 2:
            raise KeyboardInterrupt
        real_epoch_start(self, epoch, epochs, samples)

    monkeypatch.setattr(workers.TrialReporter, "epoch_start", ctrl_c_in_the_second_trial)
    result = run_cli("sweep", *options)
    assert result.exit_code == 130 and "resumes from its last completed epoch" in result.stderr
    first_epoch = metrics(out / "lr-0.001")
    assert len(first_epoch) == 1 and len(metrics(out / "lr-0.01")) == 2

    monkeypatch.setattr(workers.TrialReporter, "epoch_start", real_epoch_start)
    result = run_cli("sweep", *options)
    assert result.exit_code == 0, result.output
    assert started(result.stdout) == Counter({"lr-0.001": 1}) and "lr-0.001: resumed" in result.stdout
    assert "lr-0.001: epoch 1/2" not in result.stdout      # resumed, not trained again from the start
    resumed = metrics(out / "lr-0.001")
    assert [r["epoch"] for r in resumed] == [1, 2] and resumed[0] == first_epoch[0]
    done = Counter(t.user_attrs["folder"] for t in trials(out) if t.state.name == "COMPLETE")
    assert done == Counter({"lr-0.01": 1, "lr-0.001": 1})


def sweep_processes(out, *extra, workers=("1", "2")):
    """Several `fmnist sweep` commands on one grid at once, as on several machines (one with --workers 2)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "fmnist.cli", "sweep", *GRID, "--out", str(out),
                                   "--workers", n, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for n in workers]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stdout + stderr
    return "".join(stdout for stdout, _ in outputs)


def test_concurrent_workers_on_the_journal_run_each_point_exactly_once(tmp_path, real_data):
    out = tmp_path / "shared"
    output = sweep_processes(out)
    assert started(output) == Counter({folder: 1 for folder in FOLDERS}), output
    assert complete_once(trials(out)) and len(trials(out)) == 4


def test_workers_that_start_together_on_a_new_database_all_open_it(tmp_path, postgres_url):
    """Each worker's first look at a database without Optuna's tables creates them; started together, all but
    one of them lose that race in PostgreSQL (UniqueViolation) and must open it on a second try."""
    import sqlalchemy

    schema = f"fresh_{uuid.uuid4().hex[:8]}"   # a new, empty database as far as Optuna can see
    engine = sqlalchemy.create_engine(studies._with_driver(postgres_url))
    with engine.begin() as db:
        db.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    try:
        for _ in range(3):   # the race is lost often, not every time: three rounds of six at once
            with engine.begin() as db:
                db.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema}"))
            with ThreadPoolExecutor(6) as pool:
                storages = list(pool.map(lambda _: studies.open_storage(url, tmp_path), range(6)))
            assert len(storages) == 6 and all(storage.get_all_studies() == [] for storage in storages)
    finally:
        with engine.begin() as db:
            db.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))


def test_concurrent_workers_on_postgresql_run_each_point_exactly_once(tmp_path, real_data, postgres_url):
    out, study = tmp_path / "pg", f"test-{uuid.uuid4().hex[:8]}"
    output = sweep_processes(out, "--storage", postgres_url, "--study", study)
    assert started(output) == Counter({folder: 1 for folder in FOLDERS}), output
    stored = trials(out, study, postgres_url)
    assert complete_once(stored) and len(stored) == 4
    assert not (out / studies.JOURNAL).exists()   # the database held the sweep, not a file
    shown = run_cli("sweep", "--show", "--storage", postgres_url, "--study", study, "--out", tmp_path / "elsewhere")
    assert shown.exit_code == 0 and all(folder in shown.stdout for folder in FOLDERS)


def test_a_search_samples_ranges_for_the_number_of_trials(tmp_path, real_data):
    out = tmp_path / "search"
    options = ["--lr", "1e-3..1e-2", "--label-smoothing", "0..0.2", "--trials", "3", "--epochs", "1",
               "--batch-size", "2000", "--device", "cpu", "--out", out]
    result = run_cli("sweep", *options)
    assert result.exit_code == 0, result.output
    searched = trials(out)
    assert [t.state.name for t in searched] == ["COMPLETE"] * 3
    for t in searched:
        assert 1e-3 <= t.params["lr"] <= 1e-2 and 0 <= t.params["label_smoothing"] <= 0.2
        config = torch.load(out / t.user_attrs["folder"] / "fmnist.pt", weights_only=True)["config"]
        assert config["lr"] == t.params["lr"] and config["label_smoothing"] == t.params["label_smoothing"]
    assert len({t.params["lr"] for t in searched}) == 3
    again = run_cli("sweep", *options)
    assert again.exit_code == 0 and not started(again.stdout) and len(trials(out)) == 3


def test_prune_stops_a_trial_that_falls_behind(tmp_path, real_data):
    out = tmp_path / "prune"
    result = run_cli("sweep", "--lr", "0.01,0.005,0.003,0.00001", "--epochs", "3", "--batch-size", "2000",
                     "--prune", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    states = {t.user_attrs["folder"]: t.state.name for t in trials(out)}
    assert states == {"lr-0.01": "COMPLETE", "lr-0.005": "COMPLETE", "lr-0.003": "COMPLETE", "lr-1e-05": "PRUNED"}
    assert len(metrics(out / "lr-1e-05")) == 2 and "lr-1e-05: pruned after epoch 2" in result.stdout
    with open(out / "results.csv") as f:
        assert [row["state"] for row in csv.DictReader(f)][-1] == "pruned"


def test_another_sweep_in_the_same_folder_is_refused(tmp_path, real_data):
    out = tmp_path / "one"
    assert run_cli("sweep", "--lr", "0.01", "--epochs", "1", "--batch-size", "2000", "--out", out).exit_code == 0
    one_line_error(run_cli("sweep", "--lr", "0.02", "--epochs", "1", "--batch-size", "2000", "--out", out),
                   "holds another sweep", "give another --out")


@pytest.mark.parametrize("args, message", [
    (["--lr", ","], "--lr: give one or more values"),
    (["--lr", ""], "--lr: give one or more values"),
    (["--lr", "0.1,,0.2"], "--lr 0.1,,0.2: an empty value in the list"),
    (["--lr", "0.1..0.01", "--trials", "2"], "--lr 0.1..0.01: a range needs lo < hi"),
    (["--lr", "abc"], "--lr: 'abc' is not one of the values it takes (numbers)"),
    (["--schedule", "constant..cosine"], "--schedule constant..cosine: a range lo..hi is for numbers"),
    (["--flip", "maybe"], "--flip: 'maybe' is not one of the values it takes (on or off)"),
    (["--batch-size", "0,100"], "--batch-size 0: must be 1 or more"),
    (["--lr", "0..0.1", "--trials", "2"], "--lr 0.0: must be greater than 0"),
    (["--recipe", "tuned,best"], "--recipe best: choose one of tuned, seed"),
    (["--seeds", "1,1"], "--seeds 1,1: a value is repeated"),
    (["--lr", "1e-4..1e-2"], "a range lo..hi is searched: say how many trials with --trials N"),
    (["--lr", "0.1,0.2", "--trials", "3"], "--trials is for a search over ranges"),
    (["--lr", "0.1", "--workers", "0"], "--workers 0: must be 1 or more"),
    (["--lr", "0.1", "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot use this database"),
    (["--show"], "no sweep in"),
])
def test_bad_sweep_input_is_one_line(args, message, tmp_path):
    result = run_cli("sweep", "--out", tmp_path / "bad", *args)
    one_line_error(result, message)
    assert not list((tmp_path).glob("bad/*/fmnist.pt"))


def test_an_unknown_option_is_one_line(tmp_path):
    result = run_cli("sweep", "--learning-rate", "0.1", "--out", tmp_path)
    one_line_error(result, "No such option: --learning-rate", "sweep --help`")
    assert result.exit_code == 2


def test_train_writes_tensorboard_events_of_every_epoch(tmp_path, real_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result = run_cli("train", "--recipe", "seed", "--epochs", "2", "--batch-size", "2000", "--device", "cpu",
                     "--weight-decay", "0.01", "--out", tmp_path, "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    rows = metrics(tmp_path)
    for tag, key in (("test/accuracy", "test_accuracy"), ("train/loss", "train_loss")):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(r["epoch"], pytest.approx(r[key])) for r in rows]
    content = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    recorded = hparams.session_start_info.hparams
    assert set(recorded) == set(LEARNED) and recorded["weight_decay"].number_value == pytest.approx(0.01)
    assert recorded["lr"].number_value == pytest.approx(0.01) and recorded["schedule"].string_value == "constant"
    checkpoint = torch.load(tmp_path / "fmnist.pt", weights_only=True)   # the run's config keeps it too
    assert checkpoint["config"]["weight_decay"] == 0.01
    optimizer = checkpoint["training"]["optimizer"]["param_groups"][0]
    assert optimizer["weight_decay"] == 0.01 and optimizer["decoupled_weight_decay"] is True


def test_tensorboard_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    one_line_error(run_cli("train", "--out", tmp_path, "--tensorboard", tmp_path / "tb"),
                   'pip install "fmnist[tensorboard]"')


def test_results_csv_rounds_what_it_shows_and_keeps_the_swept_values(tmp_path):
    plan = plans.Sweep(values={"lr": plans.Range(1e-4, 1e-2), "epochs": [2]}, trials=2)
    done = {"folder": "trial-0000", "state": "complete", "lr": 0.0031622776601683794, "final_test_accuracy":
            0.8682000041007996, "best_test_accuracy": 0.8700999999046326, "best_epoch": 1, "epochs_done": 2,
            "train_seconds": 12.345678, "samples_per_second": 9719.5012345}
    waiting = {"folder": "trial-0001", "state": "waiting", "lr": 0.0001, **{c: None for c in results.COLUMNS}}
    results.write_csv([done, waiting], plan, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text().splitlines() == [
        "folder,state,lr,final_test_accuracy,best_test_accuracy,best_epoch,epochs_done,train_seconds,"
        "samples_per_second",
        "trial-0000,complete,0.0031622776601683794,0.8682,0.8701,1,2,12.35,9720",   # lr: what the trial trained with
        "trial-0001,waiting,0.0001,,,,,,"]


# ---- killed workers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_a_worker_killed_mid_trial_is_resumed_by_the_same_command(tmp_path, real_data, storage, request):
    """kill -9 of a sweep mid-trial, then the same command: the trial resumes from its last epoch (not trained
    again), and every grid point ends COMPLETE exactly once."""
    import signal
    import time

    out = tmp_path / "killed"
    extra = []
    if storage == "postgresql":
        extra = ["--storage", request.getfixturevalue("postgres_url"), "--study", f"test-{uuid.uuid4().hex[:8]}"]
    options = ["--lr", "0.01,0.001", "--epochs", "2", "--batch-size", "2000", "--device", "cpu", "--out", str(out),
               *extra]
    worker = subprocess.Popen([sys.executable, "-m", "fmnist.cli", "sweep", *options], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(p.is_file() and len(p.read_text().splitlines()) == 1 for p in out.glob("*/metrics.jsonl")):
        assert worker.poll() is None and time.monotonic() < deadline, worker.stdout.read()
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [cut] = [p.parent for p in out.glob("*/metrics.jsonl") if len(p.read_text().splitlines()) == 1]
    first_epoch = metrics(cut)

    result = run_cli("sweep", *options)
    assert result.exit_code == 0, result.output
    assert f"{cut.name}: resumed" in result.stdout and f"{cut.name}: epoch 1/2" not in result.stdout
    resumed = metrics(cut)
    assert [r["epoch"] for r in resumed] == [1, 2] and resumed[0] == first_epoch[0]
    stored = trials(out, extra[-1] if extra else None, extra[1] if extra else None)
    done = Counter(t.user_attrs["folder"] for t in stored if t.state.name == "COMPLETE")
    assert done == Counter({"lr-0.01": 1, "lr-0.001": 1})


def test_a_worker_killed_holding_the_journals_lock_does_not_stop_the_others(tmp_path, real_data):
    """A lock file left by a worker killed mid-write: the next command takes it over after the grace period
    (fmnist.sweep.study.JOURNAL_LOCK_GRACE_SECONDS) and finishes the sweep."""
    out = tmp_path / "locked"
    out.mkdir()
    (out / (studies.JOURNAL + ".lock")).touch()   # what a worker killed while writing leaves
    result = subprocess.run([sys.executable, "-m", "fmnist.cli", "sweep", "--lr", "0.01,0.001", "--epochs", "1",
                             "--batch-size", "2000", "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)   # not for ever
    assert result.returncode == 0 and not result.stderr, result.stdout + result.stderr
    assert not (out / (studies.JOURNAL + ".lock")).exists()
    done = Counter(t.user_attrs["folder"] for t in trials(out) if t.state.name == "COMPLETE")
    assert done == Counter({"lr-0.01": 1, "lr-0.001": 1})


def test_a_worker_elsewhere_that_stops_beating_is_released_on_postgresql(tmp_path, postgres_url):
    """A database hears each running trial's heartbeat; a trial whose worker (on another machine: its process
    cannot be looked up here) has been silent past the grace period is failed and queued again."""
    import sqlalchemy

    plan = plans.make_sweep({"lr": [0.01, 0.001]}, None, False)
    study = studies.open_study(studies.open_storage(postgres_url, tmp_path), f"test-{uuid.uuid4().hex[:8]}", plan)
    trial = workers.next_trial(study, plan)
    params = workers.suggest(trial, plan)   # as run_trial does: the trial's values and folder
    trial.set_user_attr("folder", plans.folder_name(params))
    trial.set_user_attr("worker", "another-machine:4242")
    engine = sqlalchemy.create_engine(studies._with_driver(postgres_url))
    beats = sqlalchemy.text("SELECT count(*) FROM trial_heartbeats WHERE trial_id = :id")
    with studies.Heartbeat(study, trial), engine.connect() as db:
        assert db.execute(beats, {"id": trial._trial_id}).scalar() == 1   # heard while it runs
    workers.release_stale(study)
    assert study._storage.get_trial(trial._trial_id).state.name == "RUNNING"   # recent: alive
    with engine.begin() as db:
        db.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour' "
                                   "WHERE trial_id = :id"), {"id": trial._trial_id})
    workers.release_stale(study)
    assert study._storage.get_trial(trial._trial_id).state.name == "FAIL"
    folder = plans.folder_name(params)
    again = [t for t in study.get_trials() if t.state.name == "WAITING" and t.user_attrs["folder"] == folder]
    assert [t.params for t in again] == [params]   # the same point again, into the same folder


def test_a_trial_taken_an_instant_ago_is_not_taken_for_dead(tmp_path):
    """Between a worker claiming a trial and writing its own name on it, another worker's look for dead workers
    must leave it alone: queued again, its folder would be handed out twice."""
    plan = plans.make_sweep({"lr": [0.01, 0.001]}, None, False)
    studies.quiet_optuna()
    study = studies.open_study(studies.open_storage(None, tmp_path), "instant", plan)
    taken = workers.next_trial(study, plan)   # RUNNING, with its folder, its worker not yet written
    assert taken is not None and "worker" not in taken.user_attrs
    workers.release_stale(study)
    assert Counter(t.state.name for t in study.get_trials()) == Counter({"RUNNING": 1, "WAITING": 1})
    taken.set_user_attr("worker", f"{socket.gethostname()}:{2**22 + 12345}")   # a process that is not there
    workers.release_stale(study)   # now it is dead: failed, and its point queued again, in the same folder
    states = Counter(t.state.name for t in study.get_trials())
    assert states == Counter({"FAIL": 1, "WAITING": 2})
