"""Per-group affine grids: the plain min/max range, or the clipping range that minimises the
posterior-expected whitened distortion (DESIGN §2, "the clipping range ... by line search")."""
from __future__ import annotations

import numpy as np

from ..posterior.expected_loss import expected_loss
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
                min_shrink: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, the clipping range ``shrink * [min, max]`` (``shrink`` on ``n_steps`` points from
    1 down to ``min_shrink``) whose real grid (after rounding the zero point) has the least
    ``expected_loss``.  Returns ``(scale float32, zero_point uint8, loss float64)``, each
    ``(rows, n_groups)``.  Shrink 1 is the min/max grid and wins ties, so the result is never
    worse than it in expected loss."""
    if n_steps < 1 or not 0 < min_shrink <= 1:
        raise ValueError(f"need n_steps >= 1 and 0 < min_shrink <= 1, got {n_steps}, {min_shrink}")
    lo, hi = _group_range(post.mu, block)
    shrink = np.linspace(1.0, min_shrink, n_steps, dtype=np.float32)[:, None, None]
    scale, zp = _affine(shrink * lo, shrink * hi, bits)            # (n_steps, rows, n_groups)
    loss = expected_loss(post, scale, zp, bits, block)
    best = np.argmin(loss, axis=0)[None]                           # first minimum: widest range
    scale, zp, loss = (np.take_along_axis(a, best, axis=0)[0] for a in (scale, zp, loss))
    return scale, zp, loss
