"""The workers of a sweep: each takes trials from the study until none is left, and runs each as an ordinary
`fmnist train` run in its folder.

Handing each grid point to exactly one worker: a worker takes a trial by moving it from WAITING to RUNNING,
and the storage lets exactly one worker make that move (a journal replays its log in one order; a database
updates the row under a lock). Optuna's GridSampler alone does not promise that: its docs say concurrent
workers may suggest the same point.

A trial that stops before it ends (Ctrl-C, or a worker that died) is put back in the queue with the same
values and the same folder, and the worker that takes it resumes it from its last completed epoch.
"""

import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist import FmnistError, Terminated
from fmnist.config import LEARNED, flag
from fmnist.sweep.plan import LOG_SCALE, SWEEPABLE, Range, Sweep, trial_config
from fmnist.sweep.study import Heartbeat, claim, fail, frozen, heartbeat_storage, open_storage, open_study, quiet_optuna

if TYPE_CHECKING:   # for hints alone: optuna and torch are imported where a sweep runs
    import optuna
    import torch
    from optuna.trial import FrozenTrial


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


def requeue(study: "optuna.Study", trial: "FrozenTrial") -> None:
    """Queue a trial that stopped before it ended again: same values, same folder (so it resumes there)."""
    import optuna

    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"folder": trial.user_attrs["folder"]},
        system_attrs={"fixed_params": trial.params, "retry_of": trial.number}))


def release_stale(study: "optuna.Study") -> None:
    """Fail and queue again the RUNNING trials whose worker died: on this machine, a worker process that is
    gone; on a database, also a worker that missed its heartbeats (Optuna's fail_stale_trials)."""
    import optuna
    from optuna.trial import TrialState

    if heartbeat_storage(study) is not None:
        optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "folder" in trial.user_attrs and _is_dead(trial.user_attrs.get("worker")) and fail(study, trial):
            requeue(study, trial)   # (not if another worker released it first)


def next_trial(study: "optuna.Study", sweep: Sweep) -> "optuna.Trial | None":
    """The next trial for this worker: a queued one (a grid point, or one to resume), else in a search a new
    one while fewer than --trials have been started; None when the sweep has nothing left to hand out."""
    from optuna.trial import TrialState

    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        taken = claim(study, waiting)   # exactly one worker wins each
        if taken is not None:
            return taken
    if sweep.is_search:
        assert sweep.trials is not None   # make_sweep refuses a search without --trials
        # A trial stopped and queued again counts once: of it and its retries, all but the last have FAILed (and
        # a queued retry counts too, though another worker may have put it there after the look above).
        started = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                           TrialState.WAITING))
        if len(started) < sweep.trials:
            return study.ask()
    return None


def suggest(trial: "optuna.Trial", sweep: Sweep) -> dict:
    """The trial's values of the swept options: fixed for a grid point or a resumed trial, sampled otherwise."""
    params: dict[str, object] = {}
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
class Placement:
    """Where and how the trials run; none of it changes what is learned."""
    out: Path
    device: str = "auto"
    compile: bool = False
    amp: bool = False
    data_dir: str | None = None
    tensorboard: bool = False


def work(study: "optuna.Study", sweep: Sweep, placement: Placement, say: Callable[[str], object] = print) -> int:
    """Run trials until the sweep has none left for this worker. Returns how many this worker trained."""
    count = 0
    while True:
        release_stale(study)
        trial = next_trial(study, sweep)
        if trial is None:
            return count
        run_trial(study, trial, sweep, placement, say)
        count += 1


def run_trial(study: "optuna.Study", trial: "optuna.Trial", sweep: Sweep, placement: Placement,
              say: Callable[[str], object] = print) -> None:
    """One trial: an ordinary training run in its folder, resumed there if a checkpoint exists. Its test
    accuracy is reported every epoch (the pruner may stop it); the last one is the trial's value."""
    import optuna
    from optuna.trial import TrialState

    from fmnist.checkpoint import load_checkpoint
    from fmnist.files import WriteError
    from fmnist.loop import Reporter
    from fmnist.train import train

    params = suggest(trial, sweep)
    folder = trial.user_attrs.get("folder") or f"trial-{trial.number:04d}"
    trial.set_user_attr("folder", folder)
    trial.set_user_attr("worker", worker_id())
    out = placement.out / folder
    config = trial_config(params, sweep.fixed, str(out), device=placement.device, compile=placement.compile,
                          amp=placement.amp, data_dir=placement.data_dir)
    resume = (out / "fmnist.pt").is_file()
    saved = load_checkpoint(out / "fmnist.pt", resume=True) if resume else None   # read once, for both
    if saved is not None:
        _check_same_run(saved["config"], config, out)
    lines = TrialReporter(trial, folder, say)
    report: Reporter = lines
    if placement.tensorboard:
        from fmnist.tensorboard import TensorBoardReporter

        report = TensorBoardReporter(out, config, lines)
    say(f"{folder}: {'resumed' if resume else 'started'} (trial {trial.number})")
    with Heartbeat(study, trial):
        try:
            history = train(config, report, resume=resume, checkpoint=saved)
        except optuna.TrialPruned:
            _record(trial, lines.history)
            study.tell(trial, state=TrialState.PRUNED)
            say(f"{folder}: pruned after epoch {len(lines.history)} (behind the median)")
            return
        except WriteError:        # a full disk: the machine's problem, not the values'. Kept for the next try
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, frozen(study, trial))
            raise
        except FmnistError as e:   # a real outcome of these values, e.g. a loss that became NaN: not retried
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            say(f"{folder}: failed: {e}")
            return
        except BaseException:     # Ctrl-C, or a crash: queued again, to resume from the last epoch
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, frozen(study, trial))
            raise
    _record(trial, history)
    study.tell(trial, history[-1]["test_accuracy"])
    say(f"{folder}: test accuracy {history[-1]['test_accuracy']:.2%} after {len(history)} epochs")


def _check_same_run(saved: dict, config, out: Path) -> None:
    differ = [name for name in LEARNED if saved.get(name) != getattr(config, name)]
    if differ:
        raise FmnistError(f"{out} holds a run with another {flag(differ[0])} ({saved.get(differ[0])}); move it "
                          "away or sweep into another --out")


def _record(trial, history: list[dict]) -> None:
    """The trial's summary in the study too, so that the table can be made from any machine of the sweep."""
    from fmnist.summary import summarize

    if history:
        trial.set_user_attr("result", summarize(history))


class TrialReporter:
    """fmnist.train.Reporter for one trial: a line per epoch, the epoch's test accuracy to Optuna, and a
    stop (optuna.TrialPruned) when the pruner says the trial falls behind."""

    def __init__(self, trial: "optuna.Trial", name: str, say: Callable[[str], object] = print) -> None:
        self.trial, self.name, self.say = trial, name, say
        self.history: list[dict] = []

    def note(self, message: str) -> None:
        self.say(f"{self.name}: note: {message}")

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None:
        self.epochs = epochs

    def step(self, samples_done: int, loss: "torch.Tensor") -> None: ...

    def epoch_end(self, row: dict) -> None:
        import optuna

        self.history.append(row)
        self.say(f"{self.name}: epoch {row['epoch']}/{self.epochs}  test acc {row['test_accuracy']:.2%}  "
                 f"{row['train_seconds']:.3g} s  {row['samples_per_second']:,.0f} samples/s")
        self.trial.report(row["test_accuracy"], row["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned()


def worker_process(url: str | None, name: str, sweep: Sweep, placement: Placement, threads: int) -> None:
    """The body of one of --workers N processes on this machine: torch's threads divided between them."""
    import sys

    import torch

    torch.set_num_threads(threads)
    quiet_optuna()
    try:
        work(open_study(open_storage(url, placement.out), name, sweep), sweep, placement)
    except KeyboardInterrupt:
        pass   # the trial was queued again; the parent reports the interruption
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_workers(url: str | None, name: str, sweep: Sweep, placement: Placement, workers: int) -> None:
    """--workers N: N processes, each taking trials until none is left."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")   # a fresh interpreter each: no torch state forked
    processes = [context.Process(target=worker_process, args=(url, name, sweep, placement, threads))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):   # SIGTERM reached this process alone; Ctrl-C reached the workers too
            for process in processes:
                if process.is_alive() and process.pid:
                    os.kill(process.pid, signal.SIGINT)   # each puts its trial back in the queue, as on Ctrl-C
        for process in processes:
            process.join()
        raise
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise FmnistError(f"{len(failed)} of {workers} workers stopped with an error (exit code {failed[0]}); "
                          "run the same command again to continue the sweep")


def run_sweep(sweep: Sweep, name: str, storage: str | None, placement: Placement, workers: int = 1,
              say: Callable[[str], object] = print) -> "optuna.Study":
    """The whole sweep on this machine: what every trial needs checked first (the device, the tensorboard extra,
    the data, the folder), the study opened or created, then its trials run by `workers` processes (one: this
    one, which `say`s each trial's lines). Returns the study, for the table."""
    from fmnist import data
    from fmnist.files import prepare_out
    from fmnist.train import resolve_device

    if workers < 1:
        raise FmnistError(f"--workers {workers}: must be 1 or more")
    resolve_device(placement.device)
    if placement.tensorboard:
        from fmnist.tensorboard import summary_writer  # noqa: F401  (one line now if the extra is missing)
    data.locate(placement.data_dir)
    prepare_out(placement.out).mkdir(parents=True, exist_ok=True)   # the journal and the trials' folders go here
    quiet_optuna()
    study = open_study(open_storage(storage, placement.out), name, sweep)
    if workers == 1:
        work(study, sweep, placement, say)
    else:
        run_workers(storage, name, sweep, placement, workers)
    return study
