"""How a command line that cannot be read, a problem the user can fix, and an interruption each end: one
`error:` line (or the stop's own words) and the exit code of docs/training.md's rule: 0 done, 1 a value, file
or data the user can fix, 2 a command line that cannot be read as the command's options, 130 Ctrl-C, 143
SIGTERM.
"""

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer
import typer.core

from fmnist import FmnistError, Terminated
from fmnist.cli.console import err, out, print_error
from fmnist.config import LEARNED, TrainConfig, flag

try:
    from typer import TyperException as UsageProblem  # typer >= 0.20 carries its own click
except ImportError:                                   # older typer: click's
    from click import ClickException as UsageProblem  # type: ignore[assignment]  # mypy reads the newer typer


class OneLineUsageErrors(typer.core.TyperGroup):
    """A mistyped command line (an unknown option, a missing value) is one `error:` line, like every other
    error of fmnist, rather than click's usage block and boxed message; exit code 2."""

    # The ignore: click's main has windows_expand_args after standalone_mode; this one takes it, and whatever
    # else a click version adds, in **extra and passes it on.
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:   # older click's Ctrl-C outside a command (newer typer's exits 130 by itself)
            err.print("interrupted", highlight=False)
            sys.exit(130)
        except UsageProblem as e:   # UsageError, BadParameter, NoSuchOption...
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":   # `fmnist` alone: the help
                out.print(ctx.get_help() if ctx else "", highlight=False)
            else:
                print_error(usage_message(e, ctx, sys.argv[1:] if args is None else list(args)))
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


# Options that people bring from other tools; click's close matches (difflib) do not find these.
ALIASES = {"--model": ("--onnx", "--checkpoint"), "--learning-rate": ("--lr",)}
# train's options that take a value and that fmnist sweep takes as lists or ranges (train's --seed is sweep's
# --seeds); the on/off ones take none
SWEPT = ("--recipe", *(flag(name) for name in LEARNED if not isinstance(getattr(TrainConfig(), name), bool)))


def usage_message(e, ctx, args: list[str]) -> str:
    """click's one-line message for a mistyped command line, and what fmnist knows beside it: a list or range
    given to `train` is `fmnist sweep`'s; the option that an unknown one probably meant."""
    listed = _list_for_sweep(args) if ctx is not None and ctx.command.name == "train" else None
    if listed:
        return listed
    message = e.format_message()
    if type(e).__name__ == "NoSuchOption" and ctx is not None:
        options = {name for param in ctx.command.params for name in param.opts}
        meant = [name for name in ALIASES.get(e.option_name, ()) if name in options] or list(e.possibilities or ())
        either = ", ".join(meant[:-1]) + " or " + meant[-1] if len(meant) > 1 else "".join(meant)   # best first
        message = e.message + (f"; did you mean {either}?" if meant else "")
    return message + (f" (see `{ctx.command_path} --help`)" if ctx else "")


def _list_for_sweep(args: list[str]) -> str | None:
    """`fmnist train --lr 0.01,0.003`: train takes one value per option; say that lists and ranges are the sweep's."""
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option not in SWEPT:
            continue
        value = value if equals else (args[i + 1] if i + 1 < len(args) else "")
        if "," in value or ".." in value:
            sweep_option = "--seeds" if option == "--seed" else option
            return (f"{option} {value}: fmnist train takes one value; lists and ranges are fmnist sweep's "
                    f"(fmnist sweep {sweep_option} {value})")
    return None


def stopped(interruption: KeyboardInterrupt) -> tuple[str, int]:
    """What an interrupted command says, and its exit code: Ctrl-C's or SIGTERM's."""
    return ("terminated", 143) if isinstance(interruption, Terminated) else ("interrupted", 130)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated (Python's default lets the process die without a word)."""
    if threading.current_thread() is not threading.main_thread():   # signals are the main thread's alone
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


P = ParamSpec("P")
R = TypeVar("R")


def friendly(command: Callable[P, R]) -> Callable[P, R]:
    """Run a command so that a problem the user can fix is one line on stderr and exit code 1, not a
    traceback. FMNIST_DEBUG=1 (or `fmnist --debug`) shows the traceback instead."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except FmnistError as e:
            if os.environ.get("FMNIST_DEBUG"):
                raise
            print_error(e)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated)
            message, code = stopped(e)
            err.print(message, highlight=False)
            raise typer.Exit(code) from None

    return run
