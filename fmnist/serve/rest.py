"""The REST transport: the Open Inference Protocol (KServe v2) as Triton speaks it, image files at /predict, the
page at / and the metrics at /metrics, as one ASGI app with one pipeline for every route.

Each request goes the same way: its route is found in one table (ROUTES' templates), its body read under the
one limit, its handler run over the data plane (fmnist.serve.dataplane), its answer or refusal sent, and it is
counted and timed in the metrics. Each error has its status in one table, ERRORS. Starlette parses /predict's
multipart form; no framework's routing or middleware sits in front of the routes, since at a single image those
layers cost more than the protocol's own work (bench/README.md, Serving).
"""

import json
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from importlib import resources
from typing import Any, NamedTuple

import numpy as np
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from fmnist import FmnistError, runtime
from fmnist.serve import protocol
from fmnist.serve.batching import Batcher
from fmnist.serve.dataplane import MAX_FILES, MODEL, ONE_THREAD_BELOW, VERSION, DataPlane, Model
from fmnist.serve.errors import (
    BodyTooLarge,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ShuttingDown,
    UnsupportedEncoding,
    too_large_message,
)
from fmnist.serve.metrics import Metrics
from fmnist.serve.settings import Settings
from fmnist.serve.statistics import Statistics

RETRY_AFTER_S = 1   # what a 503 tells a client to wait: a full queue drains in well under a second
GRPC_GRACE_S = 5    # when the server stops, gRPC calls under way have this long to finish
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


class Call(NamedTuple):
    """A request as a route's handler gets it: the body already read, under the limit."""
    scope: Scope
    headers: dict[bytes, bytes]   # lower-case names, as ASGI gives them
    body: bytes
    params: dict[str, str]        # the path's {name} parts


class Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Call], Awaitable[Answer]]


class Route(NamedTuple):
    method: str
    template: str   # e.g. /v2/models/{name}/infer; the metrics name a request by it
    handler: Handler


def as_json(data: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode())


# ---- errors: each to its status, in one table; the answer is a JSON {"error": ...}, the protocol's form -------

class NoSuchRoute(LookupError):
    """No route has this path."""


class NotAllowed(LookupError):
    """A route has this path, for other methods."""

    def __init__(self, message: str, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed


def refusal(status: int, headers: Callable[[Exception], tuple[tuple[str, str], ...]] = lambda e: (),
            message: Callable[[Exception], str] = str) -> Callable[[Exception], Answer]:
    return lambda e: Answer(status, protocol.error_body(message(e)), headers=headers(e))


ERRORS: dict[type[Exception], Callable[[Exception], Answer]] = {   # the nearest class of an error answers it
    InvalidInput: refusal(400),
    FmnistError: refusal(400),                 # an image file that cannot be read
    ModelNotFound: refusal(404),
    NoSuchRoute: refusal(404),
    NotAllowed: refusal(405, lambda e: (("allow", getattr(e, "allowed", "")),)),
    BodyTooLarge: refusal(413),
    UnsupportedEncoding: refusal(415),
    Overloaded: refusal(503, lambda e: (("retry-after", str(RETRY_AFTER_S)),),
                        lambda e: f"the server is overloaded ({e}); retry after {RETRY_AFTER_S} s"),
    ShuttingDown: refusal(503),
}


def answer_error(e: Exception, scope: Scope) -> Answer:
    """The table's answer to `e`; any other error is a bug of fmnist: logged with its traceback, a 500."""
    kind = next((kind for kind in type(e).__mro__ if kind in ERRORS), None)
    if kind is not None:
        return ERRORS[kind](e)
    logging.getLogger("fmnist.serve").exception("error answering %s %s", scope["method"], scope["path"])
    return Answer(500, protocol.error_body(f"internal error ({type(e).__name__}); the server's log has the details"))


# ---- the routes -----------------------------------------------------------------------------------------------

def routes(plane: DataPlane, metrics: Metrics, page: bytes) -> list[Route]:
    """Every route, the infer routes first (the hot path, matched first); then the rest of the protocol."""
    binary_header = protocol.BINARY_HEADER.lower().encode()   # as ASGI gives header names

    def infer(call: Call) -> Awaitable[Answer]:   # the data plane's own coroutine: no frame of its own
        def parse() -> tuple[protocol.InferenceRequest, bytes]:
            encoding = call.headers.get(b"content-encoding", b"identity").decode("latin-1")
            if encoding != "identity":
                raise UnsupportedEncoding(f"Content-Encoding {encoding} is not supported; send the body uncompressed")
            header_length = call.headers.get(binary_header)
            return protocol.parse_request(call.body, header_length.decode("latin-1") if header_length else None)

        def reply(inference: protocol.InferenceRequest, wanted: list[protocol.WantedOutput],
                  values: dict[str, np.ndarray]) -> Answer:
            body, content_type, headers = protocol.inference_response(inference, wanted, values, plane.model.classes,
                                                                      MODEL, VERSION)
            return Answer(200, body, content_type, tuple(headers.items()))

        return plane.infer_with(call.params["name"], call.params.get("version"), parse, reply)

    def answered(method: Callable[..., Awaitable[dict]]) -> Handler:   # the data plane's dict, as JSON
        async def handler(call: Call) -> Answer:
            return as_json(await method(**call.params))
        return handler

    async def predict(call: Call) -> Answer:
        top, invert = predict_options(call.scope["query_string"].decode("latin-1"))
        form = await multipart_form(call)
        try:
            uploads = [(f.filename or "upload", f.file) for f in form.getlist("files") if not isinstance(f, str)]
            return as_json(await plane.predict(uploads, top, invert))
        finally:
            await form.close()

    async def index(call: Call) -> Answer:
        return Answer(200, page, "text/html; charset=utf-8")

    async def prometheus(call: Call) -> Answer:
        body, content_type = metrics.exposition()
        return Answer(200, body, content_type)

    model_routes = [(path, method) for suffix, method in (
        ("", plane.model_metadata), ("/ready", plane.model_ready), ("/config", plane.model_config),
        ("/stats", plane.model_statistics)) for path in (f"/v2/models/{{name}}{suffix}",
                                                          f"/v2/models/{{name}}/versions/{{version}}{suffix}")]
    return [
        Route("POST", "/v2/models/{name}/infer", infer),
        Route("POST", "/v2/models/{name}/versions/{version}/infer", infer),
        Route("GET", "/v2", answered(plane.server_metadata)),
        Route("GET", "/v2/health/live", answered(plane.live)),
        Route("GET", "/v2/health/ready", answered(plane.ready)),
        *(Route("GET", path, answered(method)) for path, method in model_routes),
        Route("POST", "/predict", predict),
        Route("GET", "/", index),
        Route("GET", "/metrics", prometheus),
    ]


def predict_options(query: str) -> tuple[int | None, bool | None]:
    """/predict's ?top=N&invert=true|false, None where not given."""
    values = {key: value[-1] for key, value in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    top = invert = None
    if "top" in values:
        try:
            top = int(values["top"])
        except ValueError:
            raise InvalidInput(f"top={values['top']}: must be a whole number, 1 to {runtime.MAX_TOP}") from None
    if "invert" in values:
        if values["invert"].lower() not in BOOLEANS:
            raise InvalidInput(f"invert={values['invert']}: must be true or false (or left out: decided per image)")
        invert = BOOLEANS[values["invert"].lower()]
    return top, invert


async def multipart_form(call: Call) -> Any:
    """The request's multipart form, parsed by Starlette from the body already read."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": call.body, "more_body": False}

    try:
        return await Request(call.scope, receive).form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except MultiPartException as e:
        raise InvalidInput(e.message) from None


# ---- the pipeline -------------------------------------------------------------------------------------------------

class Router:
    """Finds a request's route by its path, in the table's order: each template a regular expression, since
    matching is on every request's way (at a single image, the pipeline's Python is a sizeable part of it)."""

    def __init__(self, table: list[Route]) -> None:
        self.table: list[tuple[Route, re.Pattern]] = []
        for route in table:
            self.add(route)

    def add(self, route: Route) -> None:
        pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(route.template))
        self.table.append((route, re.compile(pattern + "$")))

    def find(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route, pattern in self.table:
            match = pattern.match(path)
            if match is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, match.groupdict()
            allowed.append(route.method)
        if allowed:
            raise NotAllowed(f"{method} is not allowed on {path}", ", ".join(allowed))
        raise NoSuchRoute(f"no such route: {method} {path}; see GET /v2 and the README")


async def read_body(receive: Receive, length: bytes | None, max_body: int) -> bytes:
    """The whole body of a request. Over `max_body` bytes, by its Content-Length or while it is read (a chunked
    one), it raises BodyTooLarge once the rest is read and dropped (so that the client hears the 413, not a
    reset), never holding more than the limit in memory."""
    too_large = length is not None and length.isdigit() and int(length) > max_body
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        more = message.get("more_body", False)
        if not too_large:
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_large = size > max_body
    if too_large:
        raise BodyTooLarge(too_large_message(max_body))
    return b"".join(chunks)


class RestApp:
    """The ASGI app: every HTTP request through one pipeline (handle), and the server's start and stop (its
    lifespan) around them."""

    def __init__(self, router: Router, metrics: Metrics, max_body: int,
                 lifespan: Callable[[], Any]) -> None:
        self.router, self.metrics, self.max_body, self.lifespan = router, metrics, max_body, lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.run_lifespan(receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, template = time.perf_counter(), "other"
        headers = dict(scope["headers"])
        try:
            try:
                route, params = self.router.find(scope["method"], scope["path"])
                template = route.template
            except LookupError:   # no route: its body is still read, so that a body over the limit is a 413
                await read_body(receive, headers.get(b"content-length"), self.max_body)
                raise
            body = await read_body(receive, headers.get(b"content-length"), self.max_body)
            answer = await route.handler(Call(scope, headers, body, params))
        except ClientDisconnect:   # gone before its body was read: nobody to answer, nothing run
            return
        except Exception as e:
            answer = answer_error(e, scope)
        sent = [(b"content-length", str(len(answer.body)).encode()), (b"content-type", answer.content_type.encode())]
        if answer.headers:
            sent += [(key.encode(), value.encode()) for key, value in answer.headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": sent})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else answer.body})
        self.metrics.observe_request(template if answer.status != 404 else "other", answer.status,
                                     time.perf_counter() - start)

    async def run_lifespan(self, receive: Receive, send: Send) -> None:
        await receive()   # lifespan.startup
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.lifespan())
            except Exception as e:
                await send({"type": "lifespan.startup.failed", "message": str(e)})
                raise
            await send({"type": "lifespan.startup.complete"})
            await receive()   # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


def create_app(settings: Settings) -> RestApp:
    """The server's ASGI app. The model is loaded when the server starts (its lifespan), once, not per request;
    the gRPC server (settings.grpc_port) starts and stops with it, over the same data plane."""
    metrics, statistics = Metrics(), Statistics(MODEL, VERSION)
    plane = DataPlane(statistics)

    def observe(size: int, waits: list[float], seconds: float) -> None:   # every onnxruntime run
        metrics.observe_run(size, waits)
        statistics.observe_run(size, waits, seconds)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        model = Model(settings.onnx, settings.threads)
        batcher = Batcher(model.run, settings.max_batch, settings.max_delay_ms / 1000, settings.max_queue,
                          observe=observe, runners=model.runners, beside=model.run_beside,
                          beside_from=ONE_THREAD_BELOW)
        plane.load(model, batcher)
        grpc_server = None
        if settings.grpc_port:   # imported only here: without gRPC, the server needs neither grpcio nor tritonclient
            from fmnist.serve import rpc

            grpc_server = await rpc.start(plane, metrics, settings.host, settings.grpc_port, settings.max_body)
        try:
            yield
        finally:
            if grpc_server is not None:   # new calls get UNAVAILABLE; those under way finish, within the grace
                await rpc.stop(grpc_server, GRPC_GRACE_S)
            await batcher.close()

    page = resources.files("fmnist.serve").joinpath("page.html").read_bytes()
    return RestApp(Router(routes(plane, metrics, page)), metrics, settings.max_body, lifespan)
