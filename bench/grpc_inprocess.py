"""What one gRPC ModelInfer call costs fmnist's own code, without grpc: the servicer called directly on uvloop,
with the real model, its batcher and its metrics, one call at a time and 16 at a time.

    python -m bench.grpc_inprocess export/fmnist.onnx [--calls 4000]

The figures bench/README.md gives for the metric children came from this.
"""

import argparse
import asyncio
import time

import numpy as np
import uvloop
from tritonclient.grpc import service_pb2 as pb

from fmnist.serve import rpc
from fmnist.serve.batching import Batcher
from fmnist.serve.dataplane import DataPlane, Model
from fmnist.serve.metrics import Metrics
from fmnist.serve.statistics import Statistics


async def measure(onnx: str, calls: int) -> tuple[float, float]:
    """Microseconds a call: one at a time, and 16 at a time."""
    metrics = Metrics()
    plane = DataPlane(Statistics("fmnist", "1"))
    model = Model(onnx, threads=2)
    plane.load(model, Batcher(model.run, 256, 0, 16384))
    service = rpc.Service(plane, metrics)
    request = pb.ModelInferRequest(model_name="fmnist")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(np.zeros((1, 1, 28, 28), "<f4").tobytes())

    async def some(count: int) -> None:
        for _ in range(count):
            await service.ModelInfer(request, None)

    await some(300)   # warm up
    start = time.perf_counter()
    await some(calls)
    one = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    await asyncio.gather(*(some(calls // 16) for _ in range(16)))
    return one, (time.perf_counter() - start) / (calls // 16 * 16) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("--calls", type=int, default=4000)
    args = parser.parse_args()
    one, sixteen = uvloop.run(measure(args.onnx, args.calls))
    print(f"ModelInfer in-process: {one:.0f} us a call one at a time, {sixteen:.0f} us 16 at a time")


if __name__ == "__main__":
    main()
