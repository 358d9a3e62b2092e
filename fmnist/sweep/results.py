"""A sweep's results: one row per trial folder, from the study (so any machine of the sweep can show them),
sorted by final test accuracy; written as results.csv, drawn as sweep.png."""

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist.config import train_command
from fmnist.files import atomic_path
from fmnist.sweep.plan import Sweep, trial_config

if TYPE_CHECKING:   # for hints alone: optuna is imported where a sweep runs
    import optuna

COLUMNS = ("final_test_accuracy", "best_test_accuracy", "best_epoch", "epochs_done", "train_seconds",
           "samples_per_second")
# How results.csv shows each column: a test accuracy is a count over 10,000 images, so 4 decimals lose nothing
# but float32's noise (0.8682000041007996); seconds to 0.01 s, samples/s whole. The data stays at full precision
# in each trial's metrics.jsonl (and in the study); the swept values are written as the trials trained with them.
SHOWN = {"final_test_accuracy": 4, "best_test_accuracy": 4, "train_seconds": 2, "samples_per_second": 0}


def rows(study: "optuna.Study") -> list[dict]:
    """The latest trial of each folder (a resumed trial replaces the one it continues), best first; trials
    without a result (waiting, running, failed before an epoch) last."""
    latest = {}
    for trial in study.get_trials(deepcopy=False):
        folder = trial.user_attrs.get("folder")
        if folder is not None:
            latest[folder] = trial
    table = []
    for folder, trial in latest.items():
        params = trial.params or trial.system_attrs.get("fixed_params", {})
        result = trial.user_attrs.get("result", {})
        table.append({"folder": folder, "state": trial.state.name.lower(), "trial": trial.number, **params,
                      **{column: result.get(column) for column in COLUMNS}, "curve": result.get("curve", []),
                      "error": trial.user_attrs.get("error")})
    return sorted(table, key=lambda r: (r["final_test_accuracy"] is None, -(r["final_test_accuracy"] or 0),
                                        r["folder"]))


def write_csv(table: list[dict], sweep: Sweep, path: Path) -> None:
    header = ["folder", "state", *sweep.swept, *COLUMNS]
    text = io.StringIO()
    writer = csv.DictWriter(text, header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, **{column: _rounded(row.get(column), digits) for column, digits in SHOWN.items()}}
                     for row in table)
    with atomic_path(path) as tmp:
        tmp.write_text(text.getvalue())


def _rounded(value: float | None, digits: int) -> float | int | None:
    if value is None:
        return None
    return round(value) if digits == 0 else round(value, digits)


def save(study: "optuna.Study", out: Path) -> tuple[Sweep, list[dict]]:
    """The sweep and its rows, best first; results.csv and sweep.png written beside the trials."""
    from fmnist import plots
    from fmnist.files import prepare_out

    prepare_out(out)
    sweep = Sweep.from_json(study.user_attrs["sweep"])
    table = rows(study)
    write_csv(table, sweep, out / "results.csv")
    plots.sweep(table, sweep.swept, out / "sweep.png", title=f"sweep {study.study_name}")
    return sweep, table


def best(table: list[dict]) -> dict | None:
    done = [r for r in table if r["state"] == "complete"]
    return done[0] if done else None


def reproduce(row: dict, sweep: Sweep, out: Path) -> str:
    params = {name: row[name] for name in sweep.swept}
    again = str(out / f"{row['folder']}-again")
    return train_command(trial_config(params, sweep.fixed, again), again)
