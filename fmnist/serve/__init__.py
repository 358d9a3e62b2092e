"""`fmnist serve`: the exported model behind an HTTP server, on onnxruntime, without torch.

- The Open Inference Protocol (KServe v2) at /v2, as Triton speaks it: tritonclient.http, perf_analyzer and any
  client written for Triton or KServe work unchanged, JSON or binary tensors; Triton's model-configuration and
  statistics extensions too.
- POST /predict: image files in, `fmnist predict --json`'s answer out, through the same preparation
  (fmnist.runtime.load_image), with the 28 x 28 image the network saw.
- GET /: a page for people. GET /metrics: Prometheus' text format.

    app.py         create_app(settings): the routes, exception handlers, middleware and lifespan
    hotpath.py     the infer routes answered ahead of FastAPI, from the ASGI messages
    rpc.py         the same protocol over gRPC (--grpc-port), on tritonclient's generated code
    endpoints.py   what each route does, over the model and its batcher; the limits
    protocol.py    the protocol's request and response bodies, and Triton's binary tensor extension
    batching.py    dynamic batching: concurrent requests share onnxruntime runs
    middleware.py  request metrics and the body's limit
    metrics.py     the Prometheus metrics
    statistics.py  Triton's statistics extension
    launcher.py    serve(): the port, the worker processes, uvicorn
    triton.py      the model's Triton configuration: a repository for `fmnist export --triton`, the config route
    page.html      the page, its script and style in one file

Importing this package imports none of its modules, so that `fmnist export --triton` can import
fmnist.serve.triton, which needs neither torch nor the serve extra (pip install "fmnist[serve]"), where that
extra is not installed: importing a submodule runs its package's __init__ first. The four names below are
looked up when first used (PEP 562's module __getattr__), and that is where a missing extra raises its
ImportError; a caller that wants it at one import statement imports fmnist.serve.launcher itself.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the same names, for type checkers and editors
    from fmnist.serve.app import Settings, create_app
    from fmnist.serve.launcher import from_environment, serve

__all__ = ["Settings", "create_app", "from_environment", "serve"]

_MODULES = {"Settings": "app", "create_app": "app", "from_environment": "launcher", "serve": "launcher"}


def __getattr__(name: str) -> object:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
