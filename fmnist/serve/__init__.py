"""`fmnist serve`: the exported model behind a server, on onnxruntime, without torch.

- The Open Inference Protocol (KServe v2) at /v2, as Triton speaks it, over REST and over gRPC: tritonclient,
  perf_analyzer and any client written for Triton or KServe work unchanged, JSON or binary tensors; Triton's
  model-configuration and statistics extensions too.
- POST /predict: image files in, `fmnist predict --json`'s answer out, through the same preparation
  (fmnist.runtime.load_image), with the 28 x 28 image the network saw.
- GET /: a page for people. GET /metrics: Prometheus' text format.

    dataplane.py   the work of every request, over either transport: parse, check, batch, run, answer,
                   statistics; no web framework, no grpc; it raises errors.py's errors
    errors.py      the data plane's errors, which each transport maps once
    rest.py        the REST transport: one pipeline for every route, one table of errors to statuses
    rpc.py         the gRPC transport (--grpc-port): one table of errors to status codes
    protocol.py    the protocol's request and response bodies, and Triton's binary tensor extension
    batching.py    dynamic batching: concurrent requests share onnxruntime runs
    metrics.py     the Prometheus metrics
    statistics.py  Triton's statistics extension
    settings.py    the server's settings and their defaults
    launcher.py    serve(): the port, the worker processes, uvicorn
    page.html      the page, its script and style in one file

The model's Triton configuration (the config route's answer, and `fmnist export --triton`'s repository) is
fmnist.triton's: writing a repository needs neither this wing nor its extra.
"""
