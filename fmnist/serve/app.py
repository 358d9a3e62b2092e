"""The server's ASGI app, built by create_app(settings) so that tests and benchmarks make their own: its routes
as a table, its exception handlers as a dict, its middleware and its lifespan, in the manner of KServe's
rest/server.py. What each route does is in endpoints.py."""

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from fmnist import FmnistError, __version__
from fmnist.serve import protocol
from fmnist.serve.batching import Batcher, Overloaded
from fmnist.serve.endpoints import MODEL, ONE_THREAD_BELOW, VERSION, Endpoints, Model
from fmnist.serve.hotpath import InferPath
from fmnist.serve.metrics import Metrics
from fmnist.serve.middleware import BodyTooLarge, CountRequests, LimitBody
from fmnist.serve.protocol import ProtocolError
from fmnist.serve.statistics import Statistics

RETRY_AFTER_S = 1   # what a 503 tells a client to wait: a full queue drains in well under a second


@dataclass(frozen=True)
class Settings:
    """What `fmnist serve` passes to each worker process (as JSON in FMNIST_SERVE, for uvicorn's --workers)."""
    onnx: str = "export/fmnist.onnx"
    max_batch: int = 256        # images in one onnxruntime run; 1 turns batching off (one run per request)
    max_delay_ms: float = 0.0   # how long a run waits for more requests after the first (0: only what queued)
    max_queue: int = 16384      # images waiting for a run; past that, 503: bounded memory under overload
    max_body_mb: float = 32.0   # request body; past that, 413
    threads: int = 0            # onnxruntime's intra-op threads (0: one per core)
    host: str = "127.0.0.1"     # where the gRPC server listens, beside the REST one
    grpc_port: int = 0          # the Open Inference Protocol over gRPC (fmnist.serve.rpc); 0: none


def create_app(settings: Settings) -> InferPath:
    """The server's ASGI app: the hot path (fmnist.serve.hotpath) in front of FastAPI's app, which answers every
    other route. The model is loaded when it starts (its lifespan), once, not per request."""
    metrics, statistics = Metrics(), Statistics(MODEL, VERSION)
    max_body = int(settings.max_body_mb * 2**20)
    endpoints = Endpoints(metrics, statistics, resources.files("fmnist.serve").joinpath("page.html").read_bytes())

    def observe(size: int, waits: list[float], seconds: float) -> None:   # every onnxruntime run
        metrics.observe_run(size, waits)
        statistics.observe_run(size, waits, seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = Model(settings.onnx, settings.threads)
        batcher = Batcher(model.run, settings.max_batch, settings.max_delay_ms / 1000, settings.max_queue,
                          observe=observe, inline_below=ONE_THREAD_BELOW)   # the one-thread session's runs
        endpoints.load(model, batcher)
        grpc_server = None
        if settings.grpc_port:   # imported only here: without gRPC, the server needs neither grpcio nor tritonclient
            from fmnist.serve import rpc

            grpc_server = await rpc.start(endpoints, metrics, settings.host, settings.grpc_port, max_body)
        yield
        if grpc_server is not None:   # new calls get UNAVAILABLE; those under way have 5 s to finish
            await rpc.stop(grpc_server, 5)
        await batcher.close()

    app = FastAPI(title="fmnist", version=__version__, routes=routes(endpoints),
                  exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan,
                  middleware=[Middleware(CountRequests, metrics=metrics),   # the first is the outermost
                              Middleware(LimitBody, max_body=max_body)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    return InferPath(app, endpoints, metrics, max_body, EXCEPTION_HANDLERS)


def routes(endpoints: Endpoints) -> list[BaseRoute]:
    """Every route but the infer routes, the hot path, which fmnist.serve.hotpath answers ahead of FastAPI:
    the Open Inference Protocol's (KServe v2) first."""
    return [
        APIRoute("/v2", endpoints.server_metadata, methods=["GET"]),
        APIRoute("/v2/health/live", endpoints.live, methods=["GET"]),
        APIRoute("/v2/health/ready", endpoints.ready, methods=["GET"]),
        APIRoute("/v2/models/{name}", endpoints.model_metadata, methods=["GET"]),
        APIRoute("/v2/models/{name}/versions/{version}", endpoints.model_metadata, methods=["GET"]),
        APIRoute("/v2/models/{name}/ready", endpoints.model_ready, methods=["GET"]),
        APIRoute("/v2/models/{name}/versions/{version}/ready", endpoints.model_ready, methods=["GET"]),
        APIRoute("/v2/models/{name}/config", endpoints.model_config, methods=["GET"]),
        APIRoute("/v2/models/{name}/versions/{version}/config", endpoints.model_config, methods=["GET"]),
        APIRoute("/v2/models/{name}/stats", endpoints.model_statistics, methods=["GET"]),
        APIRoute("/v2/models/{name}/versions/{version}/stats", endpoints.model_statistics, methods=["GET"]),
        APIRoute("/predict", endpoints.predict, methods=["POST"]),
        APIRoute("/", endpoints.index, methods=["GET"]),
        APIRoute("/metrics", endpoints.prometheus, methods=["GET"]),
    ]


# ---- errors: a JSON {"error": ...} that says what to fix, the v2 protocol's form, on every route --------------

def error(status: int, message: str, headers: dict | None = None) -> Response:
    return Response(protocol.error_body(message), status, headers, media_type="application/json")


async def bad_request(request: Request, e: Exception) -> Response:
    return error(400, str(e))


async def overloaded(request: Request, e: Exception) -> Response:
    return error(503, f"the server is overloaded ({e}); retry after {RETRY_AFTER_S} s",
                 {"Retry-After": str(RETRY_AFTER_S)})


async def too_large(request: Request, e: Exception) -> Response:
    return error(413, str(e))


async def http_problem(request: Request, e: HTTPException) -> Response:
    routing = {"Not Found": f"no such route: {request.method} {request.url.path}; see GET /v2 and the README",
               "Method Not Allowed": f"{request.method} is not allowed on {request.url.path}"}
    message = routing.get(str(e.detail), str(e.detail))   # starlette's words for routing, else fmnist's own
    return error(e.status_code, message, getattr(e, "headers", None))


async def bad_parameter(request: Request, e: RequestValidationError) -> Response:
    problem = e.errors()[0]
    return error(400, f"{'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}")


async def internal(request: Request, e: Exception) -> Response:
    """A bug of fmnist: logged with its traceback here, one line to the client."""
    logging.getLogger("fmnist.serve").exception("error answering %s %s", request.method, request.url.path)
    return error(500, f"internal error ({type(e).__name__}); the server's log has the details")


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
EXCEPTION_HANDLERS: dict[int | type[Exception], Handler] = {
    ProtocolError: bad_request,
    FmnistError: bad_request,
    Overloaded: overloaded,
    BodyTooLarge: too_large,
    HTTPException: http_problem,
    RequestValidationError: bad_parameter,
    Exception: internal,
}
