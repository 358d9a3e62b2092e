"""The serving wing's own errors. The data plane raises them and knows no transport; REST answers each with a
status and a JSON error in one table (fmnist.serve.rest.ERRORS), gRPC with a status code in another
(fmnist.serve.rpc.CODES). A message says what to fix, and both transports send it word for word."""


class InvalidInput(ValueError):
    """A request the client must fix: the protocol or the model cannot take it."""


class ModelNotFound(LookupError):
    """A model name or version this server does not serve."""


class UnsupportedEncoding(ValueError):
    """A body compressed in a way the server does not read."""


class BodyTooLarge(ValueError):
    """A request over the server's body limit (--max-body-mb)."""


class Overloaded(Exception):
    """The batcher's queue is full: the request was not queued."""


class ShuttingDown(Exception):
    """The server is stopping: the request should go to another replica."""


def too_large_message(max_body: int) -> str:
    return f"the body is over {max_body / 2**20:g} MiB; send fewer images per request (or start the server " \
           "with a larger --max-body-mb)"
