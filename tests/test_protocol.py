"""The Open Inference Protocol's request reading on its own: binary tensors of every datatype the model takes,
and a request with an input the model does not have."""

import json
import re

import numpy as np
import pytest

from fmnist.serve.protocol import DATATYPES, ProtocolError, input_tensor, parse_request

SHAPE = (-1, 1, 28, 28)


def binary_request(arrays: dict[str, np.ndarray], datatypes: dict[str, str]) -> tuple[bytes, str]:
    """A request with the binary tensor data extension, as tritonclient sends it: (body, header length)."""
    inputs = [{"name": name, "shape": list(a.shape), "datatype": datatypes[name],
               "parameters": {"binary_data_size": a.nbytes}} for name, a in arrays.items()]
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(a.tobytes() for a in arrays.values()), str(len(header))


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "UINT8"])
def test_binary_inputs_of_each_datatype_are_read_at_their_own_width(datatype):
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 2, (3, 1, 28, 28)) if datatype == "UINT8" else rng.random((3, 1, 28, 28)))
    wire = pixels.astype(DATATYPES[datatype])
    body, length = binary_request({"images": wire}, {"images": datatype})
    request, binary = parse_request(body, length)
    got = input_tensor(request, binary, "images", SHAPE, "FP32")
    assert got.dtype == np.float32 and got.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(got, wire.astype(np.float32))


def test_a_binary_input_of_the_wrong_byte_count_for_its_datatype_is_refused():
    wire = np.zeros((1, 1, 28, 28), np.float64)
    body, length = binary_request({"images": wire}, {"images": "FP32"})   # 8 bytes a value, said to be FP32
    request, binary = parse_request(body, length)
    with pytest.raises(ProtocolError, match=r"6272 bytes is not 784 FP32 values \(shape \[1, 1, 28, 28\]: 3136"):
        input_tensor(request, binary, "images", SHAPE, "FP32")


@pytest.mark.parametrize("names", [["images", "extra"], ["extra", "images"], ["images", "images"]])
def test_an_input_the_model_does_not_have_is_refused_wherever_it_stands(names):
    tensor = {"shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
    body = json.dumps({"inputs": [{"name": name, **tensor} for name in names]}).encode()
    request, binary = parse_request(body, None)
    expected = f"inputs {names!r}: this model takes exactly one input, 'images'"
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        input_tensor(request, binary, "images", SHAPE, "FP32")
