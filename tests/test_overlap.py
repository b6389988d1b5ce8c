"""parallel.Overlap: one block's work in the background while the caller builds the next, with the
results handed back in order and the work in flight bounded by count and by size."""
import threading
import time

import pytest

from bayesq_onnx.parallel import Overlap


class Tracker:
    """Work that records how many jobs, and how much size, run at once (``seen``: both, each time a
    job starts)."""

    def __init__(self):
        self.lock, self.jobs, self.size, self.max_jobs, self.max_size = threading.Lock(), 0, 0.0, 0, 0.0
        self.seen = []

    def work(self, i, size, seconds):
        def run():
            with self.lock:
                self.jobs += 1
                self.size += size
                self.max_jobs, self.max_size = max(self.max_jobs, self.jobs), max(self.max_size, self.size)
                self.seen.append((self.jobs, self.size))
            time.sleep(seconds)
            with self.lock:
                self.jobs -= 1
                self.size -= size
            return i
        return run


def test_results_come_back_in_submission_order_in_the_callers_thread():
    t, seen, caller = Tracker(), [], threading.get_ident()
    with Overlap(budget=100.0, jobs=3) as ov:
        # later jobs finish first: the order of `then` must not follow completion
        for i, sec in enumerate([0.15, 0.1, 0.05, 0.0, 0.05]):
            ov.submit(t.work(i, 1.0, sec), lambda r: seen.append((r, threading.get_ident())))
    assert [r for r, _ in seen] == [0, 1, 2, 3, 4]
    assert {tid for _, tid in seen} == {caller}
    assert t.max_jobs > 1   # they did overlap


def test_jobs_and_sizes_in_flight_are_bounded():
    t = Tracker()
    with Overlap(budget=3.0, jobs=3) as ov:
        for i, size in enumerate([1.0, 1.0, 1.0, 2.0, 1.0, 5.0, 1.0, 1.0]):
            ov.submit(t.work(i, size, 0.02), lambda r: None, size)
    assert t.max_jobs <= 3
    # at most the limit together, or the block bigger than it (5.0) alone
    assert all(size <= 3.0 or (size == 5.0 and jobs == 1) for jobs, size in t.seen), t.seen


def test_a_block_bigger_than_the_limit_runs_alone():
    t = Tracker()
    with Overlap(budget=2.0, jobs=4) as ov:
        ov.submit(t.work(0, 1.0, 0.05), lambda r: None, 1.0)
        ov.submit(t.work(1, 5.0, 0.05), lambda r: None, 5.0)
        ov.submit(t.work(2, 1.0, 0.05), lambda r: None, 1.0)
    assert t.max_size == 5.0 and t.max_jobs == 1


def test_passes_at_once_share_one_budget():
    """Two passes side by side (the knapsack's rounding and the reference GPTQ's sequential one), one
    Budget: the sizes under way in both together stay within it, the bigger block alone, and a job
    that fails hands its size back."""
    from bayesq_onnx.parallel import Budget

    t, budget = Tracker(), Budget(3.0)

    def one_pass(sizes, jobs):
        with Overlap(budget, jobs) as ov:
            for i, size in enumerate(sizes):
                ov.submit(t.work(i, size, 0.02), lambda r: None, size)

    other = threading.Thread(target=one_pass, args=([1.0, 2.0, 1.0, 1.0, 2.0], 0))   # sequential: no jobs
    other.start()
    one_pass([1.0, 1.0, 5.0, 1.0, 2.0, 1.0], 3)
    other.join()
    assert all(size <= 3.0 or (size == 5.0 and jobs == 1) for jobs, size in t.seen), t.seen
    assert t.max_jobs > 1 and budget.taken == 0

    with pytest.raises(ValueError):
        with Overlap(budget, 2) as ov:
            ov.submit(lambda: (_ for _ in ()).throw(ValueError("bad")), lambda r: None, 2.0)
    assert budget.taken == 0


def test_no_jobs_runs_everything_in_the_callers_thread():
    caller, where = threading.get_ident(), []
    with Overlap(budget=1.0, jobs=0) as ov:
        for i in range(3):
            ov.submit(lambda i=i: (i, threading.get_ident()), where.append)
    assert where == [(i, caller) for i in range(3)]


def test_an_error_in_the_work_reaches_the_caller_and_later_results_are_not_recorded():
    seen = []

    def boom():
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        with Overlap(budget=10.0, jobs=2) as ov:
            ov.submit(lambda: 0, seen.append)
            ov.submit(boom, seen.append)
            ov.submit(lambda: 2, seen.append)
    assert seen == [0]


def test_local_map_in_order_bounded_and_yielding_to_other_sites():
    """parallel.local_map: results in the order of the items; items taken from a lazy iterator at
    most the free threads ahead of the results read; inside a Threads.map whose other items are
    under way (the cores held by other sites), one thread."""
    from bayesq_onnx.parallel import Threads, local_map, use_workers

    taken, lock, running, most = [], threading.Lock(), [0], [0]

    def items():
        for i in range(12):
            taken.append(i)
            yield i

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (i % 3))   # uneven: later items finish first
        with lock:
            running[0] -= 1
        return i * i

    with use_workers(3):
        out = []
        for r in local_map(work, items()):
            assert len(taken) <= len(out) + 3          # at most 3 items ahead of what was read
            out.append(r)
        assert out == [i * i for i in range(12)] and most[0] > 1

        def site(k, together):   # sites side by side: each local_map gets 3 - 2 = 1 thread
            together.wait()      # the others are under way
            names = list(local_map(lambda i: threading.current_thread().name, range(4)))
            together.wait()      # and stay so until all have mapped
            return names + [threading.current_thread().name]

        three = threading.Barrier(3)
        names = list(Threads().map(lambda k: site(k, three), range(3)))
        assert all(len(set(n)) == 1 for n in names)    # each ran its chunks in its own thread
        # alone, a site's chunks go to threads of their own
        alone = next(Threads().map(lambda k: site(k, threading.Barrier(1)), [0]))
        assert set(alone[:-1]) <= {f"bayesq-chunk_{i}" for i in range(3)}


def test_blas_on_one_thread_while_blocks_overlap():
    """An Overlap with jobs holds BLAS to one thread from the caller's thread for its whole pass
    (the jobs' own limits, set from their threads, did not always take), and gives it back."""
    np = pytest.importorskip("numpy")
    from threadpoolctl import threadpool_info

    np.linalg.cholesky(np.eye(2))   # BLAS loaded

    def blas():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before, seen = blas(), []
    if before in (set(), {1}):
        pytest.skip("BLAS on one thread already: nothing to tell apart")
    with Overlap(10.0, 2) as ov:
        for i in range(3):
            ov.submit(lambda: blas(), seen.append, 1.0)
    assert seen == [{1}] * 3
    assert blas() == before


def test_side_by_side_runs_the_items_at_once_and_returns_them_in_order():
    """parallel.side_by_side: the passes of one budget at once (a barrier only they can pass
    together), results in the items' order; an error once every item has ended; one worker: in turn,
    in the caller's thread."""
    from bayesq_onnx.parallel import side_by_side, use_workers

    both = threading.Barrier(2, timeout=10)
    ended = []

    def item(i):
        both.wait()            # only passes if the other item runs at the same time
        time.sleep(0.05 * (1 - i))
        ended.append(i)
        return i * 10

    with use_workers(2):
        assert side_by_side(item, [0, 1]) == [0, 10]

        def fails_first(i):
            if i == 0:
                raise ValueError("pass 0")
            time.sleep(0.05)
            ended.append("late")
            return i

        with pytest.raises(ValueError, match="pass 0"):
            side_by_side(fails_first, [0, 1])
        assert ended[-1] == "late"   # the other pass ended before the error was raised
    with use_workers(1):
        caller = threading.get_ident()
        assert side_by_side(lambda i: (i, threading.get_ident()), [0, 1]) == [(0, caller), (1, caller)]


def test_a_failing_pass_stops_the_one_beside_it_at_its_next_block():
    """When one of the passes side by side fails, the budget they share is cancelled: the other
    stops at its next block instead of running to its end, and the first pass's own error is what
    the caller sees (in either thread)."""
    from bayesq_onnx.parallel import Budget, side_by_side, use_workers

    for failing, error in ((0, ValueError), (1, ValueError), (0, KeyboardInterrupt)):   # the user's ^C too
        budget, blocks = Budget(10.0), {0: 0, 1: 0}

        def one_pass(i):
            with Overlap(budget, 0) as ov:
                for b in range(200):
                    if i == failing and b == 3:
                        raise error(f"pass {i} failed")
                    ov.submit(lambda: time.sleep(0.005), lambda r: None, 1.0)
                    blocks[i] += 1

        with use_workers(2), pytest.raises(error, match=f"pass {failing} failed"):
            side_by_side(one_pass, [0, 1], cancel=budget.cancel)
        assert blocks[1 - failing] < 200, blocks   # stopped early, not run to its end


def test_room_is_reserved_before_a_block_is_built():
    """``reserve`` waits for room as ``submit`` would, before the block's inputs exist (a pass builds
    a block's quantizers, copies of its weights, only once it may run); ``submit`` then uses that
    room, and a reservation the pass never used is handed back when it ends."""
    from bayesq_onnx.parallel import Budget

    t, budget, built = Tracker(), Budget(2.0), []

    def block(i, size):
        built.append((i, budget.taken))   # what was taken when this block's inputs were made
        return t.work(i, size, 0.03)

    with Overlap(budget, 2) as ov:
        for i, size in enumerate([2.0, 2.0, 1.0]):
            ov.reserve(size)
            ov.submit(block(i, size), lambda r: None)
        ov.reserve(1.0)   # the pass ends here (its model had no further block)
    # each block was built with its own room taken and no other's: the limit holds at build time too
    assert [taken for _, taken in built] == [2.0, 2.0, 1.0]
    assert t.max_size <= 2.0 and budget.taken == 0
