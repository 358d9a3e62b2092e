import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import run_cli


def run_cli_wide(*args: str):
    """run_cli at 200 columns, so that no help text is wrapped."""
    from fmnist.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_import_and_help_do_not_import_torch():
    code = "import sys, fmnist, fmnist.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_the_train_options():
    result = run_cli("train", "--help")
    assert result.exit_code == 0
    for option in ("--epochs", "--batch-size", "--lr", "--seed", "--device", "--compile", "--amp",
                   "--data-dir", "--out"):
        assert option in result.stdout


def test_version():
    from fmnist import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (["--epochs", "0"], "--epochs 0: must be 1 or more"),
    (["--epochs", "-3"], "--epochs -3: must be 1 or more"),
    (["--lr", "0"], "--lr 0.0: must be greater than 0"),
    (["--lr", "-1e-3"], "--lr -0.001: must be greater than 0"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu or cuda"),
    (["--shift", "-1"], "--shift -1: must be 0 to 8 pixels"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
    (["--ema", "1.5"], "--ema 1.5: must be in [0, 1), 0 for off"),
    (["--schedule", "step"], "--schedule step: choose one of constant, onecycle, cosine"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be 0 or more, 0 for off"),
    (["--recipe", "best"], "--recipe best: choose one of tuned, seed"),
])
def test_bad_train_options_are_one_line_errors(args, message, tmp_path):
    result = run_cli("train", "--out", tmp_path, *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {message}"
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    result = run_cli("train", "--device", "cuda", "--out", tmp_path)
    assert result.exit_code == 1 and "no CUDA device is available here; use --device cpu" in result.stderr


def test_unwritable_out_is_found_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("train", "--out", blocker / "sub")
    assert result.exit_code == 1 and "cannot write there" in result.stderr and "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


def test_missing_data_names_the_ways_to_get_it(tmp_path):
    result = run_cli("train", "--data-dir", tmp_path / "empty", "--out", tmp_path, "--device", "cpu")
    assert result.exit_code == 1
    assert "apt-get install dataset-fashion-mnist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_summary_gives_compile_time_apart_and_the_training_time_to_90_percent(capsys, tmp_path):
    from fmnist.cli.console import print_summary
    from fmnist.summary import summarize

    rows = [dict(epoch=epoch, train_loss=0.3, train_accuracy=0.9, test_loss=0.3, test_accuracy=accuracy,
                 train_seconds=0.25, samples_per_second=240_000, compile_seconds=compile_seconds)
            for epoch, accuracy, compile_seconds in [(1, 0.85, 7.5), (2, 0.8999, 0.0), (3, 0.9012, 0.0),
                                                     (4, 0.89, 0.0)]]
    print_summary(summarize(rows), tmp_path, seconds=12.0)
    text = capsys.readouterr().out
    assert "epoch 3, after 0.75 s of training" in text            # the first epoch at 90%, its time summed
    assert "7.5 s, once, not in the training time" in text and "1 s (the epochs' training passes)" in text


@pytest.mark.parametrize("args, message", [
    (["train", "--batch-size", "60001"], "--batch-size 60001: more than the 60,000 training images; at most 60000"),
    (["predict", "x.png", "--top", "0"], "--top 0: must be 1 to 10 (there are 10 classes)"),
    (["predict", "x.png", "--top", "20"], "--top 20: must be 1 to 10 (there are 10 classes)"),
    (["evaluate", "--plot", "confusion.bmp"], "--plot confusion.bmp: give a file ending in .png, .svg, .pdf"),
])
def test_nonsense_values_are_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {message}", result.output


def test_a_folder_where_a_file_goes_is_one_line_and_nothing_is_lost(tmp_path):
    folder = tmp_path / "already-here"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for args in (["evaluate", "--plot", folder], ["export", "--onnx", "--output", folder]):
        result = run_cli(*args)
        assert result.exit_code == 1 and f"{folder}: that is a folder; name a file in it" in result.stderr
        assert "Traceback" not in result.output
    assert (folder / "keep.txt").read_text() == "mine"


def test_a_command_that_fails_first_leaves_no_folder_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("export", "--onnx").exit_code == 1                 # no export/fmnist.pt here
    assert run_cli("train", "--data-dir", tmp_path / "no" / "data", "--out", tmp_path / "run").exit_code == 1
    assert run_cli("evaluate", "--plot", tmp_path / "plots" / "cm.png").exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_help_keeps_every_bracketed_text():
    """Help texts go through rich markup: `[tensorboard]` or `[default: tuned]` unescaped would vanish from --help."""
    import re

    import typer

    from fmnist.cli import app

    def shown(*args):
        result = run_cli_wide(*args)
        assert result.exit_code == 0, result.output
        return " ".join(result.stdout.replace("│", " ").split())   # a wrapped help text joined again

    commands = typer.main.get_command(app).commands
    assert {"train", "sweep", "export", "evaluate", "predict", "serve"} <= set(commands)
    for name, command in commands.items():
        text = shown(name, "--help")
        written = [command.help or ""] + [getattr(param, "help", None) or "" for param in command.params]
        for bracketed in re.findall(r"\[[^\]]*\]", " ".join(written)):
            assert bracketed in text, f"fmnist {name} --help lost {bracketed}"
        assert "\\[" not in text
    assert 'needs pip install "fmnist[tensorboard]".' in shown("train", "--help")
    assert "(e.g. postgresql://user:pass@host/db) [default: a journal file in --out]." in shown("sweep", "--help")


@pytest.mark.parametrize("args, option, sweep_option", [
    (["--lr", "0.01,0.003"], "--lr 0.01,0.003", "--lr 0.01,0.003"),
    (["--epochs=10..40"], "--epochs 10..40", "--epochs 10..40"),
    (["--batch-size", "100,1000"], "--batch-size 100,1000", "--batch-size 100,1000"),
    (["--seed", "0,1,2"], "--seed 0,1,2", "--seeds 0,1,2"),
    (["--schedule", "constant,onecycle"], "--schedule constant,onecycle", "--schedule constant,onecycle"),
    (["--recipe", "tuned,seed"], "--recipe tuned,seed", "--recipe tuned,seed"),
])
def test_a_list_or_range_given_to_train_points_to_sweep(args, option, sweep_option, tmp_path):
    result = run_cli("train", "--out", tmp_path / "run", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {option}: fmnist train takes one value; lists and ranges are "
                                     f"fmnist sweep's (fmnist sweep {sweep_option})")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, suggestion", [
    (["predict", "x.png", "--model", "m.onnx"], "--onnx"),
    (["serve", "--model", "m.onnx"], "--onnx"),
    (["evaluate", "--model", "m.onnx"], "--onnx or --checkpoint"),
    (["train", "--epoch", "3"], "--epochs"),
    (["train", "--learning-rate", "0.1"], "--lr"),
])
def test_a_mistyped_option_suggests_the_real_one(args, suggestion):
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: No such option: {args[-2]}; did you mean {suggestion}? (see `")
    assert result.stderr.strip().endswith(f" {args[0]} --help`)") and len(result.stderr.splitlines()) == 1


def test_exit_codes_follow_one_rule(tmp_path, monkeypatch):
    """docs/training.md's rule: 0 done; 1 a value, file or data the user can fix; 2 a command line that cannot be read
    as the command's options; 130 interrupted."""
    import typer

    from fmnist import runtime

    assert run_cli("train", "--help").exit_code == 0
    assert run_cli("train", "--epochs", "0", "--out", tmp_path).exit_code == 1                   # a value
    assert run_cli("predict", "x.png", "--onnx", tmp_path / "missing.onnx").exit_code == 1     # a file
    for args in (["--epochs"], ["--epoch", "3"], ["--epochs", "three"], ["--lr", "0.1,0.2"]):
        assert run_cli("train", "--out", tmp_path, *args).exit_code == 2, args
    for interruption in (KeyboardInterrupt, typer.Abort):   # older click turns Ctrl-C outside a command into Abort
        def interrupted(path, interruption=interruption):   # this iteration's, bound now
            raise interruption()

        monkeypatch.setattr(runtime, "session", interrupted)
        result = run_cli("predict", "x.png")
        assert result.exit_code == 130 and result.stderr.strip() == "interrupted", interruption


def summary_rows(epochs: int) -> list[dict]:
    return [dict(epoch=epoch, train_loss=0.3, train_accuracy=0.9, test_loss=0.3, test_accuracy=0.85, train_seconds=2.0,
                 samples_per_second=30_000) for epoch in range(1, epochs + 1)]


def test_summary_names_the_curves_and_the_next_step(capsys, tmp_path, monkeypatch):
    from fmnist.cli.console import print_summary
    from fmnist.summary import summarize

    monkeypatch.chdir(tmp_path)   # short paths: no table cell wraps
    print_summary(summarize(summary_rows(2)), Path("runs/a b"), seconds=5.0, trained=2)
    text = capsys.readouterr().out
    assert "runs/a b/curves.png" in text
    assert "next: export it to ONNX with fmnist export --onnx --checkpoint 'runs/a b/fmnist.pt' --output " \
           "'runs/a b/fmnist.onnx'" in text
    print_summary(summarize(summary_rows(2)), Path("export"), seconds=5.0, trained=2, data_dir=Path("/srv/fmnist"))
    assert "with fmnist export --onnx --data-dir /srv/fmnist\n" in capsys.readouterr().out   # export's defaults


def test_summary_of_a_resumed_run_says_whose_wall_time_it_gives(capsys, tmp_path, monkeypatch):
    from fmnist.cli.console import print_summary
    from fmnist.summary import summarize

    monkeypatch.chdir(tmp_path)
    print_summary(summarize(summary_rows(3)), Path("run"), seconds=4.0, trained=0)   # --resume on a finished run
    text = capsys.readouterr().out
    assert "6 s (the epochs' training passes)" in text
    assert "wall time (this command) │ 4.0 s" in text
    assert "trained by this command  │ none: the run was finished already" in text
    print_summary(summarize(summary_rows(3)), Path("run"), seconds=4.0, trained=1)
    assert "│ epoch 3 (epochs 1-2 earlier)" in capsys.readouterr().out
    print_summary(summarize(summary_rows(3)), Path("run"), seconds=4.0, trained=3)
    assert "trained by this command" not in capsys.readouterr().out   # a whole run: the wall time is all its own


def test_piped_output_has_no_blank_line_between_epochs(tmp_path, monkeypatch):
    """CliRunner's output is not a terminal, like `fmnist train | cat`: the epoch lines follow one another."""
    from fmnist import train as training

    def two_epochs(config, report, **options):   # the loop's calls to its reporter, without the training
        history = []
        for epoch in (1, 2):
            report.epoch_start(epoch, 2, 60_000)
            time.sleep(0.25)   # past the reporter's refresh interval: a step that would redraw a bar
            report.step(30_000, torch.tensor(0.5))
            history.append(dict(epoch=epoch, train_loss=0.5, train_accuracy=0.8, test_loss=0.5, test_accuracy=0.8,
                                train_seconds=1.0, samples_per_second=60_000.0))
            report.epoch_end(history[-1])
        return history

    monkeypatch.setattr(training, "train", two_epochs)
    result = run_cli("train", "--epochs", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == ["epoch    train loss  train acc  test loss  test acc  train s  samples/s",
                         "1/2          0.5000     80.00%     0.5000    80.00%        1     60,000",
                         "2/2          0.5000     80.00%     0.5000    80.00%        1     60,000"], lines[:4]


def test_epoch_lines_fit_80_columns_at_any_epoch_count_and_speed():
    from fmnist.cli.console import EPOCH_COLUMNS, epoch_cells, epoch_line

    row = dict(epoch=100, train_loss=12.3456, train_accuracy=1.0, test_loss=10.5, test_accuracy=1.0,
               train_seconds=1234.6, samples_per_second=1_234_567.0)
    lines = [epoch_line(EPOCH_COLUMNS), epoch_line(epoch_cells(row, 100))]
    assert max(map(len, lines)) <= 80 and len(lines[0]) == len(lines[1]), lines
    assert lines[1].split() == ["100/100", "12.3456", "100.00%", "10.5000", "100.00%", "1,235", "1,234,567"]


def sweep_rows() -> list[dict]:
    """A grid of three options as results.rows gives it: done trials, best first, then one waiting."""
    rows = [{"lr": lr, "batch_size": bs, "seed": seed, "final_test_accuracy": 0.9124 - i / 100,
             "best_test_accuracy": 0.9131, "best_epoch": 28, "epochs_done": 30, "train_seconds": 57.3,
             "samples_per_second": 31415.9, "state": "complete", "folder": f"lr-{lr}_batch-size-{bs}_seed-{seed}"}
            for i, (lr, bs, seed) in enumerate([(0.01, 100, 0), (0.005, 1000, 1), (0.0005, 1000, 0)])]
    return rows + [{**rows[0], "lr": 0.1, "folder": "lr-0.1_batch-size-100_seed-0", "state": "waiting",
                    **dict.fromkeys(("final_test_accuracy", "best_test_accuracy", "best_epoch", "epochs_done",
                                     "train_seconds", "samples_per_second"))}]


@pytest.mark.parametrize("width", [80, 160])
def test_the_sweep_table_fits_its_width_and_cuts_no_value(width):
    from rich.console import Console

    from fmnist.cli.console import sweep_table

    console = Console(width=width, record=True)
    console.print(sweep_table(sweep_rows(), ["lr", "batch_size", "seed"], "fmnist sweep lr-bs", width))
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    assert not any("…" in line for line in lines), lines
    rows = [line.split() for line in lines if line.lstrip().startswith("0.0")]
    assert rows[0][:9] == ["0.01", "100", "0", "91.24%", "91.31%", "(28)", "30", "57.3", "31,416"], lines
    assert rows[0][9] == "complete" and rows[-1][:3] == ["0.0005", "1000", "0"]
    if width == 160:   # room for the folders
        assert rows[0][-1] == "lr-0.01_batch-size-100_seed-0"
    else:              # the table says where they are
        assert any("(e.g. lr-0.01_batch-size-100_seed-0) is in results.csv" in line for line in lines)


@pytest.mark.parametrize("command", [[], ["train"], ["export"], ["evaluate"], ["predict"], ["serve"], ["sweep"]])
def test_help_reads_at_80_columns_with_nothing_cut_off(command):
    result = CliRunner().invoke(__import__("fmnist.cli", fromlist=["app"]).app, [*command, "--help"],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    cut = [line for line in lines if "…" in line or line.rstrip().endswith("...") and not line.startswith("Usage:")]
    assert max(map(len, lines)) <= 80 and not cut, cut
    assert "<bool>" not in result.stdout and "\\[" not in result.stdout   # no metavar of a flag, no markup escape
    if command == ["train"]:   # a description wraps in its own column, beside its option
        assert any(line.startswith("  --tensorboard") for line in lines)
        assert 'pip install "fmnist[tensorboard]"' in " ".join(line.strip() for line in lines)
