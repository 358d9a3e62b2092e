"""The app the serving benchmark runs: `fmnist serve`'s own, plus POST /bench/noop, the benchmarks' bound. The
benchmark passes app() to fmnist.serve.serve as its factory, so the server runs the command's code path."""

from starlette.requests import Request
from starlette.responses import Response

from fmnist.serve.launcher import from_environment


async def noop(request: Request) -> Response:
    """Reads the body and answers {}: the HTTP stack alone. A plain Starlette route, as the infer routes are."""
    await request.body()
    return Response(b"{}", media_type="application/json")


def app():
    """uvicorn's factory in the server process: the app from_environment builds, with the no-op route."""
    served = from_environment()
    served.app.router.add_route("/bench/noop", noop, methods=["POST"])   # FastAPI's app, behind the hot path
    return served
