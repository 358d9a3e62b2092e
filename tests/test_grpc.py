"""`fmnist serve` over gRPC: tritonclient.grpc against a real server process, its answers equal to onnxruntime
in-process and to the REST routes', and every bad request a gRPC status with REST's own message."""

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette", reason="fmnist serve needs the extra: pip install 'fmnist[serve]'")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the tests drive the server with tritonclient[grpc]")
httpclient = pytest.importorskip("tritonclient.http", reason="and compare with tritonclient[http]")

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc  # noqa: E402

from fmnist import runtime  # noqa: E402
from tests.conftest import Server, free_port, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def images(real_data):
    from fmnist import data

    return runtime.to_model_input(data.load("test").images[:300])


@pytest.fixture(scope="module")
def server(exported):
    running = Server(exported[0], "--max-body-mb", "2")
    yield running
    running.stop()


def infer(url: str, images: np.ndarray, **output):
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    outputs = [grpcclient.InferRequestedOutput("logits", **output)] if output else None
    return client.infer("fmnist", [tensor], outputs=outputs)


@pytest.mark.parametrize("count", [1, 300])
def test_tritonclient_grpc_gets_the_logits_of_onnxruntime_and_of_rest(server, exported, images, count):
    client = grpcclient.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fmnist")
    result = infer(server.grpc, images[:count])
    logits, scores = runtime.run(runtime.session(exported[0]), images[:count])
    assert result.as_numpy("logits").shape == (count, 10) and result.as_numpy("ood_score").shape == (count, 1)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("ood_score")[:, 0], scores, rtol=1e-5, atol=1e-5)
    rest = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = httpclient.InferInput("images", list(images[:count].shape), "FP32")
    tensor.set_data_from_numpy(images[:count])
    over_rest = rest.infer("fmnist", [tensor])
    for name in ("logits", "ood_score"):
        np.testing.assert_array_equal(result.as_numpy(name), over_rest.as_numpy(name))


def test_typed_contents_are_read_as_raw_ones_are(server, images):
    """A client that sends fp32_contents instead of raw_input_contents (the proto allows both)."""
    request = service_pb2.ModelInferRequest(model_name="fmnist")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[2, 1, 28, 28])
    tensor.contents.fp32_contents.extend(images[:2].ravel().tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["logits", "ood_score"]
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, infer(server.grpc, images[:2]).as_numpy("logits"), rtol=0, atol=1e-6)


def test_classification_strings_match_rest(server, images):
    over_grpc = infer(server.grpc, images[:5], class_count=3).as_numpy("logits")
    rest = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = httpclient.InferInput("images", [5, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images[:5])
    over_rest = rest.infer("fmnist", [tensor], outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    assert over_grpc.shape == (5, 3)
    np.testing.assert_array_equal(over_grpc, over_rest.as_numpy("logits"))


def test_metadata_config_and_statistics_are_rests(server, images):
    client = grpcclient.InferenceServerClient(server.grpc)
    rest = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensors = lambda entries: [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in entries]  # noqa: E731
    metadata, over_rest = client.get_model_metadata("fmnist", as_json=True), rest.get_model_metadata("fmnist")
    assert tensors(metadata["inputs"]) == tensors(over_rest["inputs"]) == [("images", "FP32", [-1, 1, 28, 28])]
    assert tensors(metadata["outputs"]) == tensors(over_rest["outputs"])
    config = client.get_model_config("fmnist").config
    assert config == json_format.ParseDict(rest.get_model_config("fmnist"), model_config_pb2.ModelConfig())
    assert {"model_configuration", "statistics", "classification"} <= set(client.get_server_metadata().extensions)
    before = client.get_inference_statistics("fmnist", as_json=True)["model_stats"][0]
    infer(server.grpc, images[:4])
    after = rest.get_inference_statistics("fmnist")["model_stats"][0]   # one count for both transports
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 4


def bad(images: np.ndarray, name="images", datatype="FP32", shape=None, raw: bytes | None = None):
    request = service_pb2.ModelInferRequest(model_name="fmnist")
    request.inputs.add(name=name, datatype=datatype, shape=list(shape if shape is not None else images.shape))
    request.raw_input_contents.append(raw if raw is not None else images.astype("<f4").tobytes())
    return request


def cases(images):
    one = images[:1]
    return {
        "wrong name": bad(one, name="pixels"),
        "wrong datatype": bad(one, datatype="INT32"),
        "wrong shape": bad(one, shape=[1, 28, 28]),
        "wrong count": bad(one, shape=[2, 1, 28, 28]),
        "NaN": bad(np.full_like(one, np.nan)),
        "out of [0, 1]": bad(one * 255),
        "no images": bad(one, shape=[0, 1, 28, 28], raw=b""),
    }


@pytest.mark.parametrize("case", ["wrong name", "wrong datatype", "wrong shape", "wrong count", "NaN",
                                  "out of [0, 1]", "no images"])   # REST's table, tests/test_serve.py
def test_bad_requests_are_invalid_argument_with_rests_message(server, images, case):
    request = cases(images)[case]
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tensor, raw = request.inputs[0], request.raw_input_contents[0]   # the same request over REST
    body = json.dumps({"inputs": [{"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    rest = urllib.request.Request(server.url + "/v2/models/fmnist/infer", body + raw,
                                  {"Inference-Header-Content-Length": str(len(body))}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(rest, timeout=30)
    assert answered.value.code == 400
    assert refused.value.details() == json.loads(answered.value.read())["error"]
    assert infer(server.grpc, images[:1]).as_numpy("logits").shape == (1, 10)   # and the server goes on


@pytest.mark.parametrize("name, version", [("resnet", ""), ("fmnist", "7")])
def test_unknown_model_or_version_is_not_found(server, images, name, version):
    request = bad(images[:1])
    request.model_name, request.model_version = name, version
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for call in (lambda: stub.ModelInfer(request),
                     lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=name, version=version)),
                     lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name=name, version=version))):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "fmnist" in refused.value.details()


def test_a_message_over_the_limit_is_resource_exhausted(server):
    """--max-body-mb 2 (the fixture's): gRPC's own receive limit, set from it."""
    images = np.zeros((700, 1, 28, 28), np.float32)   # 2.2 MB
    with pytest.raises(Exception) as refused:
        infer(server.grpc, images)
    assert "RESOURCE_EXHAUSTED" in str(refused.value)
    assert infer(server.grpc, images[:600]).as_numpy("logits").shape == (600, 10)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on, from /proc: its sockets' inodes among the listening ones."""
    import os

    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:   # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_grpc_listens_beside_rest_and_port_0_turns_it_off(exported, server):
    assert listening_ports(server.process.pid) == {server.port, server.grpc_port}
    running = Server(exported[0], "--grpc-port", "0")
    try:
        assert listening_ports(running.process.pid) == {running.port}
    finally:
        output = running.stop()
    assert "gRPC" not in output


def test_a_grpc_port_in_use_is_one_line(exported):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--onnx", exported[0], "--port", free_port(), "--grpc-port",
                         taken.getsockname()[1])
    assert result.exit_code == 1
    assert "choose another --grpc-port" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_grpc_calls_are_counted_in_the_metrics_by_method_and_status(exported, images):
    running = Server(exported[0])
    try:
        infer(running.grpc, images[:2])
        with grpc.insecure_channel(running.grpc) as channel, pytest.raises(grpc.RpcError):
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(cases(images)["NaN"])
        with urllib.request.urlopen(running.url + "/metrics", timeout=30) as reply:
            metrics = reply.read().decode()
    finally:
        running.stop()
    assert 'fmnist_requests_total{endpoint="grpc ModelInfer",status="OK"} 1.0' in metrics
    assert 'fmnist_requests_total{endpoint="grpc ModelInfer",status="INVALID_ARGUMENT"} 1.0' in metrics
    assert "fmnist_images_total 2.0" in metrics


def test_random_and_nearly_valid_messages_never_crash_the_server(server, images):
    """hypothesis: messages near a good one (any name, datatype, shape and raw bytes; outputs asked for by any
    name and class count) get OK or a client's status, never INTERNAL or UNKNOWN; a good request works after."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    answered = set()
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(name=st.sampled_from(["images", "pixels", ""]) | st.text(max_size=8),
               datatype=st.sampled_from(["FP32", "FP64", "UINT8", "INT32", "BYTES", ""]),
               shape=st.lists(st.integers(-2, 3), max_size=5) | st.just([1, 1, 28, 28]),
               raw=st.binary(max_size=64) | st.just(images[:1].tobytes()) | st.just(b""),
               model=st.sampled_from(["fmnist", "fmnist", "other"]),
               output=st.none() | st.tuples(st.sampled_from(["logits", "ood_score", "x"]), st.integers(-1, 20)))
        def check(name, datatype, shape, raw, model, output):
            request = service_pb2.ModelInferRequest(model_name=model)
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            if raw:
                request.raw_input_contents.append(raw)
            if output is not None:
                wanted = request.outputs.add(name=output[0])
                if output[1] >= 0:
                    wanted.parameters["classification"].int64_param = output[1]
            try:
                stub.ModelInfer(request, timeout=30)
                answered.add(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.details()
                answered.add(e.code())

        check()
    assert grpc.StatusCode.INVALID_ARGUMENT in answered
    assert infer(server.grpc, images[:1]).as_numpy("logits").shape == (1, 10)


def test_a_client_that_cancels_mid_call_harms_no_other_request(server, exported, images):
    many = np.repeat(images[:100], 6, axis=0)   # 600 images: a run long enough to cancel while it is under way
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(bad(many)) for _ in range(8)]
        kept = stub.ModelInfer.future(bad(images[:5]))
        for call in calls:
            call.cancel()
        assert all(call.cancelled() or call.done() for call in calls)
        result = kept.result(timeout=60)
    logits = np.frombuffer(result.raw_output_contents[0], "<f4").reshape(5, 10)
    np.testing.assert_allclose(logits, runtime.run(runtime.session(exported[0]), images[:5])[0], rtol=0, atol=1e-5)
    assert infer(server.grpc, images[:1]).as_numpy("logits").shape == (1, 10)


def test_shutdown_lets_calls_under_way_finish_and_refuses_new_ones_as_unavailable(exported, images):
    """SIGTERM while four clients keep calling: every call is answered in full or refused with UNAVAILABLE and
    the words "shutting down" (never CANCELLED, INTERNAL or a hang), the calls under way when it stops still get
    their logits, and the server exits cleanly."""
    import signal
    import threading

    running = Server(exported[0])
    many = np.repeat(images, 2, axis=0)   # 600 images: runs long enough to be under way when the server stops
    expected = runtime.run(runtime.session(exported[0]), many)[0]
    outcomes: list[tuple[bool, grpc.StatusCode, str, np.ndarray | None]] = []   # (after SIGTERM?, code, details,
    signalled = threading.Event()                                                 #  logits)

    def keep_calling():
        with grpc.insecure_channel(running.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(2000):   # bounded: the server stops within seconds of the signal
                try:
                    reply = stub.ModelInfer(bad(many), timeout=30)
                    logits = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(len(many), 10)
                    outcomes.append((signalled.is_set(), grpc.StatusCode.OK, "", logits))
                except grpc.RpcError as e:
                    outcomes.append((signalled.is_set(), e.code(), e.details(), None))
                    if signalled.is_set():
                        return

    threads = [threading.Thread(target=keep_calling) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while sum(code == grpc.StatusCode.OK for _, code, _, _ in outcomes) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        running.process.send_signal(signal.SIGTERM)
        signalled.set()
        for thread in threads:
            thread.join(timeout=60)
        assert running.process.wait(timeout=30) == 0
    finally:
        running.stop()
    assert not any(thread.is_alive() for thread in threads)
    refused = [(code, details) for _, code, details, _ in outcomes if code != grpc.StatusCode.OK]
    assert len(refused) == len(threads), refused   # each client's first call after the signal, and only those
    assert all(code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details for code, details in refused), \
        refused
    for _, code, _, logits in outcomes:
        if code == grpc.StatusCode.OK:
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert any(after and code == grpc.StatusCode.OK for after, code, _, _ in outcomes), "no call under way finished"
