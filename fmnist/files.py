"""Files written safely: a folder checked before the work starts, and atomic replacement."""

import os
from contextlib import contextmanager
from pathlib import Path

from fmnist import FmnistError


def prepare_out(folder: str | Path) -> Path:
    """`folder`, created if need be, once we know we can write in it: found out before the work, not after."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FmnistError(f"{out}: cannot write there ({e.strerror}); choose another folder") from None
    return out


@contextmanager
def atomic_path(path: Path):
    """A temporary name to write to; renamed to `path` when the block succeeds, removed when it fails.

    So an interruption or a failed check never leaves a half-written file, nor harms the one already there.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
