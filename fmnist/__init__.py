"""fmnist: train the classic Fashion-MNIST tutorial network, export it to ONNX, measure its speed.

Importing this package is cheap: nothing here imports torch. The modules that need torch
(model, train, export) import it themselves, and the CLI imports them only inside its commands.
"""

__version__ = "0.2.0"


class FmnistError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits non-zero."""
