"""fmnist serve beside the real peer: Triton's own perf_analyzer drives it unchanged, and a real tritonserver
serving `fmnist export --triton`'s repository gives the same client the same answers. Triton's tools come from
bench/triton/setup.sh (.ci/run runs it); without them these tests skip, and fail under CI."""

import os

import numpy as np
import pytest

pytest.importorskip("starlette", reason="fmnist serve needs the extra: pip install 'fmnist[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the tests drive the servers with tritonclient[http]")

from bench.triton import peer  # noqa: E402
from tests.conftest import Server  # noqa: E402


@pytest.fixture(scope="module")
def tools():
    found = peer.tools()
    if isinstance(found, str):
        if os.environ.get("CI"):
            pytest.fail(f"CI must have Triton's tools (.ci/run runs bench/triton/setup.sh): {found}")
        pytest.skip(found)
    return found


@pytest.fixture(scope="module")
def images(real_data):
    from fmnist import data, runtime

    return runtime.to_model_input(data.load("test").images[:16])


@pytest.fixture(scope="module")
def fmnist_server(exported):
    running = Server(exported[0])
    yield running
    running.stop()


@pytest.mark.parametrize("tensors", ["binary", "json"])
def test_perf_analyzer_drives_fmnist_serve_unchanged(tools, fmnist_server, tensors):
    row = peer.perf_analyzer(tools, fmnist_server.url, concurrency=2, requests=100, tensors=tensors)
    assert row["Inferences/Second"] > 0 and row["p99 latency"] >= row["p50 latency"] > 0
    # the server's side of the table comes from the statistics extension, read before and after
    assert row["Server Compute Infer"] > 0 and row["Server Compute Input"] > 0


def test_perf_analyzer_over_grpc(tools, fmnist_server):
    row = peer.perf_analyzer(tools, fmnist_server.grpc, concurrency=2, requests=100, protocol="grpc")
    assert row["Inferences/Second"] > 0 and row["Server Compute Infer"] > 0


def test_perf_analyzer_batches_of_64(tools, fmnist_server):
    row = peer.perf_analyzer(tools, fmnist_server.url, batch=64, concurrency=1, requests=30)
    assert row["Inferences/Second"] > 0


def test_perf_analyzer_against_several_workers(tools, exported):
    """Its statistics before and after a measurement may come from different worker processes: they add up."""
    running = Server(exported[0], "--workers", "2")
    try:
        row = peer.perf_analyzer(tools, running.url, batch=64, concurrency=2, requests=30)
    finally:
        running.stop()
    assert row["Inferences/Second"] > 0 and row["Server Compute Infer"] > 0


def test_perf_analyzers_random_data_is_refused_with_what_to_send(tools, fmnist_server):
    """Its default data: random bytes as float32, NaN and infinity among them. Not pixels: a 400 that says so."""
    with pytest.raises(RuntimeError, match=r"contains NaN or infinity; pixels must be numbers in \[0, 1\]"):
        peer.perf_analyzer(tools, fmnist_server.url, requests=20, data="random")


@pytest.fixture(scope="module")
def triton_server(tools, exported, tmp_path_factory):
    from fmnist.triton import write_model_repository

    repository = write_model_repository(exported[0], tmp_path_factory.mktemp("triton")).parent
    with peer.triton(tools, repository) as running:
        yield running


def answers(url: str, images: np.ndarray) -> dict:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    outputs = [httpclient.InferRequestedOutput("logits"), httpclient.InferRequestedOutput("ood_score")]
    top = [httpclient.InferRequestedOutput("logits", class_count=3)]
    result, classes = client.infer("fmnist", [tensor], outputs=outputs), client.infer("fmnist", [tensor], outputs=top)
    return {"logits": result.as_numpy("logits"), "ood_score": result.as_numpy("ood_score"),
            "classes": classes.as_numpy("logits"), "metadata": client.get_model_metadata("fmnist"),
            "config": client.get_model_config("fmnist")}


def test_the_same_client_code_gets_the_same_shapes_and_values_from_both(triton_server, fmnist_server, images):
    batch = images[:7]
    triton, fmnist = answers(triton_server.url, batch), answers(fmnist_server.url, batch)
    for name in ("logits", "ood_score"):
        assert fmnist[name].shape == triton[name].shape, name
        np.testing.assert_allclose(fmnist[name], triton[name], rtol=1e-5, atol=1e-5)
    assert triton["ood_score"].shape == (7, 1)
    # Triton read the labels file as written: the classification extension names the same classes
    assert fmnist["classes"].shape == triton["classes"].shape == (7, 3)
    named = lambda answer: [c.split(b":")[1:] for c in answer["classes"].ravel()]   # noqa: E731
    assert named(fmnist) == named(triton)
    assert fmnist["metadata"]["outputs"] == triton["metadata"]["outputs"]
    assert fmnist["metadata"]["inputs"] == triton["metadata"]["inputs"]


def test_triton_loads_the_repository_as_written(triton_server, fmnist_server):
    """Every field of fmnist's config route, as Triton itself answers it for the repository (Triton adds its
    defaults; the platform is the python backend's here, as bench/triton/peer.py swaps it)."""
    triton = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://")).get_model_config("fmnist")
    fmnist = httpclient.InferenceServerClient(fmnist_server.url.removeprefix("http://")).get_model_config("fmnist")
    assert triton["parameters"]["ood_threshold"] == fmnist["parameters"]["ood_threshold"]
    assert triton["dynamic_batching"]["max_queue_delay_microseconds"] == \
        fmnist["dynamic_batching"]["max_queue_delay_microseconds"]
    for key in ("name", "max_batch_size"):
        assert triton[key] == fmnist[key], key
    for ours, theirs in zip(fmnist["input"] + fmnist["output"], triton["input"] + triton["output"], strict=True):
        assert {k: theirs[k] for k in ours} == ours
    assert [(g["count"], g["kind"]) for g in triton["instance_group"]] == \
        [(g["count"], g["kind"]) for g in fmnist["instance_group"]]


def test_the_comparison_measures_both_servers_with_perf_analyzer(tools, triton_server, fmnist_server):
    """bench/triton/compare.py, briefly: one load, one round, each server measured and the ratio written."""
    from bench.triton import compare

    rows = compare.measure(tools, {"fmnist": fmnist_server.url, "triton": triton_server.url}, rounds=1,
                           requests=50, loads=[(1, 2)])
    [row] = rows
    assert row["median"]["fmnist"]["Inferences/Second"] > 0 and row["median"]["triton"]["Inferences/Second"] > 0
    ratio = row["median"]["fmnist"]["Inferences/Second"] / row["median"]["triton"]["Inferences/Second"]
    line = compare.table(rows).splitlines()[-1]
    assert line.startswith("| 1 | 2 | ") and f"| {ratio:.2f}x |" in line
    # Where the time went: a line for each server, its columns perf_analyzer's split in order, the server's own
    # part from the statistics extension that both keep (a run takes time on each).
    lines = compare.split_table(rows).splitlines()[2:]
    split = {line.split(" | ")[2]: line.strip("| ").split(" | ")[3:] for line in lines}
    assert set(split) == {"fmnist", "triton"}
    for name, cells in split.items():
        median = row["median"][name]
        assert cells == [f"{median[key]:,.0f}" for key in compare.SPLIT], name
        assert median["Server Compute Infer"] > 0 and median["Network+Server Send/Recv"] > 0, name


@pytest.mark.parametrize("kind, processes", [("aio", 1), ("sync", 1), ("handoff", 1), ("busy", 1), ("aio", 2)])
def test_the_grpc_bound_answers_perf_analyzer_and_the_shapes_a_client_expects(tools, kind, processes):
    """bench/noop_grpc.py, the gRPC rows' bound (compare.py --bound), of each kind: perf_analyzer measures it,
    and a tritonclient.grpc call gets logits and ood_score of the request's own batch size."""
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="the bound is a tritonclient.grpc service")
    from bench.triton import compare

    with compare.noop_grpc(kind, processes) as bound:
        row = peer.perf_analyzer(tools, bound, batch=64, concurrency=2, requests=100, protocol="grpc")
        assert row["Inferences/Second"] > 0
        tensor = grpcclient.InferInput("images", [5, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(np.zeros((5, 1, 28, 28), np.float32))
        result = grpcclient.InferenceServerClient(bound).infer("fmnist", [tensor])
    assert result.as_numpy("logits").shape == (5, 10) and result.as_numpy("ood_score").shape == (5, 1)
    # The bound keeps no statistics, so perf_analyzer splits none of its time: compare.py's split leaves it out.
    assert not row.get("Server Compute Infer")
    assert compare.split_table([{"batch": 64, "concurrency": 2, "median": {"bound": row}}]).splitlines()[2:] == []


def test_the_thread_sampler_reads_each_servers_threads_under_load(tools, fmnist_server):
    """bench/triton/threads.py, briefly: under perf_analyzer's load, with a connection for each of its 4 contexts,
    fmnist serve's main thread (its event loop) used CPU, the client's perf_analyzer was found, and the server
    held the client's connections."""
    import dataclasses

    from bench.triton import threads

    one_each = dataclasses.replace(tools, environment={**tools.environment,
                                                       "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT": "1"})
    pid = fmnist_server.process.pid
    turn = threads.sample(one_each, fmnist_server.grpc, pid, batch=1, concurrency=4, protocol="grpc", requests=3000)
    assert turn["infer_per_s"] > 0 and turn["perf_analyzer_ran"]
    server = [t for t in turn["threads"] if t["process"] == pid]
    assert any(t["thread"].endswith("(main)") and t["core"] > 0 for t in server)
    assert any(t["process"] == "client" and t["core"] > 0 for t in turn["threads"])
    assert list(turn["connections"]) == [pid] and turn["connections"][pid] >= 4
