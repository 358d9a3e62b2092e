"""The gRPC benchmarks' bound: a grpc.aio server whose ModelInfer does no work at all, answering zeros of the
right shapes, on the event loop `fmnist serve` runs on (uvloop, which uvicorn picks when it is installed).
What perf_analyzer measures against it is grpcio's own cost per call on this machine: one grpc.aio process
in Python answers no more than this, whatever its model does.

    python -m bench.noop_grpc PORT       # serves until killed; bench/triton/compare.py --bound starts it
"""

import asyncio
import sys

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2 as pb, service_pb2_grpc


class Noop(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just what perf_analyzer asks before it measures (metadata and config of a model named fmnist), then
    ModelInfer: one reply per batch size, built once."""

    def __init__(self) -> None:
        self.replies: dict[int, pb.ModelInferResponse] = {}

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="noop", version="0", extensions=[])

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        metadata = pb.ModelMetadataResponse(name="fmnist", versions=["1"], platform="onnxruntime_onnx")
        metadata.inputs.add(name="images", datatype="FP32", shape=[-1, 1, 28, 28])
        metadata.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
        metadata.outputs.add(name="ood_score", datatype="FP32", shape=[-1, 1])
        return metadata

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=model_config_pb2.ModelConfig(name="fmnist", max_batch_size=4096))

    async def ModelInfer(self, request, context):
        count = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        reply = self.replies.get(count)
        if reply is None:
            reply = self.replies[count] = pb.ModelInferResponse(model_name="fmnist", model_version="1")
            for name, width in (("logits", 10), ("ood_score", 1)):
                reply.outputs.add(name=name, datatype="FP32", shape=[count, width])
                reply.raw_output_contents.append(np.zeros((count, width), "<f4").tobytes())
        return reply


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Noop(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:   # as uvicorn: asyncio's own loop without it
        asyncio.run(serve(int(sys.argv[1])))
    else:
        uvloop.run(serve(int(sys.argv[1])))
