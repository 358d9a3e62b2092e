"""Serving (group `serve`): `fmnist serve` in its own process on loopback, under a closed-loop load from this one.

The server runs fmnist.serve.serve, the code path of `fmnist serve` (the model checked, one uvicorn worker with
uvloop and httptools, onnxruntime with one thread per core), with the benchmarks' no-op route added to its app
(bench/noop_route.py), which the command line does not offer. The client is this process: C keep-alive
connections on one event loop (uvloop when installed), each sending its next request, pre-built HTTP/1.1 bytes,
as soon as the previous one is answered. Client and server share the machine's cores: each row records both
processes' CPU time per request.

Rows: the v2 protocol with one image as JSON and as binary (Triton's binary tensor extension), binary batches of
1024, /predict with one 280 x 280 JPEG, and the no-op route (the same JSON body read and {} answered: the HTTP
stack alone, the bound of a single-image request); at concurrency 1, 16 and 64. Beside them, in this process, the
bounds without HTTP: onnxruntime at batch 1 and 1024, and `fmnist predict`'s preparation and inference of the
JPEG. Dynamic batching off (max_batch 1) and with a delay (max_delay_ms 1 and 2), against the default, on the
binary single image at 1, 16 and 64; there too onnxruntime on one thread (threads 1, where the server's default is one
per core). bench/report.py prints the table, the ratios to the goals and the batching table after the run.

Before a route is timed, its answer to one request is checked against onnxruntime in this process. Each row:
a warm-up, then ROUNDS rounds of a fixed number of requests; requests/s and images/s from the median round,
latencies (p50/p90/p99) over all timed rounds. Under --benchmark-disable: one small round, no warm-up.
"""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="fmnist serve needs the extra: pip install 'fmnist[serve]'")
pytest.importorskip("uvicorn", reason="fmnist serve needs the extra: pip install 'fmnist[serve]'")

from bench.common import new_network, record  # noqa: E402
from fmnist import runtime  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.images import product_photo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INFER = "/v2/models/fmnist/infer"
CONCURRENCY = [1, 16, 64]
BIG = 1024   # images in one request of the batch rows
ROUNDS = 3
TIMEOUT_S = 120   # a round that takes longer fails: the server hangs or is far slower than it should be


# ---- the server --------------------------------------------------------------------------------------------

class ServerProcess:
    """fmnist.serve.serve(Settings(...)) in its own process on a free loopback port, its app with the no-op route
    (bench/noop_route.py); its log in a file."""

    CODE = ("import json, sys; from fmnist.serve.launcher import serve; from fmnist.serve.settings import Settings; "
            "serve(Settings(**json.loads(sys.argv[1]), port=int(sys.argv[2])), factory='bench.noop_route:app')")

    def __init__(self, onnx: Path, **settings):
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.CODE, json.dumps({"onnx": str(onnx), "grpc_port": 0, **settings}),
             str(self.port)], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as reply:
                    if json.loads(reply.read()).get("ready"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.stop()}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process so far, all its threads."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def runs(self) -> tuple[float, float]:
        """(images, onnxruntime runs) so far, from /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("fmnist_batch_images_"))
        return float(values.get("fmnist_batch_images_sum", 0)), float(values.get("fmnist_batch_images_count", 0))

    def stop(self) -> str:
        """Stop it as Ctrl-C does, and return its log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        return output


# ---- the client: a closed loop on raw asyncio connections --------------------------------------------------

def http_request(path: str, body: bytes, headers: dict | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends the load's request, reads the answer (Content-Length framed), repeats."""

    def __init__(self, load: "Load"):
        self.load, self.buffer, self.need, self.status, self.sent_at = load, bytearray(), None, 0, 0.0

    def connection_made(self, transport):
        self.transport = transport

    def send(self):
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.request)

    def data_received(self, data):
        self.buffer += data
        if self.need is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            self.status = int(head[9:12])
            start = head.index(b"\r\ncontent-length:") + 17
            stop = head.find(b"\r\n", start)
            self.need = end + 4 + int(head[start:stop if stop >= 0 else None])
        if len(self.buffer) >= self.need:
            latency = time.perf_counter() - self.sent_at
            self.buffer, self.need = bytearray(), None
            self.load.answered(self, self.status, latency)

    def connection_lost(self, exc):
        self.load.lost(exc)


class Load:
    """`concurrency` connections to the server, each sending `request` again as soon as it is answered, until
    `requests` have been sent; one event loop in this thread."""

    def __init__(self, server: ServerProcess, request: bytes, concurrency: int):
        try:
            import uvloop
            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.server, self.request, self.concurrency = server, request, concurrency
        self.connections: list[_Connection] = []
        self.rounds: list[dict] = []
        self.closing = False

    def connect(self) -> None:
        self.closing = False
        for _ in range(self.concurrency):
            _, connection = self.loop.run_until_complete(
                self.loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.server.port))
            self.connections.append(connection)

    def close(self) -> None:
        self.closing = True
        for connection in self.connections:
            connection.transport.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.connections = []

    def run(self, requests: int) -> dict:
        """One round of `requests` requests; what it measured is appended to self.rounds."""
        if not self.connections:
            self.connect()
        self.left, self.busy = requests, 0
        self.latencies, self.statuses = [], Counter()
        self.done = self.loop.create_future()
        server_cpu, client_cpu, start = self.server.cpu_seconds(), time.process_time(), time.perf_counter()
        for connection in self.connections[:requests]:
            self.left -= 1
            self.busy += 1
            connection.send()
        self.loop.run_until_complete(asyncio.wait_for(self.done, TIMEOUT_S))
        wall = time.perf_counter() - start
        result = {"requests": requests, "seconds": wall, "latencies": self.latencies, "statuses": self.statuses,
                  "client_cpu": time.process_time() - client_cpu, "server_cpu": self.server.cpu_seconds() - server_cpu}
        self.rounds.append(result)
        return result

    def answered(self, connection: _Connection, status: int, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] += 1
        if self.left > 0:
            self.left -= 1
            connection.send()
        else:
            self.busy -= 1
            if self.busy == 0 and not self.done.done():
                self.done.set_result(None)

    def lost(self, exc) -> None:
        if not self.closing and hasattr(self, "done") and not self.done.done():
            self.done.set_exception(ConnectionError(f"the server closed a connection ({exc})"))

    def __del__(self):
        if not self.loop.is_closed():
            self.loop.close()


def measure(benchmark, server: ServerProcess, request: bytes, *, path: str, images: int, concurrency: int,
            requests: int, allowed=(200,)) -> None:
    """Time rounds of `requests` requests at `concurrency`, and put the figures into the row's extra_info."""
    load = Load(server, request, concurrency)
    if benchmark.disabled:
        requests = max(2 * concurrency, 4)
    else:
        load.run(max(requests // 4, concurrency))   # warm-up: connections, caches, the server's thread pool
        load.close()
        load.rounds.clear()
    before = server.runs()
    try:
        benchmark.pedantic(load.run, setup=lambda: load.connect() or ((requests,), {}),
                           teardown=lambda *_: load.close(), rounds=ROUNDS)   # connecting is not timed
    finally:
        load.close()
        load.loop.close()
    after = server.runs()
    rounds = load.rounds
    statuses = sum((r["statuses"] for r in rounds), Counter())
    assert set(statuses) <= set(allowed), f"statuses {dict(statuses)} (the server's log is checked as it stops)"
    total = sum(r["requests"] for r in rounds)
    latencies = np.array([x for r in rounds for x in r["latencies"]]) * 1000
    runs = after[1] - before[1]
    benchmark.extra_info.update(
        path=path, batch_size=images, device="cpu", concurrency=concurrency, server=server_label(server.settings),
        requests_per_round=requests, p50_ms=float(np.percentile(latencies, 50)),
        p90_ms=float(np.percentile(latencies, 90)), p99_ms=float(np.percentile(latencies, 99)),
        client_cpu_ms_per_request=1000 * sum(r["client_cpu"] for r in rounds) / total,
        server_cpu_ms_per_request=1000 * sum(r["server_cpu"] for r in rounds) / total,
        refused=sum(n for status, n in statuses.items() if status != 200) / total,
        images_per_run=(after[0] - before[0]) / runs if runs else None)
    if benchmark.stats:   # None under --benchmark-disable
        median = benchmark.stats.stats.median
        ok = sum(r["statuses"][200] for r in rounds) / total   # 503s (a full queue) are not throughput
        benchmark.extra_info.update(requests_per_second=requests / median,
                                    samples_per_second=ok * requests * images / median)


def server_label(settings: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items()) or "default"


# ---- requests and what they must answer --------------------------------------------------------------------

def v2_json(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                                   "data": images.reshape(-1).tolist()}]}).encode()


def v2_binary(images: np.ndarray) -> tuple[bytes, dict]:
    """Triton's binary tensor extension: the JSON header, then the raw little-endian floats; binary answers."""
    header = json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + images.astype("<f4").tobytes(), {"Content-Type": "application/octet-stream",
                                                     "Inference-Header-Content-Length": str(len(header))}


def multipart(name: str, content: bytes) -> tuple[bytes, dict]:
    boundary = "fmnist-bench-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post(url: str, body: bytes, headers: dict | None = None):
    """(headers, body) of the answer; the headers' names case-insensitive."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        return reply.headers, reply.read()


def binary_outputs(headers, body: bytes) -> dict[str, np.ndarray]:
    """The outputs of a binary v2 answer, by name, as the binary tensor extension lays them out."""
    length = int(headers["Inference-Header-Content-Length"])
    header, offset, outputs = json.loads(body[:length]), length, {}
    for output in header["outputs"]:
        assert output["datatype"] == "FP32", output
        size = output["parameters"]["binary_data_size"]
        outputs[output["name"]] = np.frombuffer(body[offset:offset + size], "<f4").reshape(output["shape"])
        offset += size
    assert offset == len(body)
    return outputs


@pytest.fixture(scope="module")
def served_onnx(train_split, tmp_path_factory):
    """The ONNX model as `fmnist export --onnx` writes it (logits, ood_score, class names and threshold), from
    an untrained Network: the arithmetic per image, and so the speed, is a trained model's."""
    from fmnist import ood
    from fmnist.export import to_onnx

    count = 10_000   # the training images the out-of-distribution score is fitted to: enough for its shape
    detector, threshold = ood.fit(new_network(), runtime.to_model_input(train_split.images[:count]),
                                  train_split.labels[:count])
    path = tmp_path_factory.mktemp("serve") / "fmnist.onnx"
    path.write_bytes(to_onnx(detector, threshold).SerializeToString())
    return path


@pytest.fixture(scope="module")
def session(served_onnx):
    """onnxruntime in this process as the server makes it: one intra-op thread per core, spinning on."""
    return runtime.session(served_onnx, threads=os.cpu_count())


@pytest.fixture(scope="module")
def images(test_split):
    return runtime.to_model_input(test_split.images[:BIG])


@pytest.fixture(scope="module")
def photo(test_split) -> bytes:
    """A test image (an ankle boot) as a 280 x 280 product photo, JPEG at quality 90."""
    buffer = io.BytesIO()
    product_photo(test_split.images[0], margins=(0, 0)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(served_onnx):
    running = ServerProcess(served_onnx)
    yield running
    log = running.stop()
    assert "Traceback" not in log, log


def check_v2(server: ServerProcess, session, images: np.ndarray, binary: bool) -> bytes:
    """The request, after checking that the server's logits and scores for it are onnxruntime's in-process."""
    expected = runtime.run(session, images)
    if binary:
        body, headers = v2_binary(images)
        outputs = binary_outputs(*post(server.url + INFER, body, headers))
    else:
        body, headers = v2_json(images), {"Content-Type": "application/json"}
        answer = json.loads(post(server.url + INFER, body, headers)[1])
        outputs = {o["name"]: np.reshape(o["data"], o["shape"]) for o in answer["outputs"]}
    np.testing.assert_allclose(outputs["logits"], expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outputs["ood_score"].reshape(-1), expected[1], rtol=1e-5, atol=1e-5)
    return http_request(INFER, body, headers)


# ---- the rows ----------------------------------------------------------------------------------------------

SINGLE_REQUESTS = {1: 400, 16: 1000, 64: 1000}   # per timed round


@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_noop_route(benchmark, server, images, concurrency):
    assert post(server.url + "/bench/noop", v2_json(images[:1]))[1] == b"{}"
    request = http_request("/bench/noop", v2_json(images[:1]), {"Content-Type": "application/json"})
    measure(benchmark, server, request, path="no-op route", images=1, concurrency=concurrency,
            requests=SINGLE_REQUESTS[concurrency])


@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_v2_binary(benchmark, server, session, images, concurrency):
    request = check_v2(server, session, images[:1], binary=True)
    measure(benchmark, server, request, path="v2 binary", images=1, concurrency=concurrency,
            requests=SINGLE_REQUESTS[concurrency])


@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_v2_json(benchmark, server, session, images, concurrency):
    request = check_v2(server, session, images[:1], binary=False)
    measure(benchmark, server, request, path="v2 JSON", images=1, concurrency=concurrency,
            requests=SINGLE_REQUESTS[concurrency])



# ---- dynamic batching: off, the default (no delay), and with a delay; and onnxruntime on one thread ----------

# threads 1: onnxruntime runs on the calling thread alone, with no pool of its own whose idle threads spin
BATCHING = [{"max_batch": 1}, {"max_delay_ms": 1}, {"max_delay_ms": 2}, {"threads": 1}]


@pytest.fixture(scope="module", params=BATCHING, ids=[server_label(s) for s in BATCHING])
def batching_server(request, served_onnx):
    running = ServerProcess(served_onnx, **request.param)
    yield running
    log = running.stop()
    assert "Traceback" not in log, log


@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_v2_binary_batching(benchmark, batching_server, session, images, concurrency):
    request = check_v2(batching_server, session, images[:1], binary=True)
    measure(benchmark, batching_server, request, path="v2 binary", images=1, concurrency=concurrency,
            requests=SINGLE_REQUESTS[concurrency])


# ---- batches of 1024, and the bounds in this process ------------------------------------------------------

@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("concurrency", [1, 2, 16, 64])
def test_v2_binary_batch(benchmark, server, session, images, concurrency):
    """1024 images a request. At 64 more images wait than the queue holds (16,384): some answers are 503s."""
    request = check_v2(server, session, images, binary=True)
    measure(benchmark, server, request, path="v2 binary", images=BIG, concurrency=concurrency,
            requests={1: 20, 2: 30, 16: 64, 64: 128}[concurrency], allowed=(200, 503))


@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("batch_size", [1, BIG])
def test_onnxruntime_in_process(benchmark, session, images, batch_size):
    """The bound of the v2 rows: onnxruntime in this process, no HTTP (next to the batch rows, as the machine's
    load drifts)."""
    batch = images[:batch_size]
    benchmark(runtime.run, session, batch, batch_size)
    record(benchmark, path="onnxruntime in-process", samples=batch_size, batch_size=batch_size, device="cpu",
           concurrency=None, server="in-process")


@pytest.mark.benchmark(group="serve")
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_predict_jpeg(benchmark, server, session, photo, concurrency):
    body, headers = multipart("boot.jpg", photo)
    [answer] = json.loads(post(server.url + "/predict", body, headers)[1])
    prepared = runtime.load_image(io.BytesIO(photo))
    [expected] = runtime.predictions(session, prepared.input)
    assert answer["negated"] == prepared.negated
    assert [t["class"] for t in answer["top"]] == [t["class"] for t in expected["top"]]
    measure(benchmark, server, http_request("/predict", body, headers), path="/predict JPEG", images=1,
            concurrency=concurrency, requests={1: 200, 16: 400, 64: 400}[concurrency])


@pytest.mark.benchmark(group="serve")
def test_predict_in_process(benchmark, session, photo):
    """The bound of /predict: `fmnist predict`'s work for one JPEG in this process (decode and prepare it, run it,
    the top classes)."""
    def prepare_and_predict():
        return runtime.predictions(session, runtime.load_image(io.BytesIO(photo)).input)

    benchmark(prepare_and_predict)
    record(benchmark, path="predict in-process", samples=1, batch_size=1, device="cpu", concurrency=None,
           server="in-process")
