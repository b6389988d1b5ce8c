"""Per-site work on a few threads: the sites of a model are independent (each has its own quantizer
and its own measurements), and the heavy parts -- numpy on whole weight matrices, onnxruntime runs
-- release the GIL, so threads overlap one site's numpy with another's forward passes."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from threadpoolctl import threadpool_limits

from .errors import BayesQError

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


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(fn, items)``, results in order as they come (so the output never depends on the thread
    count); an exception in ``fn`` is raised where its result would have been."""
    items = list(items)
    n = min(workers(), len(items))
    if n <= 1:
        yield from map(fn, items)
        return
    # the workers fill the cores: BLAS threads on top of them oversubscribe, and OpenBLAS's
    # factorizations then slow down manyfold (a 2048 x 2048 Cholesky: 0.18 s on one thread, 2.9 s
    # on two beside another busy thread, measured on 2 cores)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(n, thread_name_prefix="bayesq") as pool:
        yield from pool.map(fn, items)
