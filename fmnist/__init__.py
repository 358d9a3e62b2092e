"""fmnist: train the classic Fashion-MNIST tutorial network, export it to ONNX, measure its speed.

Importing this package is cheap: nothing here imports torch. The modules that need torch
(model, train, export) import it themselves, and the CLI imports them only inside its commands.
"""

__version__ = "0.2.0"


class FmnistError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits non-zero."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, how a container, a batch system or `kill` stops a program. The CLI raises it where Ctrl-C raises
    KeyboardInterrupt, so that a command stops the same way for both (what was kept, how to resume); its exit
    code is 143 (128 + 15, the shell's for SIGTERM) instead of Ctrl-C's 130."""
