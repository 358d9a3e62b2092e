"""Files written safely: a place checked before the work starts, and atomic replacement.

Nothing is created before there is something to write: a command that fails first leaves no empty folder.
"""

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmnist import FmnistError

PICTURES = (".png", ".svg", ".pdf")   # what matplotlib writes for --plot and the like


class WriteError(FmnistError):
    """A file could not be written (a full disk, a folder gone): about the machine, not about the values a run
    was given, so a sweep stops and keeps the trial for later instead of recording it as failed."""


def prepare_out(folder: str | Path) -> Path:
    """`folder`, once we know it can be made and written in: found out before the work, not after. Nothing
    is created here; the first file written creates it (atomic_path)."""
    out = Path(folder)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FmnistError(f"{out}: cannot write there ({existing} is a file, not a folder); choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FmnistError(f"{out}: cannot write there (permission denied); choose another folder")
    return out


def file_target(path: str | Path, option: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """A file to write, checked first: not a folder, of a kind we write, in a place we can write."""
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else ""))
        raise FmnistError(f"{option} {path}: that is a folder; name a file in it, e.g. {example}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise FmnistError(f"{option} {path}: give a file ending in {', '.join(suffixes)}")
    prepare_out(path.parent)
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name to write to; renamed to `path` when the block succeeds, removed when it fails.

    So an interruption, a failed check or a full disk never leaves a half-written file, nor harms the one
    already there.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"{path}: cannot write it ({e.strerror or e}); anything already there is kept") from None
    finally:
        try:
            tmp.unlink()
        except OSError:   # not there (renamed, or never made), or its folder is read-only or not a folder
            pass


LOCK = ".fmnist.lock"


@contextmanager
def hold(folder: Path) -> Iterator[Path]:
    """The run folder for this process alone, for the whole block: a second `fmnist train` (or `--resume`, or a
    sweep's trial) into it is refused in one line naming this process.

    An exclusive flock on folder/.fmnist.lock, which the kernel releases when the process ends, however it ends:
    the lock of a killed process is not stale, the next run simply takes it. The file says who holds it, for
    the refusal's words; it is removed on the way out, and so is the folder when the run wrote nothing else.
    """
    try:
        import fcntl
    except ImportError:   # Windows: no flock; runs are not guarded there
        yield folder
        return
    created, path, fd, locked = missing_parents(folder), folder / LOCK, -1, False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FmnistError(f"{folder} is in use by another fmnist run ({holder}); wait for it to end, or "
                                  "choose another --out") from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)   # the holder removed the file as we opened it: lock the one there now
            fd, locked = -1, False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv), "since": time.time()}).encode())
    except OSError as e:   # e.g. a full disk as the lock file is written: nothing of this run stays
        if locked:
            path.unlink(missing_ok=True)
        if fd >= 0:
            os.close(fd)
        remove_if_empty(created)
        raise WriteError(f"{folder}: cannot write there ({e.strerror or e}); choose another --out") from None
    try:
        yield folder
    finally:
        path.unlink(missing_ok=True)   # while still locked: whoever opens it next makes a new one
        os.close(fd)
        remove_if_empty(created)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.read(fd, 4096) or b"{}")
        since = time.strftime("%H:%M:%S", time.localtime(holder["since"]))
        return f"process {holder['pid']}, `{holder['command']}`, since {since}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that is starting"


def missing_parents(folder: Path) -> list[Path]:
    """The folders a mkdir -p of `folder` would create, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_if_empty(created: list[Path]) -> None:
    """Remove the folders that were created (missing_parents' list), deepest first, as long as they are empty."""
    for made in created:
        try:
            made.rmdir()
        except OSError:
            return
