"""Throttled progress lines through logging, so the CLI's --quiet (or any logging setup) silences them."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("bayesq_onnx.progress")


class Progress:
    """``with Progress("tables", total) as p: ... p.step()`` logs at most every ``every`` seconds."""

    def __init__(self, what: str, total: int, every: float = 5.0):
        self.what, self.total, self.every = what, max(int(total), 1), every
        self.done = 0
        self._t0 = self._last = time.monotonic()

    def __enter__(self):
        log.info("%s: 0/%d", self.what, self.total)
        return self

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            elapsed = now - self._t0
            # the rate so far: sites and batches of one model cost alike to within a few x
            left = elapsed * (self.total - self.done) / max(self.done, 1)
            log.info("%s: %d/%d (%.0f s, about %.0f s left)", self.what, self.done, self.total, elapsed, left)

    def __exit__(self, *exc):
        if exc[0] is None:
            log.info("%s: %d/%d done in %.1f s", self.what, self.done, self.total, time.monotonic() - self._t0)
        return False
