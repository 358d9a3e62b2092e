"""The Open Inference Protocol on its own, read and written as the real tritonclient does it: binary tensors of
every datatype the model takes, every refusal with the exact words it says (what a client reads to fix its
request), and responses that tritonclient decodes back to the values, JSON or binary, with the classification
extension."""

import json
import re
import struct

import numpy as np
import pytest
import tritonclient.http as triton

from fmnist.serve.errors import InvalidInput
from fmnist.serve.protocol import (
    BINARY_HEADER,
    DATATYPES,
    WantedOutput,
    classification,
    error_body,
    inference_response,
    input_tensor,
    parse_request,
    wanted_outputs,
)

SHAPE = (-1, 1, 28, 28)
LABELS = [f"class{i}" for i in range(10)]


def binary_request(arrays: dict[str, np.ndarray], datatypes: dict[str, str]) -> tuple[bytes, str]:
    """A request with the binary tensor data extension, as tritonclient sends it: (body, header length)."""
    inputs = [{"name": name, "shape": list(a.shape), "datatype": datatypes[name],
               "parameters": {"binary_data_size": a.nbytes}} for name, a in arrays.items()]
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(a.tobytes() for a in arrays.values()), str(len(header))


def read(body: bytes, header_length: str | None = None) -> np.ndarray:
    request, binary = parse_request(body, header_length)
    return input_tensor(request, binary, "images", SHAPE, "FP32")


def refusal(body: bytes | dict, header_length: str | None = None) -> str:
    """The message a request is refused with (it must be refused)."""
    with pytest.raises(InvalidInput) as caught:
        read(json.dumps(body).encode() if isinstance(body, dict) else body, header_length)
    return str(caught.value)


def one(**changes) -> dict:
    """A JSON request for one image, with `changes` to its input."""
    return {"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784,
                        **changes}]}


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "UINT8"])
def test_binary_inputs_of_each_datatype_are_read_at_their_own_width(datatype):
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 2, (3, 1, 28, 28)) if datatype == "UINT8" else rng.random((3, 1, 28, 28)))
    wire = pixels.astype(DATATYPES[datatype])
    body, length = binary_request({"images": wire}, {"images": datatype})
    got = read(body, length)
    assert got.dtype == np.float32 and got.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(got, wire.astype(np.float32))


def test_tritonclients_own_requests_are_read_json_and_binary():
    pixels = np.random.default_rng(1).random((2, 1, 28, 28)).astype(np.float32)
    for binary in (False, True):
        tensor = triton.InferInput("images", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        body, json_size = triton.InferenceServerClient.generate_request_body([tensor], request_id="7")
        request, rest = parse_request(body, None if json_size is None else str(json_size))
        assert request.id == "7"
        got = input_tensor(request, rest, "images", SHAPE, "FP32")
        np.testing.assert_array_equal(got, pixels)   # JSON's decimal text of a float32 reads back exactly


def test_json_data_is_read_flat_or_nested_and_the_edges_of_zero_to_one_are_pixels():
    values = np.linspace(0, 1, 784, dtype=np.float32)
    flat, nested = read(json.dumps(one(data=values.tolist())).encode()), read(json.dumps(
        one(data=values.reshape(1, 1, 28, 28).tolist())).encode())
    np.testing.assert_array_equal(flat, values.reshape(1, 1, 28, 28))
    np.testing.assert_array_equal(nested, flat)
    assert read(json.dumps(one(shape=[0, 1, 28, 28], data=[])).encode()).shape == (0, 1, 28, 28)


REFUSED = [   # (request, Inference-Header-Content-Length, the whole message)
    (b"", None, 'empty body: send an inference request, e.g. {"inputs": [{"name": "images", "shape": [1, 1, 28, 28], '
                '"datatype": "FP32", "data": [...]}]}'),
    (b"{", None, "not a valid inference request: the body is not valid JSON (Invalid JSON: EOF while parsing an "
                 "object at line 1 column 1)"),
    (b"[]", None, "not a valid inference request: Input should be an object"),
    (b'{"inputs": [{"name": "images"}]}', None, "not a valid inference request: inputs.0.shape: Field required"),
    (b"{}", "x", "Inference-Header-Content-Length: 'x' is not a length within the body's 2 bytes; it must be the "
                 "byte length of the JSON that starts the body"),
    (b"{}", "0", "Inference-Header-Content-Length: '0' is not a length within the body's 2 bytes; it must be the "
                 "byte length of the JSON that starts the body"),
    (b"{}", "1", "not a valid inference request: the body is not valid JSON (Invalid JSON: EOF while parsing an "
                 "object at line 1 column 1)"),   # a length of 1 is a length: the JSON is then "{"
    (b"{}", "3", "Inference-Header-Content-Length: '3' is not a length within the body's 2 bytes; it must be the "
                 "byte length of the JSON that starts the body"),
    (one(name="pixels"), None, "inputs ['pixels']: this model takes exactly one input, 'images' (FP32 [N, 1, 28, 28])"),
    ({"inputs": []}, None, "inputs []: this model takes exactly one input, 'images' (FP32 [N, 1, 28, 28])"),
    (one(datatype="INT8"), None, "input 'images': datatype 'INT8' is not supported; send FP32"),
    (one(shape=[1, 28, 28]), None, "input 'images': shape [1, 28, 28] does not fit the model's [N, 1, 28, 28]"),
    (one(shape=[1, 3, 28, 28]), None, "input 'images': shape [1, 3, 28, 28] does not fit the model's [N, 1, 28, 28]"),
    (one(shape=[-1, 1, 28, 28]), None, "input 'images': shape [-1, 1, 28, 28] does not fit the model's "
                                       "[N, 1, 28, 28]"),
    (one(data=None), None, "input 'images': no data; give data, or binary_data_size with the bytes after the JSON"),
    (one(data=[0.5] * 783), None, "input 'images': 783 values in data, but shape [1, 1, 28, 28] needs 784"),
    (one(data=["a"] * 784), None, "input 'images': data must be numbers (FP32), as a flat or nested list of "
                                  "equal-length rows"),
    (one(data=[[0.5] * 784, [0.5]]), None, "input 'images': data must be numbers (FP32), as a flat or nested list "
                                          "of equal-length rows"),
    (one(datatype="UINT8", data=[300] * 784), None, "input 'images': data must be numbers (UINT8), as a flat or "
                                                    "nested list of equal-length rows"),
    (one(data=[2.0] + [0.5] * 783), None, "input 'images': pixels must be in [0, 1] (got 0.5 to 2); divide 8-bit "
                                          "pixels by 255"),
    (one(data=[-0.25] + [0.5] * 783), None, "input 'images': pixels must be in [0, 1] (got -0.25 to 0.5); divide "
                                            "8-bit pixels by 255"),
    (one(datatype="FP64", data=[1e300] + [0.5] * 783), None, "input 'images': contains NaN or infinity; pixels must "
                                                             "be numbers in [0, 1]"),
]


@pytest.mark.parametrize("body, header_length, message", REFUSED)
def test_each_bad_request_is_refused_with_words_that_say_what_to_fix(body, header_length, message):
    assert refusal(body, header_length) == message


def test_a_header_length_of_the_whole_body_is_a_request_with_no_binary_part():
    body = json.dumps(one()).encode()
    np.testing.assert_array_equal(read(body, str(len(body))), np.full((1, 1, 28, 28), 0.5, np.float32))


def test_binary_refusals_name_the_bytes():
    zeros = np.zeros((1, 1, 28, 28), np.float32)
    body, length = binary_request({"images": zeros}, {"images": "FP32"})
    assert refusal(body + b"\0", length) == ("input 'images': binary_data_size is 3136 but 3137 bytes follow the "
                                             "JSON header")
    wide, length = binary_request({"images": zeros.astype(np.float64)}, {"images": "FP32"})   # 8 bytes each
    assert refusal(wide, length) == ("input 'images': 6272 bytes is not 784 FP32 values (shape [1, 1, 28, 28]: "
                                     "3136 bytes)")
    both = json.dumps({"inputs": [{**one()["inputs"][0], "parameters": {"binary_data_size": 3136}}]}).encode()
    assert refusal(both + zeros.tobytes(), str(len(both))) == ("input 'images': give either data or "
                                                               "binary_data_size, not both")
    header = json.dumps(one()).encode()
    assert refusal(header + b"\0" * 4, str(len(header))) == ("4 bytes follow the JSON header but no input has "
                                                              "binary_data_size")


@pytest.mark.parametrize("names", [["images", "extra"], ["extra", "images"], ["images", "images"]])
def test_an_input_the_model_does_not_have_is_refused_wherever_it_stands(names):
    tensor = {"shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
    body = json.dumps({"inputs": [{"name": name, **tensor} for name in names]}).encode()
    expected = f"inputs {names!r}: this model takes exactly one input, 'images'"
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        read(body)


def request_for(outputs: list[triton.InferRequestedOutput] | None, **parameters):
    """What fmnist makes of tritonclient's request for these outputs."""
    tensor = triton.InferInput("images", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32), binary_data=False)
    body, _ = triton.InferenceServerClient.generate_request_body([tensor], outputs, request_id="r1",
                                                                  parameters=parameters or None)
    return parse_request(body, None)[0]


def plain():
    """A JSON request that names no outputs and no binary_data_output (curl's, not tritonclient's)."""
    return parse_request(json.dumps({**one(), "id": "r1"}).encode(), None)[0]


def test_the_outputs_asked_for_are_the_ones_sent_each_as_asked():
    available = ["logits", "ood_score"]
    assert wanted_outputs(plain(), available) == [WantedOutput("logits", False, 0), WantedOutput("ood_score", False, 0)]
    assert wanted_outputs(request_for(None), available) == [WantedOutput("logits", True, 0),   # tritonclient's
                                                            WantedOutput("ood_score", True, 0)]  # default: binary
    everything = parse_request(json.dumps({**one(), "parameters": {"binary_data_output": True}}).encode(), None)[0]
    assert wanted_outputs(everything, available) == [WantedOutput("logits", True, 0),
                                                     WantedOutput("ood_score", True, 0)]
    outputs = [{"name": "logits"}, {"name": "ood_score", "parameters": {"binary_data": False}}]
    named = parse_request(json.dumps({**one(), "parameters": {"binary_data_output": True},
                                      "outputs": outputs}).encode(), None)[0]
    # binary_data_output is each output's default; its own binary_data wins
    assert wanted_outputs(named, available) == [WantedOutput("logits", True, 0), WantedOutput("ood_score", False, 0)]
    asked = request_for([triton.InferRequestedOutput("ood_score", binary_data=False),
                         triton.InferRequestedOutput("logits", binary_data=True, class_count=3)])
    assert wanted_outputs(asked, available) == [WantedOutput("ood_score", False, 0), WantedOutput("logits", True, 3)]


@pytest.mark.parametrize("outputs, message", [
    ([{"name": "probs"}], "output 'probs': this model's outputs are ['logits', 'ood_score']"),
    ([{"name": "logits"}, {"name": "logits"}], "outputs ['logits', 'logits']: name each output once"),
    ([{"name": "logits", "parameters": {"classification": -1}}],
     "output 'logits': classification must be a whole number of classes"),
    ([{"name": "logits", "parameters": {"classification": True}}],
     "output 'logits': classification must be a whole number of classes"),
    ([{"name": "logits", "parameters": {"classification": 2.5}}],
     "output 'logits': classification must be a whole number of classes"),
])
def test_bad_outputs_are_refused_with_words_that_say_what_to_fix(outputs, message):
    request = parse_request(json.dumps({**one(), "outputs": outputs}).encode(), None)[0]
    with pytest.raises(InvalidInput) as caught:
        wanted_outputs(request, ["logits", "ood_score"])
    assert str(caught.value) == message


def test_classification_is_the_top_classes_as_value_index_label_largest_first():
    values = np.array([[0.5, 3.0, -1.0, 3.0], [2.0, 1.0, 0.0, -2.0]], np.float32)
    got = classification(values, 3, ["a", "b", "c", "d"])
    assert got.tolist() == [["3.000000:1:b", "3.000000:3:d", "0.500000:0:a"],
                            ["2.000000:0:a", "1.000000:1:b", "0.000000:2:c"]]   # ties: the lower index first
    assert classification(values, 9, ["a", "b", "c", "d"]).shape == (2, 4)       # at most every class
    with pytest.raises(InvalidInput) as caught:
        classification(values[0], 2, ["a", "b", "c", "d"])
    assert str(caught.value) == "classification needs an output with one row of class values per image (logits)"


def respond(request, wanted):
    rng = np.random.default_rng(2)
    values = {"logits": rng.normal(size=(3, 10)).astype(np.float32), "ood_score": rng.random(3).astype(np.float32)}
    return values, inference_response(request, wanted, values, LABELS, "fmnist", "1")


def decoded(reply) -> "triton.InferResult":
    length = reply.headers.get(BINARY_HEADER)
    return triton.InferResult.from_response_body(reply.body, header_length=None if length is None else int(length))


def test_a_json_response_is_what_tritonclient_decodes_to_the_values():
    request = plain()
    values, reply = respond(request, wanted_outputs(request, ["logits", "ood_score"]))
    assert reply.media_type == "application/json" and reply.headers == {}
    body = json.loads(reply.body)
    assert (body["model_name"], body["model_version"], body["id"]) == ("fmnist", "1", "r1")
    assert [(o["name"], o["shape"], o["datatype"]) for o in body["outputs"]] == [("logits", [3, 10], "FP32"),
                                                                               ("ood_score", [3], "FP32")]
    result = decoded(reply)
    np.testing.assert_array_equal(result.as_numpy("logits"), values["logits"])
    np.testing.assert_array_equal(result.as_numpy("ood_score"), values["ood_score"])


def test_binary_and_classified_outputs_are_what_tritonclient_decodes():
    request = request_for([triton.InferRequestedOutput("ood_score", binary_data=True),
                           triton.InferRequestedOutput("logits", binary_data=True, class_count=2),
                           ])
    values, reply = respond(request, wanted_outputs(request, ["logits", "ood_score"]))
    json_length = int(reply.headers[BINARY_HEADER])
    assert reply.media_type == "application/octet-stream"
    header = json.loads(reply.body[:json_length])
    assert [(o["name"], o["datatype"], o["shape"]) for o in header["outputs"]] == [("ood_score", "FP32", [3]),
                                                                                 ("logits", "BYTES", [3, 2])]
    assert all("data" not in o for o in header["outputs"])
    result = decoded(reply)
    np.testing.assert_array_equal(result.as_numpy("ood_score"), values["ood_score"])
    expected = classification(values["logits"], 2, LABELS)
    assert result.as_numpy("logits").astype(str).tolist() == expected.tolist()
    size = header["outputs"][1]["parameters"]["binary_data_size"]
    first = expected[0, 0].encode()
    assert reply.body[json_length + 12:json_length + 16 + len(first)] == struct.pack("<I", len(first)) + first
    assert json_length + 12 + size == len(reply.body)   # 3 FP32 scores (12 bytes), then the strings


def test_classified_outputs_in_json_are_strings_in_data():
    request = request_for([triton.InferRequestedOutput("logits", binary_data=False, class_count=1)])
    values, reply = respond(request, wanted_outputs(request, ["logits", "ood_score"]))
    output, = json.loads(reply.body)["outputs"]
    assert output == {"name": "logits", "shape": [3, 1], "datatype": "BYTES",
                      "data": classification(values["logits"], 1, LABELS).reshape(-1).tolist()}


def test_an_error_is_the_protocols_json_error():
    assert json.loads(error_body('say "what"')) == {"error": 'say "what"'}
