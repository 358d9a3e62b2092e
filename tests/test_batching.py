"""The dynamic batcher on its own, with a model whose outputs say which image they came from: each request gets
its own rows back when requests share a run, and the queue never holds more than its bound."""

import asyncio
import threading

import numpy as np
import pytest

from fmnist.serve.batching import Batcher, Overloaded


def images(first: int, count: int) -> np.ndarray:
    """`count` images whose every pixel is its own number: first, first + 1, ..."""
    return np.arange(first, first + count, dtype=np.float32).reshape(count, 1, 1, 1) * np.ones((1, 1, 28, 28),
                                                                                                np.float32)


class Model:
    """Two outputs per image, as the exported model has (logits, ood_score): its number, and its number x 10.
    The first run waits until `go` is set, so that the requests that arrive meanwhile queue and share the next."""

    def __init__(self) -> None:
        self.go, self.sizes = threading.Event(), []

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.sizes:
            self.go.wait(10)
        self.sizes.append(len(batch))
        numbers = batch[:, 0, 0, 0]
        return numbers[:, None].repeat(10, axis=1), numbers * 10


def test_requests_that_share_a_run_each_get_their_own_rows():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0, max_queue=1000)
        first = asyncio.ensure_future(batcher(images(0, 1)))   # runs alone, and holds the run up
        await asyncio.sleep(0.05)
        sizes = (3, 1, 4, 2)   # these queue meanwhile: one run of 10 images
        starts = np.cumsum((100,) + sizes[:-1])
        later = [asyncio.ensure_future(batcher(images(int(s), n))) for s, n in zip(starts, sizes, strict=True)]
        await asyncio.sleep(0.05)
        model.go.set()
        answers = await asyncio.gather(first, *later)
        await batcher.close()
        return starts, sizes, answers

    starts, sizes, (alone, *shared) = asyncio.run(main())
    assert model.sizes == [1, sum(sizes)]   # they did share one run
    np.testing.assert_array_equal(alone[1], [0])
    for start, count, (logits, scores) in zip(starts, sizes, shared, strict=True):
        mine = np.arange(start, start + count, dtype=np.float32)
        assert logits.shape == (count, 10) and scores.shape == (count,)
        np.testing.assert_array_equal(logits[:, 0], mine)
        np.testing.assert_array_equal(scores, mine * 10)


def test_the_queue_never_holds_more_than_its_bound_its_own_images_counted():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0, max_queue=8)
        running = asyncio.ensure_future(batcher(images(0, 1)))   # taken off the queue: it runs, held up
        await asyncio.sleep(0.05)
        five = asyncio.ensure_future(batcher(images(1, 5)))      # 5 of 8 waiting
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match=r"5 images are waiting \(at most 8\)"):
            await batcher(images(6, 4))                           # 5 + 4 > 8: refused, though 5 < 8
        three = asyncio.ensure_future(batcher(images(6, 3)))     # 5 + 3 = 8: fits
        await asyncio.sleep(0.01)
        assert batcher.queued == 8
        model.go.set()
        await asyncio.gather(running, five, three)
        await batcher.close()

    asyncio.run(main())
    assert model.sizes == [1, 8]
