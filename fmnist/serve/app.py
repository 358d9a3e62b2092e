"""`fmnist serve`: the exported model behind an HTTP server, on onnxruntime, without torch.

- The Open Inference Protocol (KServe v2) at /v2, as Triton speaks it (fmnist.serve.protocol): tritonclient.http and
  any client written for Triton or KServe work unchanged, JSON or binary tensors.
- POST /predict: image files in, `fmnist predict --json`'s answer out, through the same preparation
  (fmnist.runtime.load_image), with the 28 x 28 image the network saw.
- GET /: a page for people (page.html beside this file). GET /metrics: Prometheus' text format.

Concurrent requests share onnxruntime runs (fmnist.serve.batching). The app is built by create_app(), so tests and
benchmarks make their own; `fmnist serve` runs it on uvicorn.
"""

import base64
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fmnist import FmnistError, __version__, runtime
from fmnist.serve import protocol
from fmnist.serve.batching import Batcher, Overloaded
from fmnist.serve.protocol import BINARY_HEADER, ProtocolError

MODEL, VERSION = "fmnist", "1"   # the model's name and only version on the /v2 routes, as in a Triton repository

# Limits, each with its reason. Past them a request gets a 4xx (or 503) that says which, never a dead server.
MAX_IMAGES = 4096           # images in one request: 4096 x 3 KiB of FP32 is 12 MiB, well within the body limit
MAX_FILES = 64              # files in one /predict upload: each is decoded in full before it is shrunk to 28 x 28
MAX_PIXELS = 40_000_000     # pixels in one uploaded image (a 40-megapixel photo decodes to ~120 MB of RGB):
                            # a small PNG can claim billions, a decompression bomb; refused before decoding
RETRY_AFTER_S = 1           # what a 503 tells a client to wait: a full queue drains in well under a second


@dataclass(frozen=True)
class Settings:
    """What `fmnist serve` passes to each worker process (as JSON in FMNIST_SERVE, for uvicorn's --workers)."""
    onnx: str = "export/fmnist.onnx"
    max_batch: int = 256        # images in one onnxruntime run; 1 turns batching off (one run per request)
    max_delay_ms: float = 0.0   # how long a run waits for more requests after the first (0: only what queued)
    max_queue: int = 16384      # images waiting for a run; past that, 503: bounded memory under overload
    max_body_mb: float = 32.0   # request body; past that, 413
    threads: int = 0            # onnxruntime's intra-op threads (0: one per core)
    noop_route: bool = False    # POST /bench/noop, the benchmarks' bound: reads the body, answers {}


class Model:
    """The onnxruntime session and what the routes need to know about it, loaded once per process."""

    def __init__(self, settings: Settings):
        self.session = runtime.session(settings.onnx, threads=settings.threads, spinning=False)
        self.classes = runtime.class_names(self.session)
        self.threshold = runtime.ood_threshold(self.session)
        [image_input] = self.session.get_inputs()
        self.input_name = image_input.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in image_input.shape)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output_shapes = [[d if isinstance(d, int) else -1 for d in o.shape] for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self.outputs, {self.input_name: images}))

    def metadata(self) -> dict:
        """The protocol's model metadata; `parameters` adds the class names and the out-of-distribution
        threshold, which the protocol has no field for."""
        tensor = lambda name, shape: {"name": name, "datatype": "FP32", "shape": shape}   # noqa: E731
        parameters: dict[str, object] = {"classes": self.classes}
        if self.threshold is not None:
            parameters["ood_threshold"] = self.threshold
        return {"name": MODEL, "versions": [VERSION], "platform": "onnxruntime_onnx",
                "inputs": [tensor(self.input_name, list(self.input_shape))],
                "outputs": [tensor(n, s) for n, s in zip(self.outputs, self.output_shapes, strict=True)],
                "parameters": parameters}


def check(settings: Settings) -> None:
    """Fail with one line, before the server starts, when the model cannot be served."""
    Model(settings)


class Metrics:
    """Prometheus metrics. With several worker processes, prometheus-client's multiprocess mode (the
    PROMETHEUS_MULTIPROC_DIR that `fmnist serve --workers` sets) adds up all of them on every scrape."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()   # one per app: tests make many apps in one process
        self.requests = Counter("fmnist_requests", "HTTP requests by route and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("fmnist_request_seconds", "Time from request to response, by route.", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.images = Counter("fmnist_images", "Images classified.", registry=self.registry)
        self.batch = Histogram("fmnist_batch_images", "Images in each onnxruntime run.", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
        self.queue = Histogram("fmnist_queue_seconds", "Time a request waited for its onnxruntime run.",
                               registry=self.registry,
                               buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))

    def observe_run(self, size: int, waits: list[float]) -> None:
        self.images.inc(size)
        self.batch.observe(size)
        for wait in waits:
            self.queue.observe(wait)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware around every request: counts it in the metrics (by route template, so a fuzzer's
    random paths add no series), and refuses a body over the limit, from Content-Length before reading or
    while reading a chunked one."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int, routes: list) -> None:
        self.app, self.metrics, self.max_body, self.routes = app, metrics, max_body, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        try:
            too_large = length is not None and int(length) > self.max_body
        except ValueError:
            too_large = False   # h11 refuses such a request before it gets here
        try:
            if too_large:   # read what was sent, keeping none of it, so the client hears the 413, not a reset
                while (await receive()).get("more_body"):
                    pass
                await _send_error(send_counting, 413, self._too_large())
            else:
                await self.app(scope, receive if length is not None else self._limited(receive), send_counting)
        finally:   # a 500 too: its exception passes through here on its way to the outermost handler
            route = scope.get("route") or self._route(scope)   # FastAPI names its own routes only
            endpoint = route.path if route is not None and status[0] != 404 else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _route(self, scope: Scope):
        from starlette.routing import Match

        return next((route for route in self.routes if route.matches(scope)[0] is Match.FULL), None)

    def _limited(self, receive):
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(self._too_large())
            return message

        return receive_limited

    def _too_large(self) -> str:
        return f"the body is over {self.max_body / 2**20:g} MiB; send fewer images per request (or start the " \
               "server with a larger --max-body-mb)"


async def _send_error(send, status: int, message: str) -> None:
    body = protocol.error_body(message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error(status: int, message: str, headers: dict | None = None) -> Response:
    return Response(protocol.error_body(message), status, headers, media_type="application/json")


def create_app(settings: Settings) -> FastAPI:
    """The server's ASGI app. The model is loaded when it starts (its lifespan), once, not per request."""
    metrics = Metrics()
    page = resources.files("fmnist.serve").joinpath("page.html").read_bytes()
    state: dict = {}

    async def lifespan(app):
        model = Model(settings)
        state["model"] = model
        state["batcher"] = Batcher(model.run, settings.max_batch, settings.max_delay_ms / 1000, settings.max_queue,
                                   observe=metrics.observe_run)
        yield
        await state["batcher"].close()

    app = FastAPI(title="fmnist", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, metrics=metrics, max_body=int(settings.max_body_mb * 2**20), routes=app.router.routes)

    # ---- errors: a JSON {"error": ...} that says what to fix, the v2 protocol's form, on every route ----------
    @app.exception_handler(ProtocolError)
    @app.exception_handler(FmnistError)
    async def bad_request(request, e):
        return error(400, str(e))

    @app.exception_handler(Overloaded)
    async def overloaded(request, e):
        return error(503, f"the server is overloaded ({e}); retry after {RETRY_AFTER_S} s",
                     {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, e):
        return error(413, str(e))

    @app.exception_handler(HTTPException)
    async def http_problem(request, e):
        routing = {"Not Found": f"no such route: {request.method} {request.url.path}; see GET /v2 and the README",
                   "Method Not Allowed": f"{request.method} is not allowed on {request.url.path}"}
        message = routing.get(str(e.detail), str(e.detail))   # starlette's words for routing, else fmnist's own
        return error(e.status_code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, e):
        problem = e.errors()[0]
        return error(400, f"{'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}")

    @app.exception_handler(Exception)
    async def internal(request, e):   # a bug of fmnist: logged with its traceback here, one line to the client
        logging.getLogger("fmnist.serve").exception("error answering %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(e).__name__}); the server's log has the details")

    def model_for(name: str, version: str | None = None) -> "Model":
        if name != MODEL:
            raise HTTPException(404, f"unknown model {name!r}: this server serves {MODEL!r}")
        if version not in (None, VERSION):
            raise HTTPException(404, f"model {MODEL!r} has no version {version!r}; it has {VERSION!r}")
        return state["model"]

    async def classify(images: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(images) > MAX_IMAGES:
            raise ProtocolError(f"{len(images)} images in one request; send at most {MAX_IMAGES} per request")
        return await state["batcher"](images)

    # ---- the Open Inference Protocol (KServe v2) ----------------------------------------------------------------
    @app.get("/v2")
    async def server_metadata():
        return {"name": "fmnist", "version": __version__, "extensions": ["binary_tensor_data", "classification"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": "model" in state}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return model_for(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        model_for(name, version)
        return {"name": MODEL, "ready": True}

    async def infer(request: Request) -> Response:
        model = model_for(request.path_params["name"], request.path_params.get("version"))
        if request.headers.get("content-encoding", "identity") != "identity":
            return error(415, f"Content-Encoding {request.headers['content-encoding']} is not supported; "
                              "send the body uncompressed")
        inference, binary = protocol.parse_request(await request.body(), request.headers.get(BINARY_HEADER))
        images = protocol.input_tensor(inference, binary, model.input_name, model.input_shape, "FP32")
        if len(images) == 0:
            raise ProtocolError(f"input {model.input_name!r}: no images (the shape's first number is 0)")
        wanted = protocol.wanted_outputs(inference, model.outputs)
        values = dict(zip(model.outputs, await classify(images), strict=True))
        reply = protocol.inference_response(inference, wanted, values, model.classes, MODEL, VERSION)
        return Response(reply.body, media_type=reply.media_type, headers=reply.headers)

    # The hot path as a plain Starlette route: FastAPI's parameter handling cost as much as the route's own work
    # (cProfile, bench/README.md's Serving section); the route reads its path parameters itself.
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.router.add_route(path, infer, methods=["POST"])

    # ---- for people: /predict and the page ---------------------------------------------------------------------
    @app.post("/predict")
    async def predict(request: Request, top: int = 3, invert: bool | None = None):
        if not 1 <= top <= runtime.MAX_TOP:
            raise ProtocolError(f"top={top}: must be 1 to {runtime.MAX_TOP}")
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        uploads = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not uploads:
            raise ProtocolError("no image files: send them as multipart/form-data in the field `files`, e.g. "
                                "curl -F files=@shirt.jpg http://127.0.0.1:8000/predict")
        prepared = [await run_in_threadpool(runtime.load_image, upload.file, invert, upload.filename or "upload",
                                            MAX_PIXELS) for upload in uploads]
        images = np.concatenate([image.input for image in prepared])
        model = state["model"]
        outputs = await classify(images)
        scores = outputs[1] if model.threshold is not None else None
        results = runtime.predictions_from(outputs[0], scores, model.classes, model.threshold, top)
        return [{"image": upload.filename, "negated": image.negated, "background": image.background, **result,
                 "input": png_data_url(image.input)} for upload, image, result in zip(uploads, prepared, results,
                                                                                      strict=True)]

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    if settings.noop_route:   # a plain Starlette route too: the bound is the HTTP stack alone
        async def noop(request: Request) -> Response:
            await request.body()
            return Response(b"{}", media_type="application/json")

        app.router.add_route("/bench/noop", noop, methods=["POST"])

    return app


def png_data_url(image: np.ndarray) -> str:
    """A model input (1, 1, 28, 28) in [0, 1] as a PNG data URL: what the network saw, for a page to show."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image[0, 0] * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def from_environment() -> FastAPI:
    """The app for uvicorn's worker processes (`--workers`): settings from FMNIST_SERVE, set by `serve`."""
    return create_app(Settings(**json.loads(os.environ["FMNIST_SERVE"])))


def serve(settings: Settings, host: str, port: int, workers: int = 1,
          on_start: Callable[[int], object] | None = None) -> None:
    """Run the server until Ctrl-C. Each of `workers` processes gets its share of the cores for onnxruntime.
    Port 0: a free port, the one the system gives; on_start(port) is told the port it listens on."""
    import socket
    import tempfile

    import uvicorn

    check(settings)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise FmnistError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") \
                from None
        port = probe.getsockname()[1]   # port 0: the free port the system chose, which uvicorn then binds
    if settings.threads == 0:
        settings = Settings(**{**asdict(settings), "threads": max(1, (os.cpu_count() or 1) // workers)})
    os.environ["FMNIST_SERVE"] = json.dumps(asdict(settings))
    with tempfile.TemporaryDirectory(prefix="fmnist-metrics-") as metrics_dir:
        if workers > 1:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if on_start:
            on_start(port)
        uvicorn.run("fmnist.serve.app:from_environment", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False, timeout_graceful_shutdown=5)
