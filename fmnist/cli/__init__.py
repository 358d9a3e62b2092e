"""The `fmnist` command line, in three files:

    commands.py  each command: its options, then one call into the library
    console.py   everything a person sees: progress, tables, summaries, predictions, errors
    usage.py     how a command ends when it cannot go on: one `error:` line and the exit codes of docs/training.md

Importing it imports no torch: the commands import what they need when they run.
"""

from fmnist.cli.commands import app

__all__ = ["app"]
