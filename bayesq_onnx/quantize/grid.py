"""Per-group affine grids: the plain min/max range, or the clipping range that minimises the
posterior-expected whitened distortion (docs/design.md, "Clipping range")."""
from __future__ import annotations

import numpy as np

from ..posterior.expected_loss import expected_loss, rounding_loss
from ..posterior.laplace import DiagonalLaplace


def _group_range(view: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Group min/max widened to include 0: the zero point is an integer code, so 0 is always on
    the grid, and a range that excludes it could not be reached."""
    starts = np.arange(0, view.shape[1], block)
    lo = np.minimum(np.minimum.reduceat(view, starts, axis=1), 0).astype(np.float32)
    hi = np.maximum(np.maximum.reduceat(view, starts, axis=1), 0).astype(np.float32)
    return lo, hi


def _affine(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point spanning ``[lo, hi]`` (lo <= 0 <= hi) with ``2**bits`` levels."""
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
    # All-zero group: any positive scale represents it exactly; 1 is safe in fp16 too.
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.uint8)
    return scale, zp


def minmax_grid(view: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain range: ``(scale float32, zero_point uint8)``, each ``(rows, n_groups)``."""
    return _affine(*_group_range(np.asarray(view, np.float32), block), bits)


def search_grid(post: DiagonalLaplace, bits: int, block: int, n_steps: int = 10,
                min_shrink: float = 0.4, exact: int | None = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, the clipping range ``shrink * [min, max]`` (``shrink`` on ``n_steps`` points from
    1 down to ``min_shrink``) whose real grid (after rounding the zero point) has the least
    ``expected_loss``.  Returns ``(scale float32, zero_point uint8, loss float64)``, each
    ``(rows, n_groups)``.

    The closed form costs dozens of operations per weight, so every range is first screened by
    its rounding error of the posterior mean (the closed form at sigma -> 0, a few operations):
    the closed form then decides between min/max and the ``exact`` best-screened ranges of each
    group (``exact=None``: all ranges).  Shrink 1 is the min/max grid, always evaluated, and wins
    ties, so the result is never worse than it in expected loss."""
    if n_steps < 1 or not 0 < min_shrink <= 1 or (exact is not None and exact < 0):
        raise ValueError(f"need n_steps >= 1, 0 < min_shrink <= 1 and exact >= 0, got {n_steps}, "
                         f"{min_shrink}, {exact}")
    lo, hi = _group_range(post.mu, block)
    shrink = np.linspace(1.0, min_shrink, n_steps, dtype=np.float32)[:, None, None]
    scale, zp = _affine(shrink * lo, shrink * hi, bits)            # (n_steps, rows, n_groups)
    if exact is not None and exact + 1 < n_steps:
        screen = rounding_loss(post, scale[1:], zp[1:], bits, block)
        # min/max, then the best-screened others, in order of shrink (ties: the widest)
        pick = np.sort(np.argsort(screen, axis=0, kind="stable")[:exact] + 1, axis=0)
        pick = np.concatenate([np.zeros_like(pick[:1]), pick])
        scale, zp = (np.take_along_axis(a, pick, axis=0) for a in (scale, zp))
    loss = expected_loss(post, scale, zp, bits, block)
    best = np.argmin(loss, axis=0)[None]                           # first minimum: widest range
    scale, zp, loss = (np.take_along_axis(a, best, axis=0)[0] for a in (scale, zp, loss))
    return scale, zp, loss
