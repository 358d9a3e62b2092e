"""Bad input, interruption, divergence and resume: clear one-line errors, nothing lost."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fmnist import FmnistError, train as train_module
from fmnist.cli import app
from fmnist.loop import Silent
from fmnist.train import recipe, train
from tests.conftest import run_cli


def one_line_error(result, *fragments):
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


NOT_TORCH = "it is not a file that torch.save wrote (a text file, an image, or empty?)"


@pytest.mark.parametrize("content", [b"epoch 3: 91.2%\n", b"", os.urandom(1000)], ids=["text", "empty", "random"])
def test_not_a_checkpoint_says_what_is_wrong_in_words(tmp_path, content):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    result = run_cli("export", "--onnx", "--checkpoint", junk, "--output", tmp_path / "m.onnx")
    one_line_error(result, f"{junk} is not a readable fmnist checkpoint: {NOT_TORCH}; pass a fmnist.pt")
    assert "Error)" not in result.stderr   # no exception class names (KeyError, EOFError...): words
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_cut_short_is_called_damaged(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:-200])   # the zip's directory at its end is gone
    one_line_error(run_cli("evaluate", "--checkpoint", path),
                   f"{path} is not a readable fmnist checkpoint: the file is damaged or cut short")


def test_a_dict_without_weights_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "is not an fmnist checkpoint (no 'model' entry)")


def test_another_architecture(tmp_path):
    path = tmp_path / "resnet-ish.pt"
    torch.save({"model": torch.nn.Linear(784, 10).state_dict()}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "weights of another architecture")


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_a_hostile_checkpoint_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hostile.pt"
    torch.save({"model": Hostile()}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "is not a readable fmnist checkpoint: it holds Python "
                   "objects besides tensors and plain values, which are never loaded (they could run code)")
    assert not (tmp_path / "hacked").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_DEBUG", "")   # --debug sets it in this process: put it back afterwards
    one_line_error(run_cli("train", "--batch-size", "0", "--out", tmp_path), "--batch-size 0")
    result = run_cli("--debug", "train", "--batch-size", "0", "--out", tmp_path)
    assert isinstance(result.exception, FmnistError)


def test_an_image_that_cannot_be_decoded(tmp_path, trained):
    out, _ = trained
    exported = run_cli("export", "--onnx", "--checkpoint", out / "fmnist.pt", "--output", tmp_path / "m.onnx")
    assert exported.exit_code == 0
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    one_line_error(run_cli("predict", bad, "--onnx", tmp_path / "m.onnx"), f"{bad}: cannot read this image")


class InterruptAt(Silent):
    """Ctrl-C as the given epoch starts."""

    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_start(self, epoch, epochs, samples):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def quick(out, **options):
    """A short real run: batch 1000 keeps each epoch to 60 steps."""
    return recipe("tuned", epochs=3, batch_size=1000, ema=0.9, device="cpu", out=str(out), **options)


def test_interrupt_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, real_data):
    whole = train(quick(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path / "cut"), InterruptAt(3))
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and torch.load(tmp_path / "cut" / "fmnist.pt", weights_only=True)["epoch"] == 2
    resumed = train(quick(tmp_path / "cut"), resume=True)

    a = torch.load(tmp_path / "whole" / "fmnist.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "fmnist.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["training"]["model"][k], b["training"]["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("train_seconds", "samples_per_second")}  # noqa: E731
                          for r in rows]
    assert strip(resumed) == strip(whole)
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"   # what a progress bar sends a terminal as it starts, stops


def cursor_given_back(output: str, bars: int) -> bool:
    """`bars` progress bars were drawn on the terminal, and the cursor was shown again after the last."""
    return output.count(HIDE_CURSOR) == bars and output.rindex(SHOW_CURSOR) > output.rindex(HIDE_CURSOR)


def test_ctrl_c_on_a_terminal_exits_130_keeps_the_last_epoch_and_gives_the_cursor_back(tmp_path, real_data):
    """A real `fmnist train` on a pseudo-terminal, Ctrl-C's SIGINT once epoch 1 is saved and a later epoch's bar
    is drawn. What is waited for is what the run shows and writes, not a time: on a loaded machine an epoch can
    take minutes (the wait then fails, saying so, rather than sending Ctrl-C too soon), and on a fast one the next
    epoch may end before the signal lands, so the epoch kept is read from the folder and checked against what
    the run says and draws."""
    import pty
    import signal
    import subprocess
    import sys
    import threading
    import time

    terminal, its_side = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "fmnist.cli", "train", "--epochs", "3", "--batch-size", "1000",
                                "--device", "cpu", "--out", str(tmp_path)], stdin=its_side, stdout=its_side,
                               stderr=its_side, env={**os.environ, "COLUMNS": "100", "TERM": "xterm"})
    os.close(its_side)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:   # the process is gone: its side of the terminal closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 600
    while not (metrics.is_file() and b"epoch 2/3" in b"".join(chunks)):   # epoch 1 saved, epoch 2's bar drawn
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run did not reach epoch 2's bar (exit {process.poll()}, "
                        f"{time.monotonic() - deadline + 600:.0f} s): {b''.join(chunks).decode(errors='replace')}")
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    reader.join(timeout=10)
    os.close(terminal)
    output = b"".join(chunks).decode(errors="replace")
    kept = len(metrics.read_text().splitlines())   # 1, or 2 where epoch 2 ended before the signal landed
    assert process.returncode == 130 and kept in (1, 2), output
    assert f"interrupted; {tmp_path / 'fmnist.pt'} holds epoch {kept}: continue with `fmnist train --resume" in \
        output.replace("\r\n", "\n").replace("\n", "")
    assert "Traceback" not in output and cursor_given_back(output, bars=kept + 1), output
    assert torch.load(tmp_path / "fmnist.pt", weights_only=True)["epoch"] == kept


def test_sigterm_stops_train_as_ctrl_c_does_with_what_was_kept_and_exit_143(tmp_path, real_data):
    """SIGTERM, how a container or a batch system stops a run, to a real `fmnist train` process once its first
    epoch is saved: the same words as Ctrl-C (what the folder holds, how to resume), exit 143, the lock gone."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "fmnist.cli", "train", "--epochs", "20", "--batch-size", "1000",
                                "--device", "cpu", "--out", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, (stdout, stderr)
    epoch = torch.load(tmp_path / "fmnist.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < 20
    assert stderr.strip().splitlines()[-1] == (f"terminated; {tmp_path / 'fmnist.pt'} holds epoch {epoch}: continue "
                                               f"with `fmnist train --resume --out {tmp_path}`")
    assert "Traceback" not in stderr and not (tmp_path / ".fmnist.lock").exists()


def checkpoint_of(folder, epochs_done: int, epochs: int, schedule="onecycle"):
    """A real checkpoint, written by fmnist's own code, of a run that has done `epochs_done` of `epochs`
    (untrained weights: enough for what is tested with it, and no data needed)."""
    from fmnist.checkpoint import save_checkpoint
    from fmnist.loop import TrainingState

    config = recipe("tuned", epochs=epochs, schedule=schedule, device="cpu", out=str(folder))
    row = dict(epoch=0, train_loss=1.0, train_accuracy=0.5, test_loss=1.0, test_accuracy=0.5, train_seconds=1.0,
               samples_per_second=60_000.0, compile_seconds=0.0)
    history = [{**row, "epoch": e} for e in range(1, epochs_done + 1)]
    state = TrainingState(config, torch.device("cpu"), steps_per_epoch=10)
    save_checkpoint(folder / "fmnist.pt", state.network().state_dict(), state.state_dict(), config, history)
    return folder / "fmnist.pt"


def test_resume_refuses_a_changed_recipe_and_a_missing_run(tmp_path):
    one_line_error(run_cli("train", "--resume", "--out", tmp_path), "--resume: no checkpoint in")
    checkpoint_of(tmp_path, epochs_done=1, epochs=1)
    one_line_error(run_cli("train", "--resume", "--lr", "0.1", "--out", tmp_path), "leave out --lr")


def test_growing_a_scheduled_run_says_what_works(tmp_path):
    done, half = tmp_path / "done", tmp_path / "half"
    checkpoint_of(done, epochs_done=3, epochs=3)
    result = run_cli("train", "--resume", "--epochs", "5", "--out", done)
    one_line_error(result, "onecycle schedule was planned for its 3 epochs and has run them all",
                   f"train afresh: fmnist train --epochs 5 --out {done}-5-epochs")
    checkpoint_of(half, epochs_done=1, epochs=3)
    one_line_error(run_cli("train", "--resume", "--epochs", "5", "--out", half),
                   "is planned for 3 epochs; resume without --epochs to finish them, or train the longer run "
                   f"afresh: fmnist train --epochs 5 --out {half}-5-epochs")


def test_a_fresh_run_into_a_finished_one_is_refused(tmp_path, real_data):
    path = checkpoint_of(tmp_path, epochs_done=3, epochs=3)
    before = path.read_bytes()
    one_line_error(run_cli("train", "--epochs", "1", "--out", tmp_path), "holds a run already",
                   "--resume", "--overwrite")
    assert path.read_bytes() == before
    result = run_cli("train", "--epochs", "1", "--batch-size", "2000", "--overwrite", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert torch.load(path, weights_only=True)["config"]["epochs"] == 1


@pytest.mark.parametrize("entry", ["config", "training", "metrics"])
def test_a_checkpoint_without_what_resume_needs_is_one_line(tmp_path, entry):
    path = checkpoint_of(tmp_path, epochs_done=1, epochs=2, schedule="constant")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[entry] = "something else"
    torch.save(checkpoint, path)
    one_line_error(run_cli("train", "--resume", "--out", tmp_path), f"cannot be resumed: its '{entry}' entry")


def test_a_checkpoint_whose_weights_are_not_weights_is_one_line(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": [1, 2, 3], "config": {}}, path)
    one_line_error(run_cli("evaluate", "--checkpoint", path), "its 'model' is not a set of weights")
    one_line_error(run_cli("export", "--onnx", "--checkpoint", path, "--output", tmp_path / "m.onnx"),
                   "its 'model' is not a set of weights")


class NaNInEpoch:
    """Wraps fmnist.train.train_epoch: the real epoch, whose summed loss is then made NaN in epoch `epoch`,
    as a diverging run's is (a real divergence cannot be set to start in a chosen epoch)."""

    def __init__(self, real, epoch):
        self.real, self.epoch, self.calls = real, epoch, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        total_loss, correct = self.real(*args, **kwargs)
        return (total_loss * float("nan") if self.calls == self.epoch else total_loss), correct


def test_a_diverging_run_stops_with_a_command_that_runs_and_keeps_the_last_good_epoch(tmp_path, real_data,
                                                                                       monkeypatch):
    from fmnist import train as training

    monkeypatch.setattr(training, "train_epoch", NaNInEpoch(training.train_epoch, epoch=2))
    result = CliRunner().invoke(app, ["train", "--recipe", "seed", "--epochs", "3", "--batch-size", "2000", "--out",
                                      str(tmp_path)], env={"TTY_COMPATIBLE": "1"})   # rich draws as on a terminal
    assert cursor_given_back(result.stdout, bars=2), result.stdout   # epoch 2's bar stopped too: cursor back
    advice = f"fmnist train --epochs 3 --batch-size 2000 --lr 0.001 --schedule constant --shift 0 " \
             f"--label-smoothing 0.0 --out {tmp_path}-lr0.001"
    one_line_error(result, "the loss became infinite or NaN in epoch 2; train again with a lower --lr: " + advice,
                   f"{tmp_path}/fmnist.pt keeps epoch 1")
    assert torch.load(tmp_path / "fmnist.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    again = run_cli(*advice.split()[1:])          # the advice is a command that runs
    assert again.exit_code == 0, again.output


def test_pictures_are_valid_pngs(tmp_path, trained):
    out, _ = trained
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] > 400
    result = run_cli("evaluate", "--checkpoint", out / "fmnist.pt", "--plot", tmp_path / "confusion.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "confusion.png") as confusion:
        assert confusion.format == "PNG" and confusion.size[0] > 400
        confusion.verify()
    svg = run_cli("evaluate", "--checkpoint", out / "fmnist.pt", "--plot", tmp_path / "confusion.svg")
    assert svg.exit_code == 0 and (tmp_path / "confusion.svg").read_text().lstrip().startswith("<?xml")
    assert "<svg" in (tmp_path / "confusion.svg").read_text()


def test_a_truncated_data_file(tmp_path, real_data):
    for path in real_data.values():
        shutil.copy(path, tmp_path / path.name)
    labels = next(tmp_path.glob("t10k-labels-idx1-ubyte*"))
    labels.write_bytes(labels.read_bytes()[:len(labels.read_bytes()) // 2])
    result = run_cli("evaluate", "--checkpoint", "missing.pt", "--data-dir", tmp_path)
    one_line_error(result, "checkpoint missing.pt not found")      # the model is checked first, then the data
    result = run_cli("train", "--epochs", "1", "--data-dir", tmp_path, "--out", tmp_path / "out")
    one_line_error(result, str(labels))
    assert not (tmp_path / "out" / "fmnist.pt").exists()


def test_resume_on_another_kind_of_device_is_refused(tmp_path, trained):
    checkpoint = torch.load(trained[0] / "fmnist.pt", weights_only=True)
    checkpoint["training"]["device"] = "cuda"      # as if trained on a GPU
    torch.save(checkpoint, tmp_path / "fmnist.pt")
    one_line_error(run_cli("train", "--resume", "--device", "cpu", "--out", tmp_path),
                   "this run was trained on cuda: resume it with --device cuda")


def test_a_run_moved_to_another_folder_resumes_there(tmp_path, trained):
    checkpoint = torch.load(trained[0] / "fmnist.pt", weights_only=True)
    checkpoint["training"]["device"] = "cpu"
    torch.save(checkpoint, tmp_path / "fmnist.pt")
    result = run_cli("train", "--resume", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0 and f"the run in {tmp_path} has done 1 of 1 epochs" in result.stderr
    assert (tmp_path / "curves.png").exists()


# ---- one run per folder ---------------------------------------------------------------------------------------

def start_training(out, *options: str):
    """`fmnist train` in its own process; returns it once it holds its folder (the lock file names it)."""
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "fmnist.cli", "train", "--out", str(out), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((out / ".fmnist.lock").exists() and (out / ".fmnist.lock").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.05)
    return process


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path, real_data):
    first = start_training(tmp_path, "--epochs", "3", "--batch-size", "2000", "--seed", "0")
    while not (tmp_path / "metrics.jsonl").exists():   # one epoch done: there is a run to --resume
        assert first.poll() is None, first.stdout.read()
    for second in (["--epochs", "1", "--seed", "5"], ["--resume"], ["--epochs", "1", "--overwrite"]):
        result = run_cli("train", "--out", tmp_path, *second)
        one_line_error(result, f"{tmp_path} is in use by another fmnist run (process {first.pid}, ",
                       "choose another --out")
    assert first.wait(300) == 0, first.stdout.read()
    saved = torch.load(tmp_path / "fmnist.pt", weights_only=True)
    assert saved["config"]["seed"] == 0 and saved["epoch"] == 3   # the first run's, whole
    assert not (tmp_path / ".fmnist.lock").exists()


def test_the_lock_of_a_killed_run_is_taken_over_by_resume(tmp_path, real_data):
    import signal

    first = start_training(tmp_path, "--epochs", "3", "--batch-size", "2000")
    while not (tmp_path / "metrics.jsonl").exists():   # one epoch done
        assert first.poll() is None, first.stdout.read()
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / ".fmnist.lock").exists()   # left behind, naming a process that is gone
    result = run_cli("train", "--resume", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "fmnist.pt", weights_only=True)["epoch"] == 3


def test_a_sweep_trial_into_a_held_folder_is_refused(tmp_path):
    """A folder held by a run (here this process, through the same lock) is refused to a sweep's trial too."""
    from fmnist.files import hold

    with hold(tmp_path / "run"):
        result = run_cli("sweep", "--epochs", "1", "--lr", "0.01", "--out", tmp_path)
    assert "run: failed: " in result.output and "is in use by another fmnist run" in result.output


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    result = run_cli("train", "--epochs", "1", "--data-dir", tmp_path / "no-data", "--out", tmp_path / "a" / "b")
    assert result.exit_code == 1
    assert not (tmp_path / "a").exists()


def test_a_checkpoint_from_before_weight_decay_resumes_as_it_was(tmp_path):
    # Written by an fmnist without --weight-decay: no such key in its config, and Adam's groups not decoupled.
    path = checkpoint_of(tmp_path, epochs_done=2, epochs=2, schedule="constant")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["weight_decay"]
    for group in checkpoint["training"]["optimizer"]["param_groups"]:
        group["decoupled_weight_decay"] = False
    torch.save(checkpoint, path)
    config, saved = train_module.resumed_config(None, str(tmp_path), changed={})
    assert config.weight_decay == 0.0 and saved["epoch"] == 2
    result = run_cli("train", "--resume", "--out", tmp_path)
    assert result.exit_code == 0 and "nothing to resume" in result.output, result.output
