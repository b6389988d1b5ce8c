"""Per-site work fanned out by one executor per process: by default :class:`Threads` of this
process; with ``use_ray`` (the CLI's ``--ray``) :class:`RayCluster`, tasks on a Ray cluster.  The
sites of a model are independent (each has its own quantizer and its own measurements), and every
caller reads the results in the order of its items, so the output never depends on the executor
or its size."""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from threadpoolctl import threadpool_limits

from .errors import BayesQError, first_line

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 4   # beyond the cores, or past this, threads only contend for memory bandwidth
_override: int | None = None   # set by use_workers (the CLI's --threads)


@contextlib.contextmanager
def use_workers(n: int | None):
    """Within the block, ``workers()`` is ``n`` (None: unchanged).  A process-wide setting rather than
    an environment variable, so that a caller's environment is left as it was."""
    global _override
    if n is not None and n < 1:
        raise BayesQError(f"--threads must be >= 1, got {n}")
    before, _override = _override, (n if n is not None else _override)
    try:
        yield
    finally:
        _override = before


def workers() -> int:
    """``use_workers``'s count inside one, else ``BAYESQ_WORKERS`` if set (1: everything in the
    calling thread), else the cores, at most 4."""
    if _override is not None:
        return _override
    env = os.environ.get("BAYESQ_WORKERS")
    if not env:
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if not env.isdigit() or int(env) < 1:
        raise BayesQError(f"BAYESQ_WORKERS must be a positive integer, got {env!r}")
    return int(env)


def overlap_jobs() -> int:
    """Blocks worked on at once beside the caller (:class:`Overlap`): one more than the workers, so
    that a block's last sites never leave a core idle (0.1B Llama, bayesq at 3 bits on 2 cores: 128 s
    without overlap, 116 s with two blocks, 107 s with three); none with one worker, which keeps
    everything in the calling thread."""
    n = workers()
    return 0 if n <= 1 else n + 1


_slots: dict[int, threading.Semaphore] = {}
_slots_lock = threading.Lock()


def run_slot() -> threading.Semaphore:
    """One of ``workers()`` slots for a forward pass with its weights in hand (``Stream.advance``).
    The overlapped blocks keep more threads busy than there are workers (numpy on some, forward
    passes on others), and each forward pass holds weights in hand while it runs (its replacements,
    and in a half-precision model the widened copy of each weight its running node reads): unbounded,
    the float16 0.5B Llama's loss tables had five in onnxruntime at once.  More of them at once than
    the workers only contend for the same cores."""
    n = workers()
    with _slots_lock:
        return _slots.setdefault(n, threading.Semaphore(n))


class Threads:
    """A few threads of this process: the heavy parts -- numpy on whole weight matrices,
    onnxruntime runs -- release the GIL, so threads overlap one site's numpy with another's
    forward passes."""

    def map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        n = min(workers(), len(items))
        fn = _counted(fn)
        # the workers fill the cores: BLAS threads on top of them oversubscribe, and OpenBLAS's
        # factorizations then slow down manyfold (a 2048 x 2048 Cholesky: 0.18 s on one thread, 2.9 s
        # on two beside another busy thread, measured on 2 cores).  One BLAS thread with one worker
        # too: OpenBLAS's results depend on its thread count (the 0.1B Llama's bytes did on --threads 1)
        with threadpool_limits(limits=1, user_api="blas"):
            if n <= 1:
                yield from map(fn, items)
                return
            with ThreadPoolExecutor(n, thread_name_prefix="bayesq") as pool:
                yield from pool.map(fn, items)


_busy = 0   # items of Threads.map being worked on, in all maps of this process (read by local_map)
_busy_lock = threading.Lock()


def _counted(fn: Callable[[T], R]) -> Callable[[T], R]:
    def run(item):
        global _busy
        with _busy_lock:
            _busy += 1
        try:
            return fn(item)
        finally:
            with _busy_lock:
                _busy -= 1
    return run


class RayCluster:
    """Each item a task on the Ray cluster this process is connected to (``use_ray``).  ``fn`` is a
    closure over the analysis -- quantizers, the measurement model -- so it is put in the object
    store once per map and unpickled once per worker (``_run_task``), where the measurement
    sessions are rebuilt (runtime/probe.py); what a task computes reaches the caller only through
    its result, never through ``fn``'s state.  Ray gives each task one CPU and its workers one
    BLAS thread, as :class:`Threads` does."""

    def __init__(self):
        import ray
        self._task = ray.remote(_run_task)

    def map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        import ray
        if not items:
            return
        ref = ray.put(fn)
        # the reference inside a list: Ray would otherwise fetch and unpickle fn for every task
        # On an error the other tasks run to their end, uncancelled: ray.cancel racing a task's
        # completion crashed Ray 2.60's driver (a failed check in its task manager).
        for t in [self._task.remote([ref], item) for item in items]:
            try:
                ok, value = ray.get(t)
            except ray.exceptions.RayTaskError:
                raise    # a bug of ours on the worker: its traceback is in the message
            except ray.exceptions.RayError as e:   # a worker or node lost, out of memory
                raise BayesQError(f"Ray: {first_line(e)}") from None
            if not ok:
                raise value
            yield value


_executor: Threads | RayCluster = Threads()
_task_fn: dict[str, Callable] = {}   # in a Ray worker: the current map's fn, by its object id


def _run_task(boxed: list, item):
    """One item of a :meth:`RayCluster.map`, on a worker: ``(True, fn(item))``, or ``(False, error)``
    for the user's errors (BayesQError), which the caller raises as they are."""
    import ray
    key = boxed[0].hex()
    if key not in _task_fn:
        _task_fn.clear()   # a worker runs one task at a time: the previous map's fn is done with
        _task_fn[key] = ray.get(boxed[0])
    try:
        return True, _task_fn[key](item)
    except BayesQError as e:
        return False, e


class Budget:
    """The weights of the blocks being worked on, shared by the passes that run at once
    (``Analysis._round``: the knapsack's and the reference GPTQ's), so that memory holds a bounded
    share of the model however many passes are under way.  ``take(size)`` waits until ``size`` fits
    beside what is taken (a size past the limit waits until nothing is taken: it runs alone);
    ``give(size)`` hands it back, from whichever thread finished the work."""

    def __init__(self, limit: float):
        self.limit, self.taken, self.cancelled = limit, 0.0, False
        self._cv = threading.Condition()

    def take(self, size: float) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.cancelled or self.taken <= 0 or self.taken + size <= self.limit)
            if self.cancelled:
                raise Cancelled()
            self.taken += size

    def give(self, size: float) -> None:
        with self._cv:
            self.taken -= size
            self._cv.notify_all()

    def cancel(self) -> None:
        """Every later ``take`` raises :class:`Cancelled`: the passes sharing the budget stop at their
        next block (one of them failed, or the user interrupted)."""
        with self._cv:
            self.cancelled = True
            self._cv.notify_all()


class Cancelled(Exception):
    """A pass stopped because one beside it failed (:meth:`Budget.cancel`)."""


class Overlap:
    """A pass over the blocks whose per-block work runs in the background while the caller goes on
    to the next block -- its forward pass, then its own work -- instead of leaving a core idle
    while the last sites of a block finish.  ``submit(work, then, size)``: ``work()`` runs on a
    thread of its own, ``then(result)`` in the caller's thread, in the order of submission, when the
    caller next waits (so what ``then`` touches needs no lock).  The caller waits for the oldest
    jobs first while ``jobs`` are under way, and for room in ``budget`` (a limit on the sizes under
    way, or a :class:`Budget` shared with other passes): memory holds a bounded share of the model.
    ``jobs=0``: every job runs at once in the caller's thread (still within the budget).  Results
    never depend on the overlap: ``work`` has no side effects, and ``then`` runs in the same order
    either way.  ``reserve(size)`` waits for that room before a job's inputs are built (a block's
    quantizers copy its weights), so that a job waiting its turn holds nothing yet."""

    def __init__(self, budget: float | Budget, jobs: int):
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self.jobs, self._pending, self._blas, self._reserved = jobs, [], None, None
        self._pool = ThreadPoolExecutor(jobs, thread_name_prefix="bayesq-block") if jobs else None

    def reserve(self, size: float) -> None:
        """Wait, as :meth:`submit` would, until the next job may start; it takes this room."""
        assert self._reserved is None, "one reservation at a time"
        while self._pending and len(self._pending) >= self.jobs:
            self._collect()
        self.budget.take(size)   # handed back as soon as the work ends: a finished job holds only its result
        self._reserved = size

    def submit(self, work: Callable[[], R], then: Callable[[R], None], size: float = 0.0) -> None:
        """``size``: the job's room, unless :meth:`reserve` took it already."""
        if self._reserved is None:
            self.reserve(size)
        size, self._reserved = self._reserved, None

        def run():
            try:
                return work()
            finally:
                self.budget.give(size)

        if self._pool is None:
            then(run())
        else:
            self._pending.append((self._pool.submit(run), then))

    def _collect(self) -> None:
        future, then = self._pending.pop(0)
        then(future.result())

    def __enter__(self):
        # BLAS on one thread for the whole pass, set here in the caller's thread: the jobs' own
        # Threads.map limits it from the job threads, where threadpoolctl's limit did not always
        # take (OpenBLAS stayed on 2 threads beside 2 workers); the 0.1B Llama at 3 bits ran 81 s
        # instead of 88 with BLAS on one thread throughout, gptq 23 s instead of 24
        # (with no pool too: the results must not depend on it, and OpenBLAS's depend on its threads)
        self._blas = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        try:
            if self._reserved is not None:   # reserved, then the pass ended before the job came
                self.budget.give(self._reserved)
                self._reserved = None
            while exc[0] is None and self._pending:
                self._collect()
        finally:
            if self._pool is not None:   # on an error the jobs under way finish; their results are dropped
                self._pool.shutdown(wait=True)
            self._blas.restore_original_limits()
        return False


def side_by_side(fn: Callable[[T], R], items: list[T], cancel: Callable[[], None] = lambda: None) -> list[R]:
    """``[fn(item) for item in items]``, the items at once, each in a thread of its own (the first in
    the caller's): for passes over the model that need each other's results not at all, such as a
    budget's knapsack rounding and the reference GPTQ's sequential one, which alone runs at about one
    core of two (docs/design.md, "Streaming").  One after another on Ray (whose tasks fill the cluster
    anyway) or with one worker.  When an item fails (or the user interrupts), ``cancel()`` tells the
    others to stop (``Budget.cancel``: at their next block); the first real error is raised once
    every item has ended."""
    if len(items) <= 1 or workers() <= 1 or not isinstance(_executor, Threads):
        with threadpool_limits(limits=1, user_api="blas"):   # as below: the bytes must not depend on the workers
            return [fn(item) for item in items]

    def guarded(item):
        try:
            return fn(item)
        except BaseException:
            cancel()
            raise

    # BLAS on one thread, set in the caller's thread (see Overlap.__enter__), for all the passes
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(len(items) - 1, thread_name_prefix="bayesq-pass") as pool:
        later = [pool.submit(guarded, item) for item in items[1:]]
        try:
            first = fn(items[0])
            concurrent.futures.wait(later)
        except BaseException as e:   # (an interrupt too, here or while waiting for the others)
            cancel()
            concurrent.futures.wait(later)
            if isinstance(e, Cancelled):   # stopped for another item's error: raise that one
                for f in later:
                    if f.exception() is not None and not isinstance(f.exception(), Cancelled):
                        raise f.exception() from None
            raise
        return [first, *(f.result() for f in later)]


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(fn, items)`` on the current executor, results in order as they come; an exception in
    ``fn`` is raised where its result would have been.  ``fn`` must return all it computes (under
    Ray it runs on a copy of its closure)."""
    return _executor.map(fn, list(items))


def local_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(fn, items)`` on the threads of this process that no site's work holds (``workers()``
    less the other items of Threads.map under way), with at most that many items taken from
    ``items`` ahead of the result being read (they may be produced lazily and be large: a site's
    chunks), results in order.  For work inside one site whose heavy parts release the GIL: a
    site alone in its block (a 0.1B Llama's 24.6M-weight embedding) had its grid searched on one
    core of two, while beside other sites the extra threads only contend for the GIL (the 0.1B
    Llama's tables took 45 s instead of 35 with two threads each).  One thread in a Ray task
    (given one CPU)."""
    n = 1 if _task_fn else workers() - max(_busy - 1, 0)
    if n <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(n, thread_name_prefix="bayesq-chunk") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def use_ray(address: str | None, num_cpus: int | None = None):
    """Within the block, per-site work runs on Ray (None: unchanged): see :func:`connect_ray`.  A
    connection made here is closed at the end (a cluster started here stops)."""
    global _executor
    if address is None:
        yield
        return
    opened = connect_ray(address, num_cpus)
    before, _executor = _executor, RayCluster()
    try:
        yield
    finally:
        _executor = before
        if opened:
            import ray
            ray.shutdown()


def connect_ray(address: str, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray: ``local`` starts a cluster on this machine (``num_cpus``
    workers, default its cores), ``auto`` joins ``RAY_ADDRESS`` or the cluster ``ray start`` left
    running here, anything else is ``HOST:PORT`` or ``ray://HOST:PORT``.  The job ships this very
    package to the workers (Ray's ``py_modules``), so they run the code this process runs.  False,
    and nothing done, when the process is connected already (e.g. by the caller's ``ray.init``:
    its workers must then import the same bayesq_onnx)."""
    try:
        import ray
    except ImportError:
        raise BayesQError("--ray needs the ray package: pip install 'bayesq-onnx[ray]'") from None
    if ray.is_initialized():
        return False
    if address != "local":
        _check_reachable(address)
    # Ray's own INFO and WARNING lines (its start-up, its token notice) are not ours to print
    common = dict(runtime_env={"py_modules": [str(Path(__file__).parent)]}, logging_level=logging.ERROR)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
        else:
            ray.init(address=address, **common)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        # Ray 2.60 joins a cluster by HOST:PORT without its token (the default for `ray start`)
        # unless told: the connection is then refused after 20 s of retries
        hint = "" if address == "local" or os.environ.get("RAY_AUTH_MODE") else \
            " (a cluster with token authentication needs RAY_AUTH_MODE=token here)"
        raise BayesQError(f"cannot connect to Ray at {address}: {first_line(e)}{hint}") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error at once for an address nothing listens at: Ray itself retries its
    connection for minutes."""
    if address == "auto":
        try:   # where ray.init("auto") will connect: RAY_ADDRESS, or the latest `ray start` here
            from ray._private.services import canonicalize_bootstrap_address
            resolved = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise BayesQError("--ray auto: no running Ray cluster found (start one with `ray start --head`, "
                              "set RAY_ADDRESS, or use --ray local)") from None
        except ImportError:   # a Ray without this helper: leave the search to ray.init
            return
        if resolved is None:
            return
        address = resolved
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BayesQError(f"--ray expects auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise BayesQError(f"cannot connect to Ray at {address}: {e.strerror or first_line(e)}") from None
