"""Triton's statistics extension, GET /v2/models/fmnist/stats: what the model has done since the server started,
in Triton's JSON form (docs/protocol/extension_statistics.md), the numbers perf_analyzer reads before and after
a measurement to say where a request's time went on the server.

For each request: success (count, and the nanoseconds from its arrival to its reply), fail, queue (waiting for
its onnxruntime run), compute_input (parsing its tensors), compute_infer (its run), compute_output (writing the
reply). For each run, by its batch size: compute_infer.

The counts are numbers in an array. With --workers, each process keeps its array in a file of the folder the
workers share for their metrics (PROMETHEUS_MULTIPROC_DIR), and /stats adds up every process's file, as
/metrics does: perf_analyzer's before and after may come from different processes, and must still agree.
"""

import os
import time
from pathlib import Path

import numpy as np

STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
MAX_BATCH = 4096     # the most images in one run by default (one request's at most); larger runs count in its row
# The array: [inference_count, execution_count, last_inference], then each stage's count and ns, then each batch
# size's compute_infer count and ns.
STAGE_AT, BATCH_AT = 3, 3 + 2 * len(STAGES)
AT = {stage: STAGE_AT + 2 * i for i, stage in enumerate(STAGES)}   # each stage's count; its ns follows
SIZE = BATCH_AT + 2 * (MAX_BATCH + 1)


class Statistics:
    def __init__(self, name: str, version: str, folder: str | None = None) -> None:
        self.name, self.version = name, version
        self.folder = folder if folder is not None else os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.counts: np.ndarray
        if self.folder:   # this process's file, which the others read too
            path = Path(self.folder) / f"statistics-{os.getpid()}.bin"
            self.counts = np.memmap(path, dtype=np.int64, mode="w+", shape=(SIZE,))
        else:
            self.counts = np.zeros(SIZE, dtype=np.int64)

    def observe_run(self, size: int, waits: list[float], seconds: float) -> None:
        """One onnxruntime run of `size` images, for requests that waited `waits`, taking `seconds`."""
        counts = self.counts
        counts[0] += size
        counts[1] += 1
        counts[2] = time.time_ns() // 1_000_000   # ms since the epoch
        at = BATCH_AT + 2 * min(size, MAX_BATCH)
        counts[at] += 1
        counts[at + 1] += int(seconds * 1e9)

    def observe_request(self, ok: bool, total: float, queue: float = 0.0, parse: float = 0.0, infer: float = 0.0,
                        reply: float = 0.0) -> None:
        """One inference request, answered (ok) or refused, with the seconds of each of its stages."""
        stages = (("success", total), ("queue", queue), ("compute_input", parse), ("compute_infer", infer),
                  ("compute_output", reply)) if ok else (("fail", total),)
        for stage, seconds in stages:
            at = AT[stage]
            self.counts[at] += 1
            self.counts[at + 1] += int(seconds * 1e9)

    def total(self) -> np.ndarray:
        """Every process's counts added up (the last inference: the latest)."""
        if not self.folder:
            return np.array(self.counts)
        each = [np.fromfile(path, dtype=np.int64) for path in Path(self.folder).glob("statistics-*.bin")]
        each = [counts for counts in each if len(counts) == SIZE]   # a file being created is not counted yet
        summed = np.sum(each, axis=0) if each else np.zeros(SIZE, dtype=np.int64)
        summed[2] = max((counts[2] for counts in each), default=0)
        return summed

    def json(self) -> dict:
        counts = [int(v) for v in self.total()]
        duration = lambda at: {"count": counts[at], "ns": counts[at + 1]}   # noqa: E731
        zero = {"count": 0, "ns": 0}
        batches = [{"batch_size": size, "compute_input": zero, "compute_infer": duration(BATCH_AT + 2 * size),
                    "compute_output": zero}
                   for size in range(1, MAX_BATCH + 1) if counts[BATCH_AT + 2 * size]]
        return {"model_stats": [{
            "name": self.name, "version": self.version, "last_inference": counts[2],
            "inference_count": counts[0], "execution_count": counts[1],
            "inference_stats": {stage: duration(at) for stage, at in AT.items()},
            "batch_stats": batches}]}
