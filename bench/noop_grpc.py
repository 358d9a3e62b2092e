"""The gRPC benchmarks' bound: a grpc.aio server whose ModelInfer does no work at all, answering zeros of the
right shapes, on the event loop `fmnist serve` runs on (uvloop, which uvicorn picks when it is installed).
What perf_analyzer measures against it is grpcio's own cost per call on this machine: one grpc.aio process
in Python answers no more than this, whatever its model does. The same no-op on grpcio's other server (`sync`:
a thread pool, each call in a handler thread) and in several processes on one port (SO_REUSEPORT) bound the
other ways a Python server could be built; `handoff` is the aio no-op that hands each call's (empty) work to
a thread and awaits it back, as fmnist's batcher hands a run to its runner thread: the cost of that hand-off;
`busy` is the aio no-op that first holds the event loop for BUSY seconds, as a handler's own Python work does:
what that work costs a call beyond its own length.

    python -m bench.noop_grpc PORT [aio|sync|handoff|busy] [PROCESSES]   # serves until killed; compare.py --bound
"""

import asyncio
import multiprocessing
import queue
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2 as pb, service_pb2_grpc


class SyncNoop(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just what perf_analyzer asks before it measures (metadata and config of a model named fmnist), then
    ModelInfer: one reply per batch size, built once. As grpcio's thread-pool server calls it, in a handler
    thread; Noop is the same for grpc.aio."""

    def __init__(self) -> None:
        self.replies: dict[int, pb.ModelInferResponse] = {}

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="noop", version="0", extensions=[])

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request, context):
        metadata = pb.ModelMetadataResponse(name="fmnist", versions=["1"], platform="onnxruntime_onnx")
        metadata.inputs.add(name="images", datatype="FP32", shape=[-1, 1, 28, 28])
        metadata.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
        metadata.outputs.add(name="ood_score", datatype="FP32", shape=[-1, 1])
        return metadata

    def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=model_config_pb2.ModelConfig(name="fmnist", max_batch_size=4096))

    def ModelInfer(self, request, context):
        count = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        reply = self.replies.get(count)
        if reply is None:
            reply = self.replies[count] = pb.ModelInferResponse(model_name="fmnist", model_version="1")
            for name, width in (("logits", 10), ("ood_score", 1)):
                reply.outputs.add(name=name, datatype="FP32", shape=[count, width])
                reply.raw_output_contents.append(np.zeros((count, width), "<f4").tobytes())
        return reply


class Noop(SyncNoop):
    """SyncNoop's answers as grpc.aio's coroutines, on the event loop."""

    async def ServerLive(self, request, context):
        return super().ServerLive(request, context)

    async def ServerReady(self, request, context):
        return super().ServerReady(request, context)

    async def ServerMetadata(self, request, context):
        return super().ServerMetadata(request, context)

    async def ModelReady(self, request, context):
        return super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):
        return super().ModelMetadata(request, context)

    async def ModelConfig(self, request, context):
        return super().ModelConfig(request, context)

    async def ModelInfer(self, request, context):
        return super().ModelInfer(request, context)


class HandoffNoop(Noop):
    """Noop's ModelInfer, its reply handed back from a thread fed by a queue (fmnist.serve.batching's runner):
    a future for each call, put on the queue, settled with call_soon_threadsafe."""

    def __init__(self) -> None:
        super().__init__()
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    async def ModelInfer(self, request, context):
        loop = asyncio.get_running_loop()
        if self.thread is None:
            self.thread = threading.Thread(target=self._runner, args=(loop,), daemon=True)
            self.thread.start()
        future = loop.create_future()
        self.work.put((future, request))
        return await future

    def _runner(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            future, request = self.work.get()
            loop.call_soon_threadsafe(future.set_result, SyncNoop.ModelInfer(self, request, None))


class BusyNoop(Noop):
    """Noop's ModelInfer after holding the event loop for BUSY seconds, in a loop that never yields."""

    async def ModelInfer(self, request, context):
        end = time.perf_counter() + BUSY
        while time.perf_counter() < end:
            pass
        return await super().ModelInfer(request, context)


# busy's work a call: about what fmnist serve's own ModelInfer takes on the loop, called in-process 16 at a time
# (python -m bench.grpc_inprocess; bench/README.md gives the figure).
BUSY = 50e-6
AIO = {"aio": Noop, "handoff": HandoffNoop, "busy": BusyNoop}   # the kinds served by grpc.aio, and their servicers
KINDS = (*AIO, "sync")   # every kind of no-op server, as compare.py --bound names them

# Options every kind shares: large batches fit, and several processes may listen on one port (grpcio's default on
# Linux, said here so that it does not depend on that).
OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.so_reuseport", 1)]
THREADS = 8   # the sync server's handler threads: more than the 2 to 6 calls a connection brings at once


async def serve_aio(port: int, kind: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(AIO[kind](), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve(port: int, kind: str) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(THREADS), options=OPTIONS)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(SyncNoop(), server)
        if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
            raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return
    try:
        import uvloop
    except ImportError:   # as uvicorn: asyncio's own loop without it
        asyncio.run(serve_aio(port, kind))
    else:
        uvloop.run(serve_aio(port, kind))


if __name__ == "__main__":
    port, kind, count = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "aio", \
        int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if kind not in KINDS or count < 1:
        raise SystemExit(f"usage: python -m bench.noop_grpc PORT [{'|'.join(KINDS)}] [PROCESSES]")
    if count == 1:
        serve(port, kind)
    else:   # the processes end with this one: terminated, it terminates them
        processes = [multiprocessing.Process(target=serve, args=(port, kind), daemon=True) for _ in range(count)]
        for process in processes:
            process.start()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        for process in processes:
            process.join()
