"""Triton's statistics extension, GET /v2/models/fmnist/stats: what the model has done since the server started,
in Triton's JSON form (docs/protocol/extension_statistics.md), the numbers perf_analyzer reads before and after
a measurement to say where a request's time went on the server.

For each request: success (count, and the nanoseconds from its arrival to its reply), queue (waiting for its
onnxruntime run), compute_input (parsing its tensors), compute_infer (its run), compute_output (writing the
reply). For each run, by its batch size: compute_infer. Counted by each worker process for itself (with
--workers, the process that answers says its own), as Triton counts each of its model instances.
"""

import time
from collections import defaultdict


def _duration() -> dict[str, int]:
    return {"count": 0, "ns": 0}


class Statistics:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self.inference_count = 0       # images classified
        self.execution_count = 0       # onnxruntime runs
        self.last_inference = 0        # ms since the epoch
        self.stats = {key: _duration() for key in ("success", "fail", "queue", "compute_input", "compute_infer",
                                                   "compute_output", "cache_hit", "cache_miss")}
        self.batches: defaultdict[int, dict[str, dict[str, int]]] = defaultdict(
            lambda: {key: _duration() for key in ("compute_input", "compute_infer", "compute_output")})

    def observe_run(self, size: int, waits: list[float], seconds: float) -> None:
        """One onnxruntime run of `size` images, for requests that waited `waits`, taking `seconds`."""
        self.inference_count += size
        self.execution_count += 1
        self.last_inference = time.time_ns() // 1_000_000
        self._add(self.batches[size]["compute_infer"], seconds)

    def observe_request(self, ok: bool, total: float, queue: float = 0.0, parse: float = 0.0, infer: float = 0.0,
                        reply: float = 0.0) -> None:
        """One inference request, answered (ok) or refused, with the seconds of each of its stages."""
        if not ok:
            self._add(self.stats["fail"], total)
            return
        for key, seconds in (("success", total), ("queue", queue), ("compute_input", parse),
                             ("compute_infer", infer), ("compute_output", reply)):
            self._add(self.stats[key], seconds)

    @staticmethod
    def _add(duration: dict[str, int], seconds: float) -> None:
        duration["count"] += 1
        duration["ns"] += int(seconds * 1e9)

    def json(self) -> dict:
        return {"model_stats": [{
            "name": self.name, "version": self.version, "last_inference": self.last_inference,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {key: dict(value) for key, value in self.stats.items()},
            "batch_stats": [{"batch_size": size, **{key: dict(value) for key, value in stats.items()}}
                            for size, stats in sorted(self.batches.items())]}]}
