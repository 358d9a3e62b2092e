"""`fmnist serve`: the real server (uvicorn, on loopback) answering tritonclient, /predict, bad input and load."""

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette", reason="fmnist serve needs the extra: pip install 'fmnist[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the tests drive the server with tritonclient[http]")

from fmnist import runtime  # noqa: E402
from tests.conftest import Server, free_port, run_cli  # noqa: E402
from tests.images import product_photo  # noqa: E402


@pytest.fixture(scope="module")
def model(exported):
    path = exported[0]
    return path, runtime.session(path)


@pytest.fixture(scope="module")
def images(real_data):
    from fmnist import data

    test = data.load("test")
    return runtime.to_model_input(test.images[:300])


@contextlib.contextmanager
def running(onnx, **settings):
    """create_app(Settings(...)) on a real uvicorn server in a thread of this process, on a free loopback port:
    for settings the command line does not offer (a tiny queue)."""
    import uvicorn

    from fmnist.serve.rest import create_app
    from fmnist.serve.settings import Settings

    settings = {"grpc_port": 0, **settings}   # REST alone, unless a test asks for gRPC
    config = uvicorn.Config(create_app(Settings(onnx=str(onnx), **settings)), host="127.0.0.1", port=free_port(),
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def v2_json(images: np.ndarray, name: str = "images", datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(images.shape), "datatype": datatype,
                                   "data": images.reshape(-1).tolist()}]}).encode()


def client(url: str):
    return httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=30, network_timeout=30)


def infer(triton, images: np.ndarray, binary: bool, **output) -> "httpclient.InferResult":
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary, **output)] if output else None
    return triton.infer("fmnist", [tensor], outputs=outputs)


# ---- the protocol, with the real client ---------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("count", [1, 300])
def test_tritonclient_gets_the_logits_of_onnxruntime_in_process(server, model, images, binary, count):
    triton = client(server.url)
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("fmnist")
    result = infer(triton, images[:count], binary)
    logits, scores = runtime.run(model[1], images[:count])
    assert result.as_numpy("logits").shape == (count, 10)
    assert result.as_numpy("ood_score").shape == (count, 1)   # as Triton gives it: dims [1] (config.pbtxt)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("ood_score")[:, 0], scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension_names_the_top_classes(server, model, images, binary):
    result = infer(client(server.url), images[:5], binary, class_count=3).as_numpy("logits")
    expected = runtime.predictions(model[1], images[:5], 3)
    assert result.shape == (5, 3)
    for row, prediction in zip(result, expected, strict=True):
        entries = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
        assert [label for _, _, label in entries] == [top["class"] for top in prediction["top"]]
        assert [float(value) for value, _, _ in entries] == sorted((float(v) for v, _, _ in entries), reverse=True)


def test_model_metadata_says_names_shapes_classes_and_threshold(server, model):
    metadata = client(server.url).get_model_metadata("fmnist")
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert metadata["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert metadata["parameters"]["classes"] == runtime.class_names(model[1])
    assert metadata["parameters"]["ood_threshold"] == pytest.approx(runtime.ood_threshold(model[1]))
    assert client(server.url).get_model_metadata("fmnist", model_version="1")["name"] == "fmnist"


def test_config_route_is_the_repositorys_config_pbtxt_under_tritons_schema(server, exported, tmp_path):
    """Triton's model-configuration extension: GET /v2/models/fmnist/config is the configuration that `fmnist
    export --triton` writes to config.pbtxt, field for field, both read by Triton's own ModelConfig protobuf."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from fmnist.triton import write_model_repository

    served = client(server.url).get_model_config("fmnist")
    assert client(server.url).get_model_config("fmnist", model_version="1") == served
    written = text_format.Parse((write_model_repository(exported[0], tmp_path) / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
    assert json_format.ParseDict(served, model_config_pb2.ModelConfig()) == written
    assert served["max_batch_size"] == 1024 and [o["dims"] for o in served["output"]] == [[10], [1]]
    metadata = client(server.url).get_model_metadata("fmnist")   # the shapes a client gets, as Triton says them
    assert [o["shape"] for o in metadata["outputs"]] == [[-1, 10], [-1, 1]]
    assert {"model_configuration", "statistics"} <= set(client(server.url).get_server_metadata()["extensions"])


def test_statistics_count_requests_runs_and_their_time_as_triton_does(exported, images):
    """Triton's statistics extension: per request (success, fail, and where the time went) and per run by its
    batch size, in Triton's JSON, as perf_analyzer reads it."""
    with running(exported[0]) as url:
        triton = client(url)
        for count in (1, 5, 2, 5):
            infer(triton, images[:count], binary=True)
        post(url + INFER, b"{}")   # refused: one failure
        [stats] = triton.get_inference_statistics("fmnist")["model_stats"]
    assert (stats["name"], stats["version"]) == ("fmnist", "1")
    assert stats["inference_count"] == 13 and stats["execution_count"] == 4
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert inference["fail"]["count"] == 1
    for stage in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[stage]["count"] == 4, stage
    assert all(inference[stage]["ns"] > 0 for stage in ("success", "compute_input", "compute_infer", "compute_output"))
    parts = sum(inference[stage]["ns"] for stage in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts <= inference["success"]["ns"]   # the stages lie within each request's whole time
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]} == {1: 1, 2: 1, 5: 2}


def test_runs_of_few_images_on_the_one_thread_session_agree_with_the_others(exported, images):
    from fmnist.serve.dataplane import ONE_THREAD_BELOW, Model

    model = Model(str(exported[0]), threads=2)
    assert model.small is not model.session and model.runners == 2   # two runs at once, one of them beside
    few, many = model.run(images[:3]), model.run(images[:ONE_THREAD_BELOW + 4])
    beside = model.run_beside(images[:ONE_THREAD_BELOW + 4])
    for small, large, other in zip(few, many, beside, strict=True):
        np.testing.assert_allclose(small, large[:3], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other, large, rtol=1e-5, atol=1e-6)


def test_unknown_model_and_version_are_404_with_the_protocol_error(server):
    for path in ("/v2/models/resnet", "/v2/models/fmnist/versions/7", "/v2/models/resnet/ready",
                 "/v2/models/resnet/config", "/v2/models/fmnist/versions/7/stats"):
        status, body = get(server.url + path)
        assert status == 404 and "fmnist" in json.loads(body)["error"], (path, body)


# ---- /predict -------------------------------------------------------------------------------------------------

def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, dict]:
    boundary = "fmnist-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n" for name, content in files]
    return (b"".join(parts) + f"--{boundary}--\r\n".encode(),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def jpeg(pixels: np.ndarray | int) -> bytes:
    """A 28 x 28 image (or random pixels from a seed) as a product photo, JPEG's bytes."""
    if isinstance(pixels, int):
        pixels = np.random.default_rng(pixels).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    product_photo(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_predict_answers_what_fmnist_predict_json_answers(server, exported, images, tmp_path):
    files = [(f"photo{i}.jpg", jpeg((images[i, 0] * 255).astype(np.uint8))) for i in range(3)]
    for name, content in files:
        (tmp_path / name).write_bytes(content)
    status, _, reply = post(server.url + "/predict?top=4", *multipart(files))
    assert status == 200, reply
    served = json.loads(reply)
    cli = run_cli("predict", "--onnx", exported[0], "--json", "--top", "4", *(tmp_path / n for n, _ in files))
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.stdout)
    for item, want, (name, _) in zip(served, expected, files, strict=True):
        seen = item.pop("input")
        assert item == {**want, "image": name}
        image = runtime.load_image(tmp_path / name).input
        from PIL import Image
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(seen.removeprefix("data:image/png;base64,")))))
        np.testing.assert_array_equal(shown, (image[0, 0] * 255).round().astype(np.uint8))


# ---- bad input: a 4xx that says what to fix, and the server goes on --------------------------------------------

def truncated_jpeg() -> bytes:
    whole = jpeg(7)
    return whole[:len(whole) // 2]


def bomb_png() -> bytes:
    """A 1-bit PNG of 10,000 x 5,000 pixels: a few kilobytes that would decode to 50 million pixels (150 MB as RGB)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image(**changes) -> bytes:
    tensor = {"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784, **changes}
    return json.dumps({"inputs": [tensor]}).encode()


INFER = "/v2/models/fmnist/infer"
HUGE_HEADER = json.dumps({"inputs": [{"name": "images", "shape": [2**60 + 1, 1, 28, 28], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 3136}}]}).encode()
BINARY_HEADER = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 3136}}]}).encode()
BAD_REQUESTS = {   # id: (path, body, headers, status, words the error must contain)
    "empty body": (INFER, b"", {}, 400, "empty body"),
    "malformed JSON": (INFER, b'{"inputs": [', {}, 400, "not valid JSON"),
    "no inputs": (INFER, b"{}", {}, 400, "inputs"),
    "wrong tensor name": (INFER, image(name="pixels"), {}, 400, "'images'"),
    "wrong datatype": (INFER, image(datatype="INT64"), {}, 400, "FP32"),
    "unknown datatype": (INFER, image(datatype="STRING"), {}, 400, "FP32"),
    "wrong shape": (INFER, image(shape=[1, 28, 28]), {}, 400, "[N, 1, 28, 28]"),
    "wrong element count": (INFER, image(data=[0.5] * 700), {}, 400, "784"),
    "strings as data": (INFER, image(data=["a"] * 784), {}, 400, "numbers"),
    "NaN": (INFER, image(data=[float("nan")] * 784).replace(b"NaN", b"NaN"), {}, 400, "NaN"),
    "pixels of 255": (INFER, image(data=[255.0] * 784), {}, 400, "divide 8-bit pixels by 255"),
    "no images": (INFER, image(shape=[0, 1, 28, 28], data=[]), {}, 400, "no images"),
    "too many images": (INFER, image(shape=[4097, 1, 28, 28], data=[0.0] * 4097 * 784), {}, 400, "at most 4096"),
    "unknown output": (INFER, json.dumps({"inputs": json.loads(image())["inputs"], "outputs": [{"name": "probs"}]})
                       .encode(), {}, 400, "logits"),
    "binary header past the body": (INFER, image(), {"Inference-Header-Content-Length": "99999"}, 400,
                                    "Inference-Header-Content-Length"),
    "binary size that does not match": (INFER, BINARY_HEADER + b"\0" * 100,
                                        {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400,
                                        "binary_data_size is 3136 but 100 bytes follow"),
    "compressed body": (INFER, image(), {"Content-Encoding": "gzip"}, 415, "uncompressed"),
    "300 as UINT8": (INFER, image(datatype="UINT8", data=[300] * 784), {}, 400, "numbers (UINT8)"),
    "a shape whose product wraps around in int64": (
        INFER, HUGE_HEADER + b"\0" * 3136, {"Inference-Header-Content-Length": str(len(HUGE_HEADER))}, 400,
        "3136 bytes is not"),
    "an output named twice": (INFER, json.dumps({"inputs": json.loads(image())["inputs"], "outputs": [
        {"name": "logits", "parameters": {"classification": 3}}, {"name": "logits"}]}).encode(), {}, 400,
        "name each output once"),
    "no files": ("/predict", *multipart([("a.jpg", b"")], field="photo"), 400, "field `files`"),
    "not an image": ("/predict", *multipart([("notes.txt", b"just some words")]), 400, "notes.txt: cannot read"),
    "truncated JPEG": ("/predict", *multipart([("cut.jpg", truncated_jpeg())]), 400, "cut.jpg: cannot read"),
    "decompression bomb": ("/predict", *multipart([("bomb.png", bomb_png())]), 400, "bomb.png: 10000 x 5000"),
    "65 files in one upload": ("/predict", *multipart([(f"{i}.jpg", jpeg(1)) for i in range(65)]), 400,
                               "Maximum number of files is 64"),
    "top 0": ("/predict?top=0", *multipart([("p.jpg", jpeg(1))]), 400, "top=0"),
    "top not a number": ("/predict?top=many", *multipart([("p.jpg", jpeg(1))]), 400, "top"),
    "not multipart": ("/predict", b"hello", {"Content-Type": "text/plain"}, 400, "multipart/form-data"),
    "body over the limit": (INFER, b"x" * (20 * 2**20 + 1), {}, 413, "--max-body-mb"),
    "unknown route": ("/v2/models/fmnist/explain", b"{}", {}, 404, "no such route"),
}


@pytest.fixture(scope="module")
def small_server(exported):
    """A server with a 20 MiB body limit: room for 4097 images in JSON, and an oversized body is cheap to send."""
    running = Server(exported[0], "--max-body-mb", "20")
    yield running
    running.stop()


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_a_4xx_json_error_that_says_what_to_fix(small_server, case):
    path, body, headers, status, words = case
    got, reply_headers, reply = post(small_server.url + path, body, headers)
    assert got == status, reply
    assert reply_headers["content-type"] == "application/json"
    message = json.loads(reply)["error"]
    assert words in message and "Traceback" not in message
    ok, _, _ = post(small_server.url + INFER, image())   # and the server goes on
    assert ok == 200


def test_a_chunked_body_over_the_limit_is_stopped_while_it_is_read(small_server):
    """No Content-Length: the limit is counted as the chunks arrive, not after the whole body is in memory."""
    def chunks():
        for _ in range(400):
            yield b"x" * 65536

    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=30)
    connection.request("POST", INFER, body=chunks(), encode_chunked=True)
    reply = connection.getresponse()
    assert reply.status == 413 and "--max-body-mb" in json.loads(reply.read())["error"]


def test_a_client_that_disconnects_mid_request_or_mid_batch_harms_no_other(exported, images):
    """Requests wait up to 300 ms for each other (one batch); two clients vanish, one before its body is
    complete and one while its batch is waiting: the others get their own logits, and the server goes on."""
    expected = runtime.run(runtime.session(exported[0]), images[:8])[0]
    with running(exported[0], max_batch=64, max_delay_ms=300) as url:
        port = int(url.rsplit(":", 1)[1])
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode() + b"{" * 500)
        gone = socket.create_connection(("127.0.0.1", port))
        body = v2_json(images[:1])
        gone.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.05)
        with ThreadPoolExecutor(8) as pool:
            replies = [pool.submit(post, url + INFER, v2_json(images[i:i + 1])) for i in range(8)]
            time.sleep(0.05)
            half.close()
            gone.close()
            for i, reply in enumerate(replies):
                status, _, content = reply.result()
                assert status == 200
                np.testing.assert_allclose(json.loads(content)["outputs"][0]["data"], expected[i], atol=1e-5)
        assert post(url + INFER, image())[0] == 200


def test_overload_is_503_with_retry_after_not_unbounded_memory(exported, images):
    """A queue of at most 8 images, runs waiting 200 ms for more: 64 concurrent requests of 4 images each
    cannot all queue; those past the bound are told to come back, the rest get answers."""
    with running(exported[0], max_batch=8, max_delay_ms=200, max_queue=8) as url:
        with ThreadPoolExecutor(64) as pool:
            replies = list(pool.map(lambda _: post(url + INFER, v2_json(images[:4])), range(64)))
        statuses = [status for status, _, _ in replies]
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        assert set(statuses) <= {200, 503}
        refused = next(r for r in replies if r[0] == 503)
        assert refused[1]["retry-after"] == "1" and "overloaded" in json.loads(refused[2])["error"]
        assert post(url + INFER, image())[0] == 200


def test_requests_that_arrive_together_share_one_onnxruntime_run(exported, images):
    with running(exported[0], max_batch=64, max_delay_ms=200) as url:
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda i: post(url + INFER, v2_json(images[i:i + 1]))[0], range(16)))
        assert statuses == [200] * 16
        metrics = parse_metrics(get(url + "/metrics")[1])
        assert metrics["fmnist_images_total"] == 16
        assert metrics["fmnist_batch_images_count"] < 16   # fewer runs than requests
        assert metrics["fmnist_batch_images_sum"] == 16


def parse_metrics(text: bytes) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
                                 if sample.labels else "")
            values[key] = sample.value
    return values


def test_metrics_count_requests_by_route_and_status_images_and_batches(exported, images):
    with running(exported[0]) as url:
        triton = client(url)
        infer(triton, images[:5], binary=True)
        infer(triton, images[:3], binary=False)
        post(url + INFER, b"{}")
        get(url + "/no/such/page")
        metrics = parse_metrics(get(url + "/metrics")[1])
    assert metrics["fmnist_requests_total{endpoint=/v2/models/{name}/infer,status=200}"] == 2
    assert metrics["fmnist_requests_total{endpoint=/v2/models/{name}/infer,status=400}"] == 1
    assert metrics["fmnist_requests_total{endpoint=other,status=404}"] == 1
    assert metrics["fmnist_images_total"] == 8
    assert metrics["fmnist_batch_images_sum"] == 8
    assert metrics["fmnist_queue_seconds_count"] == 2
    assert metrics["fmnist_request_seconds_count{endpoint=/v2/models/{name}/infer}"] == 3


# ---- the command -----------------------------------------------------------------------------------------------

def test_serve_stops_cleanly_on_ctrl_c_and_names_its_url(exported):
    running_server = Server(exported[0])
    output = running_server.stop(signal.SIGINT)
    assert running_server.process.returncode == 0, output
    assert f"at {running_server.url}" in output and "stopped" in output and "Traceback" not in output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_answers_the_request_in_flight_exits_0_and_leaves_nothing(exported, images, tmp_path, workers):
    """SIGTERM, how Docker and Kubernetes stop a server, while a request is half sent: the server stops taking
    new connections, answers that request in full, exits 0 as for Ctrl-C, and removes its metrics folder."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "fmnist.cli", "serve", "--onnx", str(exported[0]), "--port",
                                str(port), "--workers", workers], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                if get(f"http://127.0.0.1:{port}/v2/health/ready")[0] == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.1)
        if workers == "2":
            assert list(tmp_path.glob("fmnist-metrics-*")), "the workers' metrics folder is where TMPDIR says"
        body = v2_json(images[:3])
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:100])
        time.sleep(0.5)                       # the request is being read...
        process.send_signal(signal.SIGTERM)   # ...when the signal comes
        time.sleep(0.5)
        connection.sendall(body[100:])
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
        connection.close()
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    head, _, answer = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    assert [o["shape"] for o in json.loads(answer)["outputs"]] == [[3, 10], [3, 1]]
    assert process.returncode == 0, output
    assert "stopped" in output and "Traceback" not in output
    assert not list(tmp_path.glob("fmnist-metrics-*")), "the metrics folder is left behind"


def test_several_workers_share_the_port_and_the_metrics(exported, images):
    running_server = Server(exported[0], "--workers", "2")
    try:
        with ThreadPoolExecutor(8) as pool:   # on 8 connections at once, so that both processes take some
            statuses = list(pool.map(lambda i: post(running_server.url + INFER, v2_json(images[:2]))[0], range(40)))
        assert statuses == [200] * 40
        for _ in range(5):   # every scrape adds up both processes, whichever of them answers it
            assert parse_metrics(get(running_server.url + "/metrics")[1])["fmnist_images_total"] == 80
            [stats] = json.loads(get(running_server.url + "/v2/models/fmnist/stats")[1])["model_stats"]
            assert stats["inference_count"] == 80 and stats["inference_stats"]["success"]["count"] == 40
    finally:
        output = running_server.stop()
    assert "Traceback" not in output


def test_a_port_in_use_is_one_line(exported):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--onnx", exported[0], "--port", taken.getsockname()[1])
    assert result.exit_code == 1
    assert "choose another --port" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_a_port_outside_0_to_65535_is_one_line(exported, port):
    result = run_cli("serve", "--onnx", exported[0], "--port", port)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == f"error: --port {port}: must be 0 to 65535 (0: a free port, chosen by the system)"


def test_port_0_listens_on_a_free_port_and_prints_that_port(exported):
    process = subprocess.Popen([sys.executable, "-m", "fmnist.cli", "serve", "--onnx", str(exported[0]), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = process.stdout.readline()   # "serving ... at http://127.0.0.1:PORT  (...)"
        url = first.split(" at ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        assert port != 0, first
        deadline = time.monotonic() + 60
        while True:   # that port, not another, answers
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, first
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def test_a_missing_model_is_one_line_before_the_server_starts(tmp_path):
    result = run_cli("serve", "--onnx", tmp_path / "none.onnx", "--port", free_port())
    assert result.exit_code == 1 and "fmnist export --onnx" in result.stderr


def test_without_the_serve_extra_it_names_the_extra(monkeypatch):
    for name in ["starlette", *(name for name in sys.modules if name.startswith("starlette."))]:
        monkeypatch.setitem(sys.modules, name, None)   # as if not installed: importing it raises ImportError
    for name in [name for name in sys.modules if name == "fmnist.serve" or name.startswith("fmnist.serve.")]:
        monkeypatch.delitem(sys.modules, name)   # the package and its modules are imported afresh, as in a new process
    monkeypatch.delattr("fmnist.serve", raising=False)
    result = run_cli("serve")
    assert result.exit_code == 1 and result.stderr.strip() == 'error: fmnist serve needs starlette: pip install ' \
        '"fmnist[serve]"'


def test_the_server_never_imports_torch():
    """Every module of fmnist/serve/, imported in a new process: neither torch nor a training module comes in."""
    code = ("import json, pkgutil, sys, fmnist.serve\n"
            "names = [m.name for m in pkgutil.iter_modules(fmnist.serve.__path__, 'fmnist.serve.')]\n"
            "for name in names: __import__(name)\n"
            "training = ['torch', 'fmnist.train', 'fmnist.model', 'fmnist.checkpoint', 'fmnist.export', 'fmnist.data',"
            " 'fmnist.ood']\n"
            "print(json.dumps([names, [m for m in training if m in sys.modules]]))")
    reply = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert reply.returncode == 0, reply.stderr
    imported, training = json.loads(reply.stdout)
    assert {"fmnist.serve.rest", "fmnist.serve.dataplane", "fmnist.serve.rpc", "fmnist.serve.launcher",
            "fmnist.serve.protocol", "fmnist.serve.batching"} <= set(imported)
    assert training == []


# ---- fuzz: random bodies and headers on every route ------------------------------------------------------------

ROUTES = [("GET", "/"), ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),
          ("GET", "/v2/models/fmnist"), ("GET", "/v2/models/fmnist/ready"), ("POST", INFER),
          ("POST", "/v2/models/fmnist/versions/1/infer"), ("POST", "/predict"), ("GET", "/metrics")]


def test_fuzz_no_route_answers_500_and_the_server_goes_on(exported):
    """Random bodies and headers on every route, in-process. A fuzzer that knows the protocol: most requests
    are valid but for one or two fields (a pixel that is a string, a shape one short...), so they get past
    the first check. Every answer is below 500, with a JSON error where there is an error."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from starlette.testclient import TestClient

    from fmnist.serve.rest import create_app
    from fmnist.serve.settings import Settings

    def mostly(valid, strategy):   # the valid value three times in four
        return st.integers(0, 3).flatmap(lambda i: strategy if i == 3 else st.just(valid))

    def poisoned(replacements):   # a valid image's 784 pixels, a few of them replaced by anything
        data = [0.5] * 784
        for index, value in replacements:
            data[index] = value
        return data

    anything = st.one_of(st.floats(), st.integers(-2**70, 2**70), st.booleans(), st.none(), st.text(max_size=3),
                         st.lists(st.floats(), max_size=2))
    data = st.one_of(st.lists(st.tuples(st.integers(0, 783), anything), max_size=2).map(poisoned),
                     st.lists(anything, max_size=20))
    parameters = st.dictionaries(st.sampled_from(["binary_data_size", "classification", "binary_data",
                                                  "binary_data_output"]), anything, max_size=2)
    tensor = st.fixed_dictionaries({
        "name": mostly("images", st.text(max_size=8)),
        "shape": mostly([1, 1, 28, 28], st.lists(st.integers(-3, 30), max_size=5)),
        "datatype": mostly("FP32", st.sampled_from(["FP64", "FP16", "UINT8", "INT8", "BYTES", "BOOL", ""])),
        "data": data}, optional={"parameters": parameters})
    request = st.fixed_dictionaries({"inputs": mostly(None, st.lists(tensor, max_size=2))}, optional={
        "id": mostly("x", anything), "parameters": parameters,
        "outputs": st.lists(st.fixed_dictionaries({"name": mostly("logits", st.text(max_size=8))},
                                                  optional={"parameters": parameters}), max_size=3)})
    infer_body = st.tuples(request, tensor).map(
        lambda rt: json.dumps({**rt[0],
                               "inputs": rt[0]["inputs"] if rt[0]["inputs"] is not None else [rt[1]]}).encode())
    upload = st.lists(st.tuples(st.text(max_size=8), st.one_of(st.binary(max_size=200), st.just(truncated_jpeg()))),
                      min_size=1, max_size=3).map(multipart)
    headers = st.dictionaries(st.sampled_from(["Inference-Header-Content-Length", "Content-Type", "Content-Encoding"]),
                              st.one_of(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12),
                                        st.integers(-5, 400).map(str)), max_size=2)
    bodies = {INFER: st.one_of(infer_body, st.binary(max_size=300)),
              "/predict": st.one_of(upload, st.binary(max_size=300))}

    @st.composite
    def requests(draw):
        method, path = draw(st.sampled_from(ROUTES + [("POST", INFER), ("POST", "/predict")] * 3))
        body = draw(bodies.get(path, st.binary(max_size=100)))
        extra = draw(mostly({}, headers))
        if isinstance(body, tuple):   # a multipart body and its Content-Type
            body, extra = body[0], {**extra, **body[1]}
        return method, path, body, extra

    with TestClient(create_app(Settings(onnx=str(exported[0]), grpc_port=0)), raise_server_exceptions=False) as http:
        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(requests())
        def answers_below_500(request):
            method, path, body, headers = request
            reply = http.request(method, path, content=body, headers=headers)
            assert reply.status_code < 500, (request, reply.text)
            if reply.status_code >= 400:
                assert "error" in reply.json()

        answers_below_500()
        reply = http.post(INFER, content=image())
        assert reply.status_code == 200 and reply.json()["outputs"][0]["shape"] == [1, 10]
