"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, as Triton and KServe serve it on port
8001, in the same process, event loop, batcher, limits, statistics and metrics as the REST routes.

The messages and the service are the generated code that tritonclient ships (tritonclient.grpc.service_pb2 and
service_pb2_grpc, compiled from Triton's own grpc_service.proto): the same definitions tritonclient.grpc and
perf_analyzer are built from, so the two sides cannot drift; no protobuf is parsed by hand here. Each RPC turns
its message into the protocol's request (fmnist.serve.protocol), so that REST and gRPC make the same checks with
the same words over the same data plane; each of its errors has its gRPC status code in one table, CODES
(RESOURCE_EXHAUSTED comes from gRPC itself too, for a message over --max-body-mb).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2 as pb, service_pb2_grpc

from fmnist import FmnistError, __version__
from fmnist.serve import protocol
from fmnist.serve.dataplane import MODEL, VERSION, DataPlane
from fmnist.serve.errors import (
    BodyTooLarge,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ShuttingDown,
    UnsupportedEncoding,
)
from fmnist.serve.metrics import Metrics
from fmnist.serve.protocol import RequestInput, RequestOutput

# The typed `contents` field that holds each datatype's values, when a client sends them that way.
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "UINT8": "uint_contents"}
EXTENSIONS = ["classification", "model_configuration", "statistics"]
STOPPING = "the server is shutting down: send the request to another replica, or again once it is back"
Code = grpc.StatusCode
CODES: dict[type[Exception], tuple[grpc.StatusCode, Callable[[Exception], str]]] = {   # the nearest class's
    InvalidInput: (Code.INVALID_ARGUMENT, str),
    FmnistError: (Code.INVALID_ARGUMENT, str),
    UnsupportedEncoding: (Code.INVALID_ARGUMENT, str),
    ModelNotFound: (Code.NOT_FOUND, str),
    BodyTooLarge: (Code.RESOURCE_EXHAUSTED, str),
    Overloaded: (Code.RESOURCE_EXHAUSTED, lambda e: f"the server is overloaded ({e}); retry shortly"),
    ShuttingDown: (Code.UNAVAILABLE, str),
}


def request_of(message: pb.ModelInferRequest) -> tuple[protocol.InferenceRequest, bytes]:
    """The protocol's request for a gRPC ModelInferRequest, and the raw bytes of its input: what REST's
    binary extension would have sent."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send one for each input")
    inputs = []
    for i, tensor in enumerate(message.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[i])}
        elif tensor.datatype in CONTENTS and tensor.HasField("contents"):
            entry["data"] = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
        inputs.append(RequestInput(**entry))
    outputs = None
    if message.outputs:
        outputs = [RequestOutput(name=output.name, parameters={"classification": output.parameters["classification"]
                                                               .int64_param} if "classification" in output.parameters
                                 else None) for output in message.outputs]
    request = protocol.InferenceRequest(id=message.id or None, inputs=inputs, outputs=outputs)
    return request, b"".join(raw)


def response_of(request: protocol.InferenceRequest, wanted: list[protocol.WantedOutput],
                values: dict[str, np.ndarray], labels: list[str]) -> pb.ModelInferResponse:
    """The ModelInferResponse: every output's bytes in raw_output_contents, as tritonclient reads them."""
    response = pb.ModelInferResponse(model_name=MODEL, model_version=VERSION, id=request.id or "")
    for name, _, class_count in wanted:
        tensor = protocol.classification(values[name], class_count, labels) if class_count else values[name]
        response.outputs.add(name=name, datatype="BYTES" if class_count else "FP32", shape=list(tensor.shape))
        response.raw_output_contents.append(protocol.bytes_elements(tensor) if class_count
                                            else tensor.astype("<f4").tobytes())
    return response


class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs fmnist answers; the rest (shared memory, repository control, traces) answer UNIMPLEMENTED."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane, self.metrics = plane, metrics
        self.stopping = False   # set by stop(): every call but the health checks is then refused, UNAVAILABLE
        self.under_way = 0      # calls being answered, which stop() lets finish
        self.last_call = 0.0    # when the latest call came (time.monotonic())

    async def ServerLive(self, request, context):
        return await self._counted("ServerLive", context, lambda: _value(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request, context):
        return await self._counted("ServerReady", context, lambda: _value(
            pb.ServerReadyResponse(ready=hasattr(self.plane, "model") and not self.stopping)))

    async def ServerMetadata(self, request, context):
        return await self._counted("ServerMetadata", context, lambda: _value(
            pb.ServerMetadataResponse(name="fmnist", version=__version__, extensions=EXTENSIONS)))

    async def ModelReady(self, request, context):
        async def ready():
            self.plane.named_model(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=True)
        return await self._counted("ModelReady", context, ready)

    async def ModelMetadata(self, request, context):
        async def metadata():
            return json_format.ParseDict(self._metadata(request), pb.ModelMetadataResponse())
        return await self._counted("ModelMetadata", context, metadata)

    async def ModelConfig(self, request, context):
        async def config():
            model = self.plane.named_model(request.name, request.version or None)
            return pb.ModelConfigResponse(config=json_format.ParseDict(model.config, model_config_pb2.ModelConfig()))
        return await self._counted("ModelConfig", context, config)

    async def ModelStatistics(self, request, context):
        async def statistics():
            self.plane.named_model(request.name, request.version or None)
            return json_format.ParseDict(self.plane.statistics.json(), pb.ModelStatisticsResponse())
        return await self._counted("ModelStatistics", context, statistics)

    async def ModelInfer(self, request, context):
        def reply(inference, wanted, values):
            return response_of(inference, wanted, values, self.plane.model.classes)
        return await self._counted("ModelInfer", context, lambda: self.plane.infer_with(
            request.model_name, request.model_version or None, lambda: request_of(request), reply))

    def _metadata(self, request) -> dict:
        metadata = self.plane.named_model(request.name, request.version or None).metadata()
        return {key: value for key, value in metadata.items() if key != "parameters"}   # gRPC's has no parameters

    async def _counted(self, method: str, context: grpc.aio.ServicerContext, answer: Callable[[], Awaitable]):
        """The RPC's answer, its refusal as a gRPC status with REST's message, and its count in the metrics.
        Once the server is stopping, every call but the health checks is refused at once, UNAVAILABLE."""
        start, code = time.perf_counter(), grpc.StatusCode.OK
        health = method in ("ServerLive", "ServerReady")   # probes: never refused, nor waited for by stop()
        if self.stopping and not health:   # refused at once, and not waited for either
            code, message = status_of(ShuttingDown(STOPPING), method)
            self.metrics.observe_request(f"grpc {method}", code.name, 0.0)
            await context.abort(code, message)
        if not health:
            self.under_way += 1
            self.last_call = time.monotonic()
        try:
            return await answer()
        except Exception as e:
            code, message = status_of(e, method)
        finally:
            if not health:   # the quiet that stop() waits for counts from the end of the latest call too
                self.under_way -= 1
                self.last_call = time.monotonic()
            self.metrics.observe_request(f"grpc {method}", code.name, time.perf_counter() - start)
        await context.abort(code, message)


def status_of(e: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """CODES' status code and message for `e`; any other error is a bug of fmnist: logged with its traceback,
    INTERNAL with one line to the client."""
    kind = next((kind for kind in type(e).__mro__ if kind in CODES), None)
    if kind is not None:
        code, message = CODES[kind]
        return code, message(e)
    logging.getLogger("fmnist.serve").exception("error answering gRPC %s", method)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the server's log has the details"


async def _value(message):
    return message


class Running(NamedTuple):
    server: grpc.aio.Server
    service: Service


async def start(plane: DataPlane, metrics: Metrics, host: str, port: int, max_message: int) -> Running:
    """The gRPC server on host:port, started."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message),
                                      ("grpc.max_send_message_length", max_message)])
    service = Service(plane, metrics)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise FmnistError(f"cannot listen for gRPC on {address}; choose another --grpc-port (0: no gRPC)")
    await server.start()
    return Running(server, service)


async def stop(running: Running, grace: float, quiet: float = 0.05) -> None:
    """Refuse new calls with UNAVAILABLE, let those under way finish, and stop once no call has begun or ended
    for `quiet` seconds (a client that just had its answer may send its next), or when `grace` is over. The
    service refuses them, not grpc's own stop: a call that reaches grpc while it stops is CANCELLED (seen in
    tests), which a client does not know to send elsewhere."""
    service = running.service
    service.stopping = True
    deadline = time.monotonic() + grace
    while (service.under_way or time.monotonic() - service.last_call < quiet) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await running.server.stop(max(0.0, deadline - time.monotonic()))
