"""The app the serving benchmark runs: `fmnist serve`'s own, plus POST /bench/noop, the benchmarks' bound. The
benchmark passes app() to fmnist.serve.launcher.serve as its factory, so the server runs the command's code path."""

from fmnist.serve.launcher import from_environment
from fmnist.serve.rest import Answer, Call, RestApp, Route


async def noop(call: Call) -> Answer:
    """Answers {} to a body already read: the HTTP stack and the one pipeline alone, as every route has them."""
    return Answer(200, b"{}")


def app() -> RestApp:
    """uvicorn's factory in the server process: the app from_environment builds, with the no-op route."""
    served = from_environment()
    served.router.add(Route("POST", "/bench/noop", noop))
    return served
