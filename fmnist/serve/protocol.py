"""The Open Inference Protocol (KServe v2) over REST, as Triton speaks it: the request and response bodies,
and Triton's binary tensor data extension.

Read beside the protocol's own pages, line by line:
- https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ (the REST API)
- https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
- https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_classification.md

A request is JSON, or, with the binary extension, JSON of `Inference-Header-Content-Length` bytes followed by
the raw bytes of each input that says `"parameters": {"binary_data_size": n}`, in the order of the inputs.
Outputs come back the same way when asked (`binary_data` on an output, or `binary_data_output` for all), which
is what tritonclient.http does by default. Everything wrong with a request is an InvalidInput
(fmnist.serve.errors): REST answers 400 with `{"error": "..."}`, the protocol's error form.
"""

import json
import math
import struct
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ValidationError

from fmnist.serve.errors import InvalidInput

# The protocol's datatypes that fmnist's tensors use, and the numpy types they are on the wire (little endian).
DATATYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"),
                                   "UINT8": np.dtype("u1")}
BINARY_HEADER = "Inference-Header-Content-Length"


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list | None = None            # nested or flat, row-major; absent when the bytes follow the JSON


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


# ---- reading a request ---------------------------------------------------------------------------

def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The request's JSON part, and the binary bytes that follow it (empty without the extension)."""
    if not body:
        raise InvalidInput("empty body: send an inference request, e.g. "
                            '{"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", '
                            '"data": [...]}]}')
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise InvalidInput(f"{BINARY_HEADER}: {header_length!r} is not a length within the body's "
                                f"{len(body)} bytes; it must be the byte length of the JSON that starts the body")
        json_part, binary = body[:length], body[length:]
    try:
        return InferenceRequest.model_validate_json(json_part), binary
    except ValidationError as e:
        raise InvalidInput(f"not a valid inference request: {_first_problem(e)}") from None


def _first_problem(e: ValidationError) -> str:
    problem = e.errors(include_url=False)[0]
    where = ".".join(str(part) for part in problem["loc"])
    if problem["type"].startswith("json"):
        return f"the body is not valid JSON ({problem['msg']})"
    return f"{where}: {problem['msg']}" if where else problem["msg"]


def input_tensor(request: InferenceRequest, binary: bytes, name: str, shape: tuple, datatype: str) -> np.ndarray:
    """The one input the model takes, as a float32 array, checked against the model's `shape` (-1: any size)."""
    names = [i.name for i in request.inputs]
    if names != [name]:
        raise InvalidInput(f"inputs {names}: this model takes exactly one input, {name!r} "
                            f"({datatype} {_shape_text(shape)})")
    tensor = request.inputs[0]
    if tensor.datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: datatype {tensor.datatype!r} is not supported; send {datatype}")
    if len(tensor.shape) != len(shape) \
            or any(want not in (-1, got) for want, got in zip(shape, tensor.shape, strict=True)) \
            or any(got < 0 for got in tensor.shape):
        raise InvalidInput(f"input {name!r}: shape {tensor.shape} does not fit the model's {_shape_text(shape)}")
    size = (tensor.parameters or {}).get("binary_data_size")
    array = _binary_values(tensor, binary, size) if size is not None else _json_values(tensor, binary)
    array = array.reshape(tensor.shape).astype(np.float32, copy=False)
    if array.size and not 0 <= array.min() <= array.max() <= 1:   # False for NaN too: one pass each, on the hot path
        if not np.isfinite(array).all():
            raise InvalidInput(f"input {name!r}: contains NaN or infinity; pixels must be numbers in [0, 1]")
        raise InvalidInput(f"input {name!r}: pixels must be in [0, 1] (got {array.min():g} to {array.max():g}); "
                            "divide 8-bit pixels by 255")
    return array


def _binary_values(tensor: RequestInput, binary: bytes, size: object) -> np.ndarray:
    """The input's values from the `size` bytes after the JSON (the binary extension), flat."""
    count = math.prod(tensor.shape)   # exact: numpy's int64 product wraps around for a huge shape
    dtype = DATATYPES[tensor.datatype]
    if tensor.data is not None:
        raise InvalidInput(f"input {tensor.name!r}: give either data or binary_data_size, not both")
    if size != len(binary):
        raise InvalidInput(f"input {tensor.name!r}: binary_data_size is {size} but {len(binary)} bytes follow the "
                            "JSON header")
    if size != count * dtype.itemsize:
        raise InvalidInput(f"input {tensor.name!r}: {size} bytes is not {count} {tensor.datatype} values "
                            f"(shape {tensor.shape}: {count * dtype.itemsize} bytes)")
    return np.frombuffer(binary, dtype=dtype)


def _json_values(tensor: RequestInput, binary: bytes) -> np.ndarray:
    """The input's values from its `data`, a flat or nested list."""
    if binary:
        raise InvalidInput(f"{len(binary)} bytes follow the JSON header but no input has binary_data_size")
    if tensor.data is None:
        raise InvalidInput(f"input {tensor.name!r}: no data; "
                            "give data, or binary_data_size with the bytes after the JSON")
    try:
        array = np.asarray(tensor.data, dtype=DATATYPES[tensor.datatype])
    except (ValueError, TypeError, OverflowError):   # OverflowError: 300 as UINT8, 10**400 as FP32
        raise InvalidInput(f"input {tensor.name!r}: data must be numbers ({tensor.datatype}), as a flat or nested "
                            "list of equal-length rows") from None
    count = math.prod(tensor.shape)   # exact, as above
    if array.size != count:
        raise InvalidInput(f"input {tensor.name!r}: {array.size} values in data, but shape {tensor.shape} needs "
                            f"{count}")
    return array


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


# ---- writing a response --------------------------------------------------------------------------

class WantedOutput(NamedTuple):
    """An output to send, as the request asked for it."""
    name: str
    binary: bool          # its bytes after the JSON (the binary extension), else in its `data`
    classification: int   # the classification extension: this many top classes as strings; 0, the values


def wanted_outputs(request: InferenceRequest, available: list[str]) -> list[WantedOutput]:
    """The outputs to send: those asked for, or all of them."""
    everything_binary = bool((request.parameters or {}).get("binary_data_output", False))
    if request.outputs is None:
        return [WantedOutput(name, everything_binary, 0) for name in available]
    names = [output.name for output in request.outputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"outputs {names}: name each output once")
    wanted = []
    for output in request.outputs:
        if output.name not in available:
            raise InvalidInput(f"output {output.name!r}: this model's outputs are {available}")
        parameters = output.parameters or {}
        count = parameters.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidInput(f"output {output.name!r}: classification must be a whole number of classes")
        wanted.append(WantedOutput(output.name, bool(parameters.get("binary_data", everything_binary)), count))
    return wanted


def classification(values: np.ndarray, count: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: for each row, its `count` largest values as "value:index:label"
    strings, largest first."""
    if values.ndim != 2:
        raise InvalidInput("classification needs an output with one row of class values per image (logits)")
    count = min(count, values.shape[1])
    order = np.argsort(-values, axis=1, kind="stable")[:, :count]
    return np.array([[f"{row[j]:f}:{j}:{labels[j]}" for j in top] for row, top in zip(values, order, strict=True)],
                    dtype=object)


class Reply(NamedTuple):
    """An HTTP reply: its body, Content-Type and the headers the protocol adds."""
    body: bytes
    media_type: str
    headers: dict[str, str]


def inference_response(request: InferenceRequest, wanted: list[WantedOutput], values: dict[str, np.ndarray],
                       labels: list[str], model_name: str, model_version: str) -> Reply:
    """The reply to `request`: the `wanted` outputs of `values` (the model's outputs by name), the
    classification extension applied where asked, as JSON, or as JSON followed by the binary tensors: each
    output whose `binary` is set goes after the JSON with its size in parameters.binary_data_size, the others
    into its `data`. Written as plain data, not as models: this is every inference request's reply."""
    outputs, chunks = [], []
    for name, as_binary, class_count in wanted:
        tensor = classification(values[name], class_count, labels) if class_count else values[name]
        output: dict[str, Any] = {"name": name, "shape": list(tensor.shape),
                                  "datatype": "BYTES" if class_count else "FP32"}
        if as_binary:
            raw = bytes_elements(tensor) if class_count else tensor.astype("<f4").tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = tensor.reshape(-1).tolist()
        outputs.append(output)
    response = {"model_name": model_name, "model_version": model_version,
                **({"id": request.id} if request.id is not None else {}), "outputs": outputs}
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return Reply(header, "application/json", {})
    return Reply(header + b"".join(chunks), "application/octet-stream", {BINARY_HEADER: str(len(header))})


def bytes_elements(values: np.ndarray) -> bytes:
    """BYTES tensors on the wire: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for item in values.reshape(-1):
        raw = str(item).encode()   # fmnist's BYTES outputs are the classification extension's strings
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
