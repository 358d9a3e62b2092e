"""The dynamic batcher on its own, with a model whose outputs say which image they came from: each request gets
its own rows back when requests share a run, and the queue never holds more than its bound."""

import asyncio
import threading

import numpy as np
import pytest

from fmnist.serve.batching import Batcher
from fmnist.serve.errors import Overloaded


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


class Recording:
    """A model that answers at once and records each run's size; fails a run that holds image number 666."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.sizes.append(len(batch))
        numbers = batch[:, 0, 0, 0]
        if 666 in numbers:
            raise MemoryError("the model ran out of memory")
        return numbers[:, None].repeat(10, axis=1), numbers * 10


def run(main, seconds: float = 10):
    """asyncio.run with a bound: a batcher that waits where it should not fails the test instead of hanging."""
    return asyncio.run(asyncio.wait_for(main(), seconds))


def test_requests_within_max_delay_of_the_first_share_its_run():
    model, waits = Recording(), []

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0.5, max_queue=1000,
                          observe=lambda size, queued, seconds: waits.append((size, queued)))
        first = asyncio.ensure_future(batcher(images(0, 1)))
        await asyncio.sleep(0.1)                      # within the first's 0.5 s
        second = await batcher(images(1, 2))
        await first
        await batcher.close()
        return second

    logits, scores = run(main)
    assert model.sizes == [3]
    np.testing.assert_array_equal(scores, [10, 20])
    (size, queued), = waits
    assert size == 3 and len(queued) == 2 and queued[0] >= 0.4 and 0 < queued[1] < queued[0]


def test_a_full_batch_runs_without_waiting_out_the_delay_and_a_lone_request_runs_at_its_deadline():
    model = Recording()

    async def main():
        batcher = Batcher(model, max_batch=4, max_delay=60, max_queue=1000)
        await asyncio.gather(batcher(images(0, 1)), batcher(images(1, 3)))   # 4 of 4: no need to wait 60 s
        first = asyncio.ensure_future(batcher(images(4, 1)))                # 1 of 4: it waits for more...
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher(images(5, 3)))                  # ...until 3 more fill the run
        quick = Batcher(model, max_batch=4, max_delay=0.05, max_queue=1000)
        await quick(images(8, 1))                                            # alone: runs after 0.05 s
        await batcher.close()
        await quick.close()

    run(main)
    assert model.sizes == [4, 4, 1]


@pytest.mark.parametrize("sizes, runs", [((3, 2, 6, 1), [3, 2, 6, 1]),   # 3 + 2 > 4; 6 alone; 1 after
                                         ((2, 2, 2), [4, 2])])             # 2 + 2 = 4, then the third
def test_runs_hold_at_most_max_batch_images_but_a_bigger_request_runs_whole(sizes, runs):
    model = Recording()

    async def main():
        batcher = Batcher(model, max_batch=4, max_delay=0.2, max_queue=1000)
        answers = await asyncio.gather(*(batcher(images(10 * i, n)) for i, n in enumerate(sizes)))
        await batcher.close()
        return answers

    answers = run(main)
    assert model.sizes == runs
    for i, (n, (logits, scores)) in enumerate(zip(sizes, answers, strict=True)):
        np.testing.assert_array_equal(scores, np.arange(10 * i, 10 * i + n) * 10)
        assert logits.shape == (n, 10)


def test_a_request_whose_client_went_away_is_not_run_and_the_queue_forgets_it():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0, max_queue=1000)
        running = asyncio.ensure_future(batcher(images(0, 1)))   # holds the run up
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher(images(1, 5)))
        stays = asyncio.ensure_future(batcher(images(6, 2)))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.go.set()
        await running
        logits, scores = await stays
        assert batcher.queued == 0
        await batcher.close()
        return scores

    np.testing.assert_array_equal(run(main), [60, 70])
    assert model.sizes == [1, 2]


def test_a_failed_run_fails_its_own_requests_and_the_next_run_still_answers():
    model = Recording()

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0.2, max_queue=1000)
        together = await asyncio.gather(batcher(images(665, 2)), batcher(images(1, 1)), return_exceptions=True)
        after = await batcher(images(2, 1))
        await batcher.close()
        assert batcher.task.cancelled()
        return together, after

    (first, second), (_, scores) = run(main)
    assert isinstance(first, MemoryError) and isinstance(second, MemoryError)   # both shared the failed run
    assert str(first) == "the model ran out of memory"
    np.testing.assert_array_equal(scores, [20])
    assert model.sizes == [3, 1]


def runners() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "fmnist-runner"]


def settled_runners() -> int:
    """The runner threads left running, once those of earlier tests' closed batchers have ended."""
    for thread in runners():
        thread.join(2)
    return len(runners())


def test_every_run_is_made_on_one_runner_thread_which_close_stops():
    """Not on the event loop's thread, whatever the run's size, and on the same thread each time; each request
    gets its own rows; close() ends the thread."""
    threads: list[tuple[int, int]] = []

    def model(batch: np.ndarray) -> tuple[np.ndarray]:
        threads.append((len(batch), threading.get_ident()))
        return (batch[:, 0, 0, 0] * 2,)

    before = settled_runners()

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0, max_queue=1000)
        answers = [await batcher(images(first, count)) for first, count in ((0, 3), (10, 4), (20, 1))]
        assert len(runners()) == before + 1
        await batcher.close()
        return threading.get_ident(), answers

    loop_thread, answers = run(main)
    assert [size for size, _ in threads] == [3, 4, 1]
    assert len({thread for _, thread in threads}) == 1 and threads[0][1] != loop_thread
    for (first, count), (doubled,) in zip(((0, 3), (10, 4), (20, 1)), answers, strict=True):
        np.testing.assert_array_equal(doubled, 2 * np.arange(first, first + count, dtype=np.float32))
    for thread in runners()[before:]:
        thread.join(5)
    assert len(runners()) == before   # close() stopped it


def test_the_event_loop_goes_on_while_a_run_is_under_way():
    """A run takes its time on the runner thread; meanwhile the loop keeps going round (it reads requests and
    sends replies), and what queues meanwhile shares the next run."""
    import time

    log: list[str] = []

    def model(batch: np.ndarray) -> tuple[np.ndarray]:
        log.append(f"run {len(batch)}")
        time.sleep(0.1)
        log.append("ran")
        return (batch[:, 0, 0, 0],)

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0, max_queue=1000)
        done = False

        async def ticker():
            while not done:
                log.append("tick")
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        first = asyncio.ensure_future(batcher(images(0, 1)))
        await asyncio.sleep(0.03)                    # the first run is under way
        await asyncio.gather(first, *(batcher(images(i, 1)) for i in range(1, 4)))
        done = True
        await ticking
        await batcher.close()

    run(main)
    runs = [i for i, entry in enumerate(log) if entry.startswith("run")]
    assert [log[i] for i in runs] == ["run 1", "run 3"], log   # the three that came during the first shared one
    during = log[runs[0]:log.index("ran")]
    assert during.count("tick") >= 5, log   # about ten of the loop's ticks fit in the 0.1 s run


def test_timed_says_how_long_each_request_waited_and_its_run_took():
    """What the statistics extension reports per request (queue, compute_infer): a request that came while the
    previous run was busy waited for it, and each run took at least the model's own time."""
    import time

    observed: list[tuple[int, list[float], float]] = []

    def model(batch: np.ndarray) -> tuple[np.ndarray]:
        time.sleep(0.05)
        return (batch[:, 0, 0, 0],)

    async def main():
        batcher = Batcher(model, max_batch=256, max_delay=0, max_queue=1000,
                          observe=lambda size, waits, seconds: observed.append((size, waits, seconds)))
        first = asyncio.ensure_future(batcher.timed(images(0, 1)))
        await asyncio.sleep(0.01)   # the first run is under way
        second = await batcher.timed(images(1, 2))
        answers = await first, second
        await batcher.close()
        return answers

    first, second = asyncio.run(main())
    assert 0 <= first.queue < second.queue < 5 and second.queue >= 0.035   # it waited out most of the first run
    assert 0.05 <= first.infer < 5 and 0.05 <= second.infer < 5
    assert [(size, len(waits), seconds) for size, waits, seconds in observed] == \
        [(1, 1, first.infer), (2, 1, second.infer)]
    assert observed[1][1] == [second.queue]
    np.testing.assert_array_equal(second.outputs[0], [1, 2])


def test_a_batch_large_enough_runs_beside_the_one_under_way_on_a_thread_of_its_own():
    """With two runners: a batch of at least `beside_from` images a request starts while a run is under way,
    made by `beside` on a second thread; a smaller one waits for it; never more than two runs at once; close()
    stops both threads."""
    go = threading.Event()
    made: list[tuple[str, int, int]] = []   # (which run, its images, its thread)

    def model(name: str):
        def run(batch: np.ndarray) -> tuple[np.ndarray]:
            made.append((name, len(batch), threading.get_ident()))
            go.wait(10)   # every run holds on until the test lets them go
            return (batch[:, 0, 0, 0] * 2,)
        return run

    before = settled_runners()

    async def until(count: int) -> None:
        for _ in range(200):
            if len(made) >= count:
                return
            await asyncio.sleep(0.01)

    async def main():
        batcher = Batcher(model("run"), max_batch=256, max_delay=0, max_queue=1000, runners=2,
                          beside=model("beside"), beside_from=16)
        first = asyncio.ensure_future(batcher(images(0, 1)))
        await until(1)
        few = asyncio.ensure_future(batcher(images(1, 3)))      # 3 images: too few to run beside the first
        await asyncio.sleep(0.1)
        waited = list(made)
        many = asyncio.ensure_future(batcher(images(4, 40)))    # now 43 in 2 requests: they run beside it
        await until(2)
        third = asyncio.ensure_future(batcher(images(44, 30)))  # two runs are under way: it waits
        await asyncio.sleep(0.1)
        held = list(made)
        threads = len(runners())
        go.set()
        answers = await asyncio.gather(first, few, many, third)
        await batcher.close()
        return waited, held, threads, answers

    waited, held, threads, answers = run(main)
    assert [(name, size) for name, size, _ in waited] == [("run", 1)]
    assert [(name, size) for name, size, _ in held] == [("run", 1), ("beside", 43)]
    assert held[0][2] != held[1][2] and threads == before + 2
    assert [size for _, size, _ in made] == [1, 43, 30]
    for (first, count), (doubled,) in zip(((0, 1), (1, 3), (4, 40), (44, 30)), answers, strict=True):
        np.testing.assert_array_equal(doubled, 2 * np.arange(first, first + count, dtype=np.float32))
    for thread in runners()[before:]:
        thread.join(5)
    assert len(runners()) == before   # close() stopped both


def test_what_queued_together_is_shared_out_among_free_runners_and_a_lone_run_gets_every_thread():
    """Two requests of 20 images that queue together, with two runners free, are two runs side by side, each
    made by `beside`, not one run of 40; a request alone is made by `run`, on every thread."""
    made: list[tuple[str, int]] = []

    def model(name: str):
        def run(batch: np.ndarray) -> tuple[np.ndarray]:
            made.append((name, len(batch)))
            return (batch[:, 0, 0, 0] + 1,)
        return run

    async def main():
        batcher = Batcher(model("run"), max_batch=256, max_delay=0, max_queue=1000, runners=2,
                          beside=model("beside"), beside_from=16)
        together = await asyncio.gather(batcher(images(0, 20)), batcher(images(20, 20)))
        alone = await batcher(images(40, 20))
        await batcher.close()
        return [*together, alone]

    answers = run(main)
    assert made == [("beside", 20), ("beside", 20), ("run", 20)]
    for first, (plus_one,) in zip((0, 20, 40), answers, strict=True):
        np.testing.assert_array_equal(plus_one, np.arange(first, first + 20, dtype=np.float32) + 1)


def test_many_small_requests_wait_for_the_run_under_way_however_many_images_they_add_up_to():
    """Single images are the loop's work more than the model's: 40 of them, queued while a run is under way,
    wait and share the next run (made by `run`), even with a runner free."""
    go = threading.Event()
    made: list[tuple[str, int]] = []

    def model(name: str):
        def run(batch: np.ndarray) -> tuple[np.ndarray]:
            made.append((name, len(batch)))
            go.wait(10)
            return (batch[:, 0, 0, 0],)
        return run

    async def main():
        batcher = Batcher(model("run"), max_batch=256, max_delay=0, max_queue=1000, runners=2,
                          beside=model("beside"), beside_from=16)
        first = asyncio.ensure_future(batcher(images(0, 1)))
        await asyncio.sleep(0.05)
        singles = [asyncio.ensure_future(batcher(images(i, 1))) for i in range(1, 41)]
        await asyncio.sleep(0.1)
        waited = list(made)
        go.set()
        answers = await asyncio.gather(first, *singles)
        await batcher.close()
        return waited, answers

    waited, answers = run(main)
    assert waited == [("run", 1)] and made == [("run", 1), ("run", 40)]
    assert [float(scores[0]) for (scores,) in answers] == list(range(41))


def test_no_more_runs_than_runners_and_small_requests_wait_for_a_run_to_end_not_for_a_free_runner():
    """Each run holds on until the test lets it go, one by one. Two runners: with two runs under way a third
    large batch waits; when the run beside ends, the single images queued behind wait on for the first run."""
    holds: list[threading.Event] = []
    made: list[tuple[str, int]] = []

    def model(name: str):
        def run(batch: np.ndarray) -> tuple[np.ndarray]:
            hold = threading.Event()
            holds.append(hold)
            made.append((name, len(batch)))
            hold.wait(10)
            return (batch[:, 0, 0, 0],)
        return run

    async def settle() -> list[tuple[str, int]]:
        await asyncio.sleep(0.1)
        return list(made)

    async def main():
        batcher = Batcher(model("run"), max_batch=20, max_delay=0, max_queue=1000, runners=2,
                          beside=model("beside"), beside_from=16)
        requests = [asyncio.ensure_future(batcher(images(0, 1)))]
        await settle()
        requests += [asyncio.ensure_future(batcher(images(first, 20))) for first in (1, 21)]   # together
        two = await settle()     # the first of them beside the run; the second waits: two are under way
        requests += [asyncio.ensure_future(batcher(images(i, 1))) for i in range(41, 46)]
        holds[1].set()           # the run beside ends: the other 20 take its place, not the single images
        three = await settle()
        holds[2].set()           # and again: the single images, five in five requests, wait for the first run
        four = await settle()
        holds[0].set()
        await settle()
        for hold in holds:
            hold.set()
        answers = await asyncio.gather(*requests)
        await batcher.close()
        return two, three, four, answers

    two, three, four, answers = run(main)
    assert two == [("run", 1), ("beside", 20)]
    assert three == [*two, ("beside", 20)]
    assert four == three
    assert made == [*three, ("run", 5)]
    assert [float(scores[0]) for (scores,) in answers] == [0, 1, 21, 41, 42, 43, 44, 45]
