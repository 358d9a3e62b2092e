"""Dynamic batching, like Triton's dynamic batcher: requests that arrive together share one onnxruntime run.

Each request puts its images in a queue and awaits its own slice of the outputs. One task takes what is
queued, up to `max_batch` images, waiting at most `max_delay` seconds after the first for more to arrive, and
hands the run to one of the batcher's runner threads, so the event loop keeps reading requests and writing replies
meanwhile (onnxruntime lets go of the GIL while it runs). With max_delay 0 nothing waits: requests that queued
while the previous run was busy go together. Long-lived threads fed by a queue cost the loop less than a pool's
hand-off (`asyncio.to_thread`), and less than running small batches on the loop itself once requests come faster
than one at a time (bench/README.md, Serving).

With `runners` above 1, a batch whose requests bring at least `beside_from` images each (on average) starts
while others run, on a thread of its own with the `beside` run (the model on one thread), and such requests
that queued together are shared out among the free runners: for this small network two runs on a thread each
answer more images than one run on two threads. Other batches wait for the run before, as with one runner, and
share the next: where requests are small, the loop's work for each request is the limit, not the runs, and more
runs would only add to it (bench/README.md, Serving).
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
    run: the batch's size, each of its requests' wait, and how long the run took. Every run is made on one of the
    batcher's runner threads, started with the first request and stopped by close(). Up to `runners` runs at once:
    a run that starts while others are under way has at least `beside_from` images a request and is made by
    `beside`."""

    def __init__(self, run: Callable[[np.ndarray], tuple], max_batch: int, max_delay: float, max_queue: int,
                 observe: Callable[[int, list[float], float], None] = lambda size, waits, seconds: None,
                 runners: int = 1, beside: Callable[[np.ndarray], tuple] | None = None, beside_from: int = 1):
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay, max_queue
        self.observe = observe
        self.runners, self.beside, self.beside_from = runners, beside or run, beside_from
        self.waiting: deque[_Waiting] = deque()
        self.queued = 0                  # images in the queue
        self.under_way = 0               # runs handed to the runners and not yet back
        self.changed = asyncio.Event()   # a request arrived or a run ended
        self.task: asyncio.Task | None = None
        self.runs: queue.SimpleQueue | None = None   # the runners' work: (run, images, future), None to stop one
        self.threads = 0                 # runner threads started
        self.running: set[asyncio.Task] = set()

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
        # The batcher looks again at once where nothing runs, or this request might run beside what does;
        # otherwise the end of a run is soon enough, and the loop is spared a wake-up for every small request.
        if not self.under_way or (len(images) >= self.beside_from and self.under_way < self.runners):
            self.changed.set()
        return await item.future

    async def _serve(self) -> None:
        while True:
            while not self._may_start():
                self.changed.clear()
                await self.changed.wait()
            if self.max_delay > 0 and self.queued < self.max_batch and not self.under_way:
                deadline = self.waiting[0].queued_at + self.max_delay
                while self.queued < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                    self.changed.clear()
                    try:
                        await asyncio.wait_for(self.changed.wait(), left)
                    except asyncio.TimeoutError:   # TimeoutError itself from Python 3.11
                        break
            batch = self._take(self._share())
            if batch:
                self.under_way += 1
                # On every thread (`run`) only a run with none beside it, nor any about to start beside it.
                run = self.beside if self.under_way > 1 or self._may_start() else self.run
                task = asyncio.get_running_loop().create_task(self._run(batch, run))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    def _may_start(self) -> bool:
        """Whether a run may start now: none is under way, or fewer than `runners` are and the next batch is
        large enough to run beside them."""
        if not self.waiting or self.under_way >= self.runners:
            return False
        if not self.under_way:
            return True
        images, requests = self._next(self._share())
        return images >= self.beside_from * requests

    def _share(self) -> int:
        """The most images the next run takes: max_batch, or, where the queue holds large requests enough for two
        or more free runners, an even share of it, so that they run side by side rather than all on one."""
        free = self.runners - self.under_way
        if free < 2 or self.queued < self.beside_from * max(2, len(self.waiting)):
            return self.max_batch
        return min(self.max_batch, max(self.beside_from, -(-self.queued // free)))

    def _next(self, most: int) -> tuple[int, int]:
        """The images and requests _take(most) would take now."""
        size = count = 0
        for item in self.waiting:
            if size and size + len(item.images) > most:
                break
            size, count = size + len(item.images), count + 1
        return size, count

    def _take(self, most: int) -> list[_Waiting]:
        """The oldest requests, up to `most` images in all (always at least one request); requests whose client
        has gone are dropped here, unrun."""
        batch: list[_Waiting] = []
        size = 0
        while self.waiting and (not batch or size + len(self.waiting[0].images) <= most):
            item = self.waiting.popleft()
            self.queued -= len(item.images)
            if not item.future.done():      # cancelled: the client disconnected
                batch.append(item)
                size += len(item.images)
        return batch

    async def _run(self, batch: list[_Waiting], run: Callable[[np.ndarray], tuple]) -> None:
        started = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
            outputs = await self._in_runner(run, images)
            ran = time.perf_counter() - started
            self.observe(len(images), [started - item.queued_at for item in batch], ran)
        except Exception as e:   # the model (or memory) failed: the batch's requests hear why, the batcher goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        finally:
            self.under_way -= 1
            self.changed.set()
        start = 0
        for item in batch:
            end = start + len(item.images)
            if not item.future.done():
                item.future.set_result(Timed(tuple(output[start:end] for output in outputs),
                                             started - item.queued_at, ran))
            start = end

    def _in_runner(self, run: Callable[[np.ndarray], tuple], images: np.ndarray) -> asyncio.Future:
        """The run's outputs, from a runner thread (one more started here while fewer than the runs under way:
        each run has a thread free to take it)."""
        loop = asyncio.get_running_loop()
        if self.runs is None:
            self.runs, self.threads = queue.SimpleQueue(), 0
        if self.threads < self.under_way:
            self.threads += 1
            threading.Thread(target=_runner, args=(self.runs, loop), name="fmnist-runner",
                             daemon=True).start()
        future = loop.create_future()
        self.runs.put((run, images, future))
        return future

    async def close(self) -> None:
        if self.runs is not None:   # each runner ends once its run, if any, is over
            for _ in range(self.threads):
                self.runs.put(None)
            self.runs = None
        for task in [self.task, *self.running]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass


def _runner(runs: queue.SimpleQueue, loop: asyncio.AbstractEventLoop) -> None:
    """A runner thread: each run it takes, its outputs (or its error) handed back to the loop's future."""
    while (work := runs.get()) is not None:
        run, images, future = work
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
