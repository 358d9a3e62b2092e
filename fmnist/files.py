"""Files written safely: a place checked before the work starts, and atomic replacement.

Nothing is created before there is something to write: a command that fails first leaves no empty folder.
"""

import os
from contextlib import contextmanager
from pathlib import Path

from fmnist import FmnistError

PICTURES = (".png", ".svg", ".pdf")   # what matplotlib writes for --plot and the like


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
def atomic_path(path: Path):
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
        raise FmnistError(f"{path}: cannot write it ({e.strerror or e}); anything already there is kept") from None
    finally:
        tmp.unlink(missing_ok=True)
