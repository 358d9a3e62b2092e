"""The options of `fmnist train` and `fmnist sweep` that change what is learned, made from TrainConfig's
declarations (fmnist.config.learned): a new learned option is declared there and appears here by itself."""

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from fmnist.config import LEARNED, TrainConfig, declaration, flag

TUNED = TrainConfig()   # the default recipe, whose values --help shows


def train_option(name: str) -> Any:
    """`fmnist train`'s option: one value, None where not given (the recipe's then)."""
    declared, kind, default = declaration(name), type(getattr(TUNED, name)), getattr(TUNED, name)
    if kind is bool:
        on, off = flag(name), "--no-" + flag(name)[2:]
        return Annotated[Optional[bool], typer.Option(f"{on}/{off}", help=declared.help,
                                                      show_default=on if default else off)]
    metavar = f"[{'|'.join(declared.choices)}]" if declared.choices else None
    return Annotated[Optional[kind], typer.Option(help=declared.help, metavar=metavar, show_default=str(default))]


def sweep_option(name: str) -> Any:
    """`fmnist sweep`'s option: a list of values, or for a number a range lo..hi, as text (fmnist.sweep.plan
    reads it)."""
    declared = declaration(name)
    ranges = declared.sweep in ("range", "log")
    help = f"e.g. {declared.example}" + (" (searched on a log scale)" if declared.sweep == "log" else "") + "."
    return Annotated[Optional[str], typer.Option(*(declared.sweep_flag,) if declared.sweep_flag else (),
                                                 metavar="LIST|RANGE" if ranges else "LIST", help=help)]


def with_learned(option: Callable[[str], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A command whose parameter `learned` becomes one option per learned field, in TrainConfig's order and
    in its place, each made by `option`; the command gets them back as one dict, `learned`."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(command).parameters.values())
        at = [p.name for p in own].index("learned")
        made = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option(name), default=None)
                for name in LEARNED]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(command)
        def run(**options: Any) -> Any:
            return command(learned={name: options.pop(name) for name in LEARNED}, **options)

        run.__signature__ = inspect.Signature(params[:at] + made + params[at + 1:])  # type: ignore[attr-defined]
        run.__annotations__ = {}   # typer reads the signature's annotations
        return run

    return decorate
