"""Throttled progress lines through logging, so the CLI's --quiet (or any logging setup) silences them."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("bayesq_onnx.progress")


class Progress:
    """``with Progress("tables", total) as p: ... p.step()`` logs at most every ``every`` seconds.
    ``work``: the steps' costs, in any unit, when they differ by much (a site's weights); each step then
    names its own (``p.step(work=...)``) and the estimate of what is left follows the work done, not the
    count of steps."""

    def __init__(self, what: str, total: int, every: float = 5.0, work: float | None = None):
        self.what, self.total, self.every = what, max(int(total), 1), every
        self.done, self.work, self.worked = 0, work, 0.0
        self._t0 = self._last = time.monotonic()
        self._lock = threading.Lock()   # steps may come from several threads (side-by-side passes)

    def __enter__(self):
        log.info("%s: 0/%d", self.what, self.total)
        return self

    def step(self, n: int = 1, work: float = 0.0) -> None:
        with self._lock:
            self._step(n, work)

    def _step(self, n: int, work: float) -> None:
        self.done += n
        self.worked += work
        now = time.monotonic()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            elapsed = now - self._t0
            # the rate so far, by work where it was given; otherwise steps are taken to cost alike
            # (batches of one model do; sites to within a few x)
            if self.work:
                left = elapsed * max(self.work - self.worked, 0.0) / max(self.worked, 1e-300)
            else:
                left = elapsed * (self.total - self.done) / max(self.done, 1)
            log.info("%s: %d/%d (%.0f s, about %.0f s left)", self.what, self.done, self.total, elapsed, left)

    def __exit__(self, *exc):
        if exc[0] is None:
            log.info("%s: %d/%d done in %.1f s", self.what, self.done, self.total, time.monotonic() - self._t0)
        return False
