"""The hot path: POST /v2/models/fmnist/infer answered straight from the ASGI messages, ahead of FastAPI.

A single-image request is a few hundred microseconds of Python, and most of it was the framework's: FastAPI's
and Starlette's layers (error middleware, exception middleware, an exit stack, a body-limit layer, routing
that tries each route's pattern in turn) around the few lines of protocol work (profile: bench/README.md,
Serving). InferPath sees every request first; the inference requests it answers itself, with the same body
limit, errors, metrics and statistics as every other route; everything else goes on to the app.
"""

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fmnist.serve.endpoints import Endpoints
from fmnist.serve.metrics import Metrics
from fmnist.serve.middleware import read_body
from fmnist.serve.protocol import BINARY_HEADER

ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")   # as the metrics name them
Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
BINARY_KEY = BINARY_HEADER.lower().encode()   # as ASGI gives header names


def infer_path(path: str) -> tuple[str, str | None, str] | None:
    """(name, version, the route's template) when `path` is an infer route, else None."""
    parts = path.split("/")
    if parts[:3] != ["", "v2", "models"] or not all(parts[3:]):
        return None
    if len(parts) == 5 and parts[4] == "infer":
        return parts[3], None, ROUTES[0]
    if len(parts) == 7 and parts[4] == "versions" and parts[6] == "infer":
        return parts[3], parts[5], ROUTES[1]
    return None


class InferPath:
    """The server's outermost ASGI layer: POST to an infer route is answered here, the rest by `app`. A refusal
    is answered by the app's own exception handlers (`handlers`, app.py's), so it reads as on any route."""

    def __init__(self, app: ASGIApp, endpoints: Endpoints, metrics: Metrics, max_body: int,
                 handlers: Mapping[Any, Handler]) -> None:
        self.app, self.endpoints, self.metrics = app, endpoints, metrics
        self.max_body, self.handlers = max_body, handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = infer_path(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        start, (name, version, template) = time.perf_counter(), route
        headers = {key: value for key, value in scope["headers"]}
        try:
            body = await read_body(receive, headers.get(b"content-length"), self.max_body)
            encoding = headers.get(b"content-encoding", b"identity").decode("latin-1")
            header_length = headers.get(BINARY_KEY)
            reply = await self.endpoints.inference(name, version, body, encoding,
                                                   header_length.decode("latin-1") if header_length else None)
        except ClientDisconnect:   # gone before its body was read: nobody to answer, nothing run
            return
        except Exception as e:
            response = await self._handler(e)(Request(scope), e)
            await response(scope, receive, send)
            status = response.status_code
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-length", str(len(reply.body)).encode()), (b"content-type", reply.media_type.encode()),
                *((key.lower().encode(), value.encode()) for key, value in reply.headers.items())]})
            await send({"type": "http.response.body", "body": reply.body})
            status = 200
        self.metrics.observe_request(template if status != 404 else "other", status, time.perf_counter() - start)

    def _handler(self, e: Exception) -> Handler:
        """The handler of the exception's nearest class that has one (Exception's: a 500, logged)."""
        return next(self.handlers[kind] for kind in type(e).__mro__ if kind in self.handlers)
