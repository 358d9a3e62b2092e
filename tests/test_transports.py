"""The serving wing's shape: a data plane that knows no transport and raises fmnist's own errors, which REST and
gRPC each map in one table, and one REST pipeline for every route."""

import ast
import inspect
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="fmnist serve needs the extra: pip install 'fmnist[serve]'")
pytest.importorskip("grpc", reason="the gRPC transport needs grpcio (tritonclient[grpc])")

from fmnist import FmnistError  # noqa: E402
from fmnist.serve import errors, rest, rpc  # noqa: E402

SERVE = Path(rest.__file__).parent
WEB = {"starlette", "fastapi", "uvicorn", "httpx"}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", ["dataplane", "errors", "protocol", "batching", "statistics", "metrics"])
def test_the_data_plane_imports_no_web_framework_and_no_grpc(module):
    assert not imported(SERVE / f"{module}.py") & (WEB | {"grpc", "tritonclient"})


def test_no_module_speaks_both_transports_and_none_raises_http_exceptions():
    for path in SERVE.glob("*.py"):
        names = imported(path)
        assert not (names & WEB and "grpc" in names), path
    assert not [p for p in (SERVE.parent).rglob("*.py") if "HTTPException" in p.read_text()]


ERROR_CLASSES = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if cls.__module__ == errors.__name__]
EXPECTED = {   # each error: REST's status, gRPC's code
    errors.InvalidInput: (400, "INVALID_ARGUMENT"),
    errors.ModelNotFound: (404, "NOT_FOUND"),
    errors.UnsupportedEncoding: (415, "INVALID_ARGUMENT"),
    errors.BodyTooLarge: (413, "RESOURCE_EXHAUSTED"),
    errors.Overloaded: (503, "RESOURCE_EXHAUSTED"),
    errors.ShuttingDown: (503, "UNAVAILABLE"),
    FmnistError: (400, "INVALID_ARGUMENT"),
}


def test_every_error_of_the_data_plane_is_in_both_tables():
    assert set(ERROR_CLASSES) == set(EXPECTED) - {FmnistError}
    assert set(EXPECTED) <= set(rest.ERRORS) and set(EXPECTED) <= set(rpc.CODES)


@pytest.mark.parametrize("kind", EXPECTED, ids=lambda kind: kind.__name__)
def test_each_transport_answers_an_error_with_its_status_and_the_same_words(kind):
    import json

    status, code = EXPECTED[kind]
    error = kind("what to fix")
    answer = rest.answer_error(error, {"method": "POST", "path": "/x"})
    got_code, message = rpc.status_of(error, "ModelInfer")
    assert answer.status == status and got_code.name == code
    assert "what to fix" in json.loads(answer.body)["error"] and "what to fix" in message
    if kind is not errors.Overloaded:   # the overloaded answer says when to retry, in each transport's terms
        assert json.loads(answer.body)["error"] == message == "what to fix"
    else:
        assert ("retry-after", str(rest.RETRY_AFTER_S)) in answer.headers


def test_a_bug_is_a_500_and_internal_in_one_line():
    answer = rest.answer_error(KeyError("x"), {"method": "GET", "path": "/v2"})
    code, message = rpc.status_of(KeyError("x"), "ModelInfer")
    assert answer.status == 500 and code.name == "INTERNAL"
    assert "internal error (KeyError)" in answer.body.decode() and message.startswith("internal error (KeyError)")


def test_the_router_finds_each_route_and_says_what_is_wrong_otherwise():
    async def handler(call):   # never called here
        raise AssertionError

    router = rest.Router([rest.Route("POST", "/v2/models/{name}/infer", handler),
                          rest.Route("GET", "/v2/models/{name}/versions/{version}", handler),
                          rest.Route("GET", "/", handler)])
    assert router.find("POST", "/v2/models/fmnist/infer")[1] == {"name": "fmnist"}
    assert router.find("GET", "/v2/models/a/versions/1")[1] == {"name": "a", "version": "1"}
    assert router.find("HEAD", "/")[0].template == "/"   # HEAD: a GET route's answer without its body
    with pytest.raises(rest.NotAllowed) as caught:
        router.find("GET", "/v2/models/fmnist/infer")
    assert caught.value.allowed == "POST" and str(caught.value) == "GET is not allowed on /v2/models/fmnist/infer"
    for path in ("/v2/models//infer", "/v2/models/a/b/infer", "/v2/models/fmnist/infer/", "/x"):
        with pytest.raises(rest.NoSuchRoute, match="no such route"):
            router.find("POST", path)


def test_predict_options_take_what_the_query_says_and_refuse_the_rest():
    assert rest.predict_options("") == (None, None)
    assert rest.predict_options("top=5&invert=false") == (5, False)
    assert rest.predict_options("invert=on") == (None, True)
    with pytest.raises(errors.InvalidInput, match="top=many: must be a whole number"):
        rest.predict_options("top=many")
    with pytest.raises(errors.InvalidInput, match="invert=maybe: must be true or false"):
        rest.predict_options("invert=maybe")
