"""Dynamic batching, like Triton's dynamic batcher: requests that arrive together share one onnxruntime run.

Each request puts its images in a queue and awaits its own slice of the outputs. One task takes what is
queued, up to `max_batch` images, waiting at most `max_delay` seconds after the first for more to arrive, and
hands the run to the batcher's own runner thread, so the event loop keeps reading requests and writing replies
meanwhile (onnxruntime lets go of the GIL while it runs). With max_delay 0 nothing waits: requests that queued
while the previous run was busy go together. One long-lived thread fed by a queue costs the loop less than a
pool's hand-off (`asyncio.to_thread`), and less than running small batches on the loop itself once requests
come faster than one at a time (bench/README.md, Serving).
"""

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fmnist.serve.errors import Overloaded


@dataclass
class _Waiting:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Timed(NamedTuple):
    """A request's outputs, and the seconds it waited for its run and that the run took."""
    outputs: tuple
    queue: float
    infer: float


class Batcher:
    """run(images) -> tuple of output arrays, each with one row per image, called with up to max_batch images
    (more when one request alone has more). observe(batch_size, queue_seconds, run_seconds) is told about every
    run: the batch's size, each of its requests' wait, and how long the run took. Every run is made on the
    batcher's runner thread, started with the first request and stopped by close()."""

    def __init__(self, run: Callable[[np.ndarray], tuple], max_batch: int, max_delay: float, max_queue: int,
                 observe: Callable[[int, list[float], float], None] = lambda size, waits, seconds: None):
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay, max_queue
        self.observe = observe
        self.waiting: deque[_Waiting] = deque()
        self.queued = 0                  # images in the queue
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.runs: queue.SimpleQueue | None = None   # the runner thread's work: (images, future), None to stop

    async def __call__(self, images: np.ndarray) -> tuple:
        """This request's outputs. Raises Overloaded when its images would not fit in the queue."""
        return (await self.timed(images)).outputs

    async def timed(self, images: np.ndarray) -> Timed:
        """This request's outputs, with how long it waited and how long its run took."""
        if self.queued + len(images) > self.max_queue:
            raise Overloaded(f"{self.queued} images are waiting (at most {self.max_queue})")
        if self.task is None or self.task.done():   # started with the first request, again if it ever died
            self.task = asyncio.get_running_loop().create_task(self._serve())
        item = _Waiting(images, asyncio.get_running_loop().create_future())
        self.waiting.append(item)
        self.queued += len(images)
        self.arrived.set()
        return await item.future

    async def _serve(self) -> None:
        while True:
            if not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            if self.max_delay > 0 and self.queued < self.max_batch:
                deadline = self.waiting[0].queued_at + self.max_delay
                while self.queued < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                    self.arrived.clear()
                    try:
                        await asyncio.wait_for(self.arrived.wait(), left)
                    except asyncio.TimeoutError:   # TimeoutError itself from Python 3.11
                        break
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Waiting]:
        """The oldest requests, up to max_batch images in all (always at least one request); requests whose
        client has gone are dropped here, unrun."""
        batch: list[_Waiting] = []
        size = 0
        while self.waiting and (not batch or size + len(self.waiting[0].images) <= self.max_batch):
            item = self.waiting.popleft()
            self.queued -= len(item.images)
            if not item.future.done():      # cancelled: the client disconnected
                batch.append(item)
                size += len(item.images)
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
            outputs = await self._in_runner(images)
            ran = time.perf_counter() - started
            self.observe(len(images), [started - item.queued_at for item in batch], ran)
        except Exception as e:   # the model (or memory) failed: the batch's requests hear why, the batcher goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        start = 0
        for item in batch:
            end = start + len(item.images)
            if not item.future.done():
                item.future.set_result(Timed(tuple(output[start:end] for output in outputs),
                                             started - item.queued_at, ran))
            start = end

    def _in_runner(self, images: np.ndarray) -> asyncio.Future:
        """The run's outputs, from the runner thread (started here the first time)."""
        loop = asyncio.get_running_loop()
        if self.runs is None:
            self.runs = queue.SimpleQueue()
            threading.Thread(target=_runner, args=(self.run, self.runs, loop), name="fmnist-runner",
                             daemon=True).start()
        future = loop.create_future()
        self.runs.put((images, future))
        return future

    async def close(self) -> None:
        if self.runs is not None:   # the runner ends once its run, if any, is over
            self.runs.put(None)
            self.runs = None
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


def _runner(run: Callable[[np.ndarray], tuple], runs: queue.SimpleQueue, loop: asyncio.AbstractEventLoop) -> None:
    """The runner thread: each run in turn, its outputs (or its error) handed back to the loop's future."""
    while (work := runs.get()) is not None:
        images, future = work
        try:
            outputs, error = run(images), None
        except Exception as e:   # the model (or memory) failed: the loop hears why
            outputs, error = None, e
        try:
            loop.call_soon_threadsafe(_settle, future, outputs, error)
        except RuntimeError:   # the loop has closed: nobody is waiting any more
            return


def _settle(future: asyncio.Future, outputs: tuple | None, error: Exception | None) -> None:
    if future.done():   # cancelled meanwhile: the batcher was closed
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outputs)
