"""A disk that is really full: a small tmpfs mounted for the test. train, export and sweep say so in one line,
with no traceback, and the file that was there before stays byte for byte."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import run_cli
from tests.test_robust import checkpoint_of, one_line_error


@pytest.fixture
def disk(tmp_path):
    """A 6 MiB tmpfs at tmp_path/disk (root can mount one, here and under CI); skipped where mounting is not
    permitted, failed under CI."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root"
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs for the full-disk tests: {reason}")
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk, leave: int) -> None:
    """Take the disk's free space, all but `leave` bytes."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    stats = os.statvfs(disk)
    assert stats.f_bavail * stats.f_frsize <= leave + stats.f_frsize


def test_train_on_a_full_disk_is_one_line_and_keeps_the_run_there(disk, real_data):
    old = checkpoint_of(disk / "run", epochs_done=1, epochs=1)
    before = old.read_bytes()
    fill(disk, leave=32 * 1024)
    result = run_cli("train", "--epochs", "1", "--batch-size", "2000", "--overwrite", "--out", disk / "run")
    one_line_error(result, "No space left on device")
    assert old.read_bytes() == before
    assert sorted(p.name for p in (disk / "run").iterdir()) == ["fmnist.pt"]   # no temporary file, no lock


def test_export_on_a_full_disk_is_one_line_and_keeps_the_model_there(disk, trained, exported):
    target = disk / "fmnist.onnx"
    shutil.copy(exported[0], target)
    before = target.read_bytes()
    fill(disk, leave=256 * 1024)
    result = run_cli("export", "--onnx", "--checkpoint", trained[0] / "fmnist.pt", "--output", target)
    one_line_error(result, "No space left on device")
    assert target.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "fmnist.onnx"]


def test_a_sweep_on_a_full_disk_is_one_line(disk, real_data):
    fill(disk, leave=64 * 1024)
    result = run_cli("sweep", "--epochs", "1", "--batch-size", "2000", "--lr", "0.01,0.003", "--out", disk / "sweep")
    one_line_error(result, "No space left on device")
    (disk / "filler").unlink()   # room again: the same command carries on, both trials end COMPLETE
    result = run_cli("sweep", "--epochs", "1", "--batch-size", "2000", "--lr", "0.01,0.003", "--out", disk / "sweep")
    assert result.exit_code == 0, result.output
    import optuna

    from fmnist.sweep.study import open_storage
    study = optuna.load_study(study_name="sweep", storage=open_storage(None, disk / "sweep"))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [0.003, 0.01]


def test_a_file_replaced_on_a_nearly_full_disk_is_whole_old_or_whole_new(disk):
    """The last step of every write: the new file, complete under its temporary name, takes the old one's place.
    A rename needs no room; a copy over the old file would truncate it first and then run out of room part
    way, losing both."""
    from fmnist.files import WriteError, atomic_path

    target = disk / "fmnist.pt"
    old, new = b"o" * 256 * 1024, b"n" * 1024 * 1024
    target.write_bytes(old)
    fill(disk, leave=len(new) + 64 * 1024)   # room for the new file once, not for a second copy of it
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(new)
    except WriteError:
        pass
    assert target.read_bytes() in (old, new)
    assert target.read_bytes() == new   # and here, where the rename had room to do nothing, the new one
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "fmnist.pt"]   # no temporary file left
