"""`fmnist serve`'s launcher: check the model, take the port, and run the app on uvicorn in `workers` processes.
Each process builds its own app from the settings in FMNIST_SERVE (from_environment, uvicorn's factory)."""

import json
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace

import uvicorn

from fmnist import FmnistError
from fmnist.serve.dataplane import Model
from fmnist.serve.rest import RestApp, create_app
from fmnist.serve.settings import Settings

FACTORY = "fmnist.serve.launcher:from_environment"   # what each worker process imports and calls for its app


def from_environment() -> RestApp:
    """The app for uvicorn's worker processes (`--workers`): settings from FMNIST_SERVE, set by `serve`."""
    return create_app(Settings(**json.loads(os.environ["FMNIST_SERVE"])))


def serve(settings: Settings, on_start: Callable[[int], object] | None = None, factory: str = FACTORY) -> None:
    """Run the server until Ctrl-C. Each of settings.workers processes gets its share of the cores for
    onnxruntime. Port 0: a free port, the one the system gives; on_start(port) is told the port it listens on.
    `factory`: the import string ("module:function") of what makes each process's app, from_environment unless
    a benchmark adds routes of its own."""
    _check(settings)
    Model(settings.onnx, settings.threads)   # fails with one line, before the server starts, if it cannot serve
    host, workers = settings.host, settings.workers
    port = _bindable(host, settings.port)
    if settings.grpc_port:
        _bindable(host, settings.grpc_port, "--grpc-port")
    settings = replace(settings, port=port)
    if settings.threads == 0:
        settings = replace(settings, threads=max(1, (os.cpu_count() or 1) // workers))
    os.environ["FMNIST_SERVE"] = json.dumps(asdict(settings))
    with tempfile.TemporaryDirectory(prefix="fmnist-metrics-") as metrics_dir:
        if workers > 1:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if on_start:
            on_start(port)
        uvicorn.run(factory, factory=True, host=host, port=port, workers=workers, log_level="warning",
                    access_log=False, timeout_graceful_shutdown=5)


def _check(settings: Settings) -> None:
    """Each number `fmnist serve` was given, in range, in the words of its options."""
    for name, value, least in (("--workers", settings.workers, 1), ("--max-batch", settings.max_batch, 1)):
        if value < least:
            raise FmnistError(f"{name} {value}: must be {least} or more")
    if not 0 <= settings.port <= 65535:
        raise FmnistError(f"--port {settings.port}: must be 0 to 65535 (0: a free port, chosen by the system)")
    if not 0 <= settings.grpc_port <= 65535:
        raise FmnistError(f"--grpc-port {settings.grpc_port}: must be 0 to 65535 (0: no gRPC)")
    if settings.max_delay_ms < 0 or settings.max_body_mb <= 0:
        raise FmnistError("--max-delay-ms must be 0 or more and --max-body-mb more than 0")


def _bindable(host: str, port: int, option: str = "--port") -> int:
    """The port, once we know it can be listened on; for port 0, the free port the system chose, which uvicorn
    then binds."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: the connections of a server just stopped (TIME_WAIT) do not hold the port, but a
        # server listening on it does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise FmnistError(f"cannot listen on {host}:{port} ({e.strerror}); choose another {option} or --host") \
                from None
        return probe.getsockname()[1]
