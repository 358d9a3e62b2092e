"""fmnist.files on its own, on real files: a place to write checked before the work (nothing created), atomic
replacement (whole old or whole new, never a temporary file left), and the run lock, held against this process
and against real other processes, with the exact words of every refusal."""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from fmnist import FmnistError
from fmnist.files import (
    LOCK,
    PICTURES,
    WriteError,
    atomic_path,
    file_target,
    hold,
    missing_parents,
    prepare_out,
    remove_if_empty,
)


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, relative to it, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@contextmanager
def mounted(folder: Path, *options: str):
    """A small tmpfs mounted at `folder` (root can mount one, here and under CI); skipped where mounting is not
    permitted, failed under CI."""
    folder.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=1m", *options)), "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root"
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs for the full-disk tests: {reason}")
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A tmpfs whose every byte is taken by a file named filler."""
    with mounted(tmp_path / "disk") as disk:
        with open(disk / "filler", "wb") as f:
            try:
                f.write(b"\0" * 2 * 1024 * 1024)
            except OSError:
                pass
        yield disk


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot write in: read-only by its mode, or, for root (whom modes do not stop), a
    read-only mount."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK):
        with mounted(folder, "ro"):
            yield folder
    else:
        yield folder
        folder.chmod(0o755)


# ---- prepare_out and file_target: checked first, nothing created -------------------------------------------------

def test_a_folder_to_be_made_is_accepted_and_not_made(tmp_path):
    assert prepare_out(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert listing(tmp_path) == []


def test_an_existing_folder_is_accepted(tmp_path):
    assert prepare_out(tmp_path) == tmp_path


def test_a_relative_folder_is_checked_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_out("runs/first") == Path("runs/first")
    assert listing(tmp_path) == []


def test_a_folder_under_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(FmnistError) as caught:
        prepare_out(tmp_path / "notes" / "run")
    assert str(caught.value) == (f"{tmp_path}/notes/run: cannot write there ({tmp_path}/notes is a file, not a "
                                 "folder); choose another folder")


def test_a_folder_that_cannot_be_written_in_is_refused(unwritable):
    with pytest.raises(FmnistError) as caught:
        prepare_out(unwritable / "run")
    assert str(caught.value) == f"{unwritable}/run: cannot write there (permission denied); choose another folder"


def test_a_file_to_write_is_returned_as_a_path_and_not_made(tmp_path):
    assert file_target(str(tmp_path / "plots" / "confusion.png"), "--plot", PICTURES) == \
        tmp_path / "plots" / "confusion.png"
    assert file_target(tmp_path / "m.onnx", "--output") == tmp_path / "m.onnx"
    assert listing(tmp_path) == []


def test_the_suffix_is_checked_whatever_its_case(tmp_path):
    assert file_target(tmp_path / "CONFUSION.PNG", "--plot", PICTURES) == tmp_path / "CONFUSION.PNG"
    with pytest.raises(FmnistError) as caught:
        file_target(tmp_path / "confusion.jpg", "--plot", PICTURES)
    assert str(caught.value) == f"--plot {tmp_path}/confusion.jpg: give a file ending in .png, .svg, .pdf"


def test_a_folder_given_for_a_file_is_refused_with_an_example_of_the_first_suffix(tmp_path):
    with pytest.raises(FmnistError) as caught:
        file_target(tmp_path, "--plot", PICTURES)
    assert str(caught.value) == f"--plot {tmp_path}: that is a folder; name a file in it, e.g. {tmp_path}/out.png"


def test_a_folder_given_for_a_file_of_any_kind_is_refused_with_an_example(tmp_path):
    with pytest.raises(FmnistError) as caught:
        file_target(tmp_path, "--output")
    assert str(caught.value) == f"--output {tmp_path}: that is a folder; name a file in it, e.g. {tmp_path}/out"


def test_a_file_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(FmnistError) as caught:
        file_target(tmp_path / "notes" / "m.onnx", "--output")
    assert str(caught.value) == (f"{tmp_path}/notes: cannot write there ({tmp_path}/notes is a file, not a folder); "
                                 "choose another folder")


# ---- missing_parents and remove_if_empty ------------------------------------------------------------------------

def test_the_missing_folders_are_listed_deepest_first(tmp_path):
    assert missing_parents(tmp_path / "a" / "b" / "c") == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b",
                                                           tmp_path / "a"]
    assert missing_parents(tmp_path) == []


def test_the_missing_folders_of_a_relative_path_stop_at_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert missing_parents(Path("a/b")) == [Path("a/b"), Path("a")]


def test_the_created_folders_are_removed_up_to_the_first_that_is_not_empty(tmp_path):
    created = missing_parents(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "kept.txt").write_text("x")
    remove_if_empty(created)
    assert listing(tmp_path) == ["a", "a/b", "a/b/kept.txt"]


def test_the_created_folders_are_all_removed_when_empty(tmp_path):
    created = missing_parents(tmp_path / "a" / "b")
    (tmp_path / "a" / "b").mkdir(parents=True)
    remove_if_empty(created)
    assert listing(tmp_path) == []


# ---- atomic_path ------------------------------------------------------------------------------------------------

def test_a_new_file_appears_whole_with_its_folders_and_no_temporary_file(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.jsonl"
    with atomic_path(target) as tmp:
        assert tmp == tmp_path / "a" / "b" / f".metrics.jsonl.tmp-{os.getpid()}"   # beside it: a rename
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["a", "a/b", "a/b/metrics.jsonl"]


def test_a_file_there_is_replaced_whole(tmp_path):
    target = tmp_path / "fmnist.pt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["fmnist.pt"]


def test_a_block_that_fails_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    target = tmp_path / "fmnist.pt"
    target.write_text("old")
    with pytest.raises(ValueError, match="^a failed check$"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("a failed check")
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["fmnist.pt"]


def test_a_block_that_writes_nothing_is_a_write_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "fmnist.pt"
    target.write_text("old")
    with pytest.raises(WriteError) as caught:
        with atomic_path(target):
            pass
    assert str(caught.value) == f"{target}: cannot write it (No such file or directory); anything already there is kept"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["fmnist.pt"]


def test_a_file_under_a_file_is_a_write_error(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(WriteError) as caught:
        with atomic_path(tmp_path / "notes" / "fmnist.pt") as tmp:
            tmp.write_text("new")
    assert str(caught.value) == f"{tmp_path}/notes/fmnist.pt: cannot write it (File exists); anything already there " \
                                "is kept"
    assert listing(tmp_path) == ["notes"]


def test_a_read_only_disk_is_a_write_error(tmp_path):
    with mounted(tmp_path / "disk", "ro") as disk:
        with pytest.raises(WriteError) as caught:
            with atomic_path(disk / "fmnist.pt") as tmp:
                tmp.write_text("new")
        assert str(caught.value) == f"{disk}/fmnist.pt: cannot write it (Read-only file system); anything already " \
                                    "there is kept"
        assert listing(disk) == []


def test_an_os_error_without_a_reason_is_told_as_it_is(tmp_path):
    with pytest.raises(WriteError) as caught:
        with atomic_path(tmp_path / "fmnist.pt") as tmp:
            tmp.write_text("half")
            raise OSError("the device went away")
    assert str(caught.value) == f"{tmp_path}/fmnist.pt: cannot write it (the device went away); anything already " \
                                "there is kept"
    assert listing(tmp_path) == []


def test_a_full_disk_is_a_write_error_and_keeps_the_old_file(full_disk):
    target = full_disk / "fmnist.pt"
    os.truncate(full_disk / "filler", (full_disk / "filler").stat().st_size - 8192)   # room for the old file only
    target.write_bytes(b"o" * 4096)
    with pytest.raises(WriteError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"n" * 256 * 1024)
    assert str(caught.value) == f"{target}: cannot write it (No space left on device); anything already there is kept"
    assert target.read_bytes() == b"o" * 4096
    assert listing(full_disk) == ["filler", "fmnist.pt"]


# ---- hold: one run per folder -----------------------------------------------------------------------------------

COMMAND = ["fmnist", "train", "--epochs", "3", "--out", "run"]


def lock_of(folder: Path) -> dict:
    return json.loads((folder / LOCK).read_text())


def clock(since: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(since))


def test_a_held_folder_is_made_and_its_lock_says_who_holds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", COMMAND)
    folder = tmp_path / "a" / "run"
    before, umask = time.time(), os.umask(0)
    try:
        with hold(folder) as held:
            after = time.time()
            assert held == folder and listing(tmp_path) == ["a", "a/run", f"a/run/{LOCK}"]
            assert (folder / LOCK).stat().st_mode & 0o777 == 0o644
            holder = lock_of(folder)
            assert holder == {"pid": os.getpid(), "command": "fmnist train --epochs 3 --out run",
                              "since": holder["since"]}
            assert before <= holder["since"] <= after
    finally:
        os.umask(umask)
    assert listing(tmp_path) == []   # the run wrote nothing: the folders it made are gone with the lock


def test_a_run_that_wrote_keeps_its_folder_without_the_lock(tmp_path):
    with hold(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run" / "fmnist.pt").write_text("x")
    assert listing(tmp_path) == ["a", "a/run", "a/run/fmnist.pt"]


def test_a_folder_that_was_there_stays_when_the_run_wrote_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    with hold(tmp_path / "run"):
        pass
    assert listing(tmp_path) == ["run"]


def test_a_second_hold_of_a_held_folder_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", COMMAND)
    with hold(tmp_path) as folder:
        holder = lock_of(folder)
        with pytest.raises(FmnistError) as caught:
            with hold(folder):
                pass
        assert lock_of(folder) == holder   # the refused run changed nothing
    assert str(caught.value) == (f"{tmp_path} is in use by another fmnist run (process {os.getpid()}, `fmnist train "
                                 f"--epochs 3 --out run`, since {clock(holder['since'])}); wait for it to end, or "
                                 "choose another --out")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert listing(tmp_path) == []


HOLDER = """
import fcntl, os, sys
from pathlib import Path
from fmnist.files import hold
folder, written = Path(sys.argv[1]), sys.argv[2:]
if written:                                       # a lock taken by hand, with what it has written so far
    fd = os.open(folder / ".fmnist.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, written[0].encode())
    print("held", flush=True)
    sys.stdin.readline()
    sys.exit()
sys.argv = ["fmnist", "train", "--out", str(folder)]
while True:                                       # fmnist's own lock, let go, and taken again on "again"
    with hold(folder):
        print("held", flush=True)
        line = sys.stdin.readline()
    print("released", flush=True)
    if line != "again\\n":
        break
"""


class Holder:
    """Another process holding `folder`: with fmnist's own hold, or with a lock taken by hand that has `written`
    in it (a run still starting has written nothing)."""

    def __init__(self, folder: Path, *written: str):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), *written], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.pid, self.leaving = self.process.pid, False
        self.expect("held")

    def expect(self, line: str) -> None:
        got = self.process.stdout.readline().strip()
        assert got == line, f"the holder said {got!r}, not {line!r}"

    def say(self, line: str) -> None:
        self.leaving = line == "bye"
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        if not self.leaving:
            self.say("bye")
        assert self.process.wait(30) == 0
        self.process.stdin.close()
        self.process.stdout.close()


def refusal(folder: Path) -> str:
    with pytest.raises(FmnistError) as caught:
        with hold(folder):
            pass
    return str(caught.value)


def test_a_folder_held_by_another_process_is_refused_naming_it(tmp_path):
    with Holder(tmp_path) as other:
        since = clock(lock_of(tmp_path)["since"])
        assert refusal(tmp_path) == (f"{tmp_path} is in use by another fmnist run (process {other.pid}, `fmnist train "
                                     f"--out {tmp_path}`, since {since}); wait for it to end, or choose another --out")
        assert lock_of(tmp_path)["pid"] == other.pid
    with hold(tmp_path):   # once it has ended, the folder is free
        assert lock_of(tmp_path)["pid"] == os.getpid()


def test_the_refusal_tells_the_time_the_holder_started(tmp_path):
    content = json.dumps({"pid": 12345, "command": "fmnist sweep --out s", "since": 1_000_000_000.0})
    with Holder(tmp_path, content):
        assert refusal(tmp_path) == (f"{tmp_path} is in use by another fmnist run (process 12345, `fmnist sweep "
                                     f"--out s`, since {clock(1_000_000_000.0)}); wait for it to end, or choose "
                                     "another --out")


@pytest.mark.parametrize("content", ["", '{"pid": 12', '{"pid": 12}', "[1, 2]", '{"pid": 1, "command": "x", '
                                     '"since": "noon"}'], ids=["empty", "half", "no-command", "a-list", "no-time"])
def test_a_holder_that_has_not_said_who_it_is_is_a_process_that_is_starting(tmp_path, content):
    with Holder(tmp_path, content):
        assert refusal(tmp_path) == (f"{tmp_path} is in use by another fmnist run (a process that is starting); wait "
                                     "for it to end, or choose another --out")


def test_the_lock_of_a_killed_run_is_taken_over_and_rewritten_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", COMMAND)
    stale = {"pid": 99999, "command": "fmnist train --epochs 30 " + "--lr 0.001 " * 50, "since": 1.0}
    (tmp_path / LOCK).write_text(json.dumps(stale))   # no process holds it: the kernel let it go
    with hold(tmp_path):
        assert lock_of(tmp_path)["pid"] == os.getpid()   # ours, whole: nothing of the longer one left after it
    assert listing(tmp_path) == []


def test_a_lock_file_deleted_during_the_run_is_no_error_on_the_way_out(tmp_path):
    with hold(tmp_path / "run"):
        (tmp_path / "run" / LOCK).unlink()
    assert listing(tmp_path) == []


class AtFlock:
    """Calls `action` as this thread calls fcntl.flock for the first time: what another process does between
    the lock file's open and its lock, made to happen there (a profile hook, no change to the code)."""

    def __init__(self, action):
        import fcntl

        self.flock, self.action, self.done = fcntl.flock, action, False

    def __call__(self, frame, event, arg) -> None:
        if event == "c_call" and arg is self.flock and not self.done:
            self.done = True
            self.action()

    def __enter__(self):
        sys.setprofile(self)

    def __exit__(self, *_) -> None:
        sys.setprofile(None)
        assert self.done


def test_a_holder_that_lets_go_as_the_file_is_opened_leaves_the_lock_to_a_new_file(tmp_path):
    """The file we opened is the one it removed on its way out: we lock the one that is there now."""
    with Holder(tmp_path) as other:
        def let_go() -> None:
            other.say("bye")
            other.expect("released")

        with AtFlock(let_go), hold(tmp_path):
            assert lock_of(tmp_path)["pid"] == os.getpid()
            assert listing(tmp_path) == [LOCK]
    assert listing(tmp_path) == []


def test_a_run_that_takes_the_lock_as_the_file_is_opened_is_seen(tmp_path):
    """The holder lets go and takes the folder again with a new lock file before we lock the old one: we are
    refused, not two runs in one folder."""
    with Holder(tmp_path) as other:
        def take_again() -> None:
            other.say("again")
            other.expect("released")
            other.expect("held")

        with AtFlock(take_again):
            message = refusal(tmp_path)
        since = clock(lock_of(tmp_path)["since"])
        assert message == (f"{tmp_path} is in use by another fmnist run (process {other.pid}, `fmnist train --out "
                           f"{tmp_path}`, since {since}); wait for it to end, or choose another --out")
        assert lock_of(tmp_path)["pid"] == other.pid


def test_a_folder_under_a_file_is_a_write_error(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(WriteError) as caught:
        with hold(tmp_path / "notes" / "run"):
            pass
    assert str(caught.value) == f"{tmp_path}/notes/run: cannot write there (Not a directory); choose another --out"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert listing(tmp_path) == ["notes"]


def test_a_full_disk_as_the_lock_is_written_leaves_nothing_of_the_run(full_disk):
    with pytest.raises(WriteError) as caught:
        with hold(full_disk / "a" / "run"):
            pass
    assert str(caught.value) == f"{full_disk}/a/run: cannot write there (No space left on device); choose another --out"
    assert listing(full_disk) == ["filler"]


def test_without_flock_as_on_windows_the_folder_is_given_unguarded(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)   # `import fcntl` fails, as it does on Windows
    with hold(tmp_path / "run") as folder:
        assert folder == tmp_path / "run"
        assert listing(tmp_path) == []
    assert listing(tmp_path) == []
