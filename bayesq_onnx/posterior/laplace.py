"""Diagonal Laplace posterior around the trained weights (docs/design.md, "Posterior")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, so compare by identity
class DiagonalLaplace:
    """``w ~ N(mu, 1 / precision)`` elementwise on a ``(rows, L)`` view.

    ``precision = h + lambda`` broadcasts to ``mu``: activation curvature gives one value per input
    index, shape ``(1, L)``; gradient curvature gives one per weight, ``(rows, L)``.
    """

    mu: np.ndarray          # float32 (rows, L)
    precision: np.ndarray   # float32, broadcastable to mu, > 0

    @classmethod
    def fit(cls, mu: np.ndarray, h: np.ndarray, damping: float = 1e-2) -> DiagonalLaplace:
        """Precision ``h + lambda``, ``lambda = max(damping * mean(h), 1 / var(mu))``; the prior
        term keeps weights with zero curvature (dead inputs, unseen rows) at a finite width scaled
        to the layer instead of an arbitrary constant."""
        mu = np.asarray(mu, np.float32)
        if mu.ndim != 2:
            raise ValueError(f"mu must be a (rows, L) view, got shape {mu.shape}")
        h = np.asarray(h, np.float64)
        if np.broadcast_shapes(h.shape, mu.shape) != mu.shape:
            raise ValueError(f"curvature shape {h.shape} does not broadcast to mu {mu.shape}")
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        # Gauss-Newton and Fisher diagonals are >= 0; negative entries are Hutchinson probe noise.
        h = np.maximum(h, 0.0)
        mean_h = float(h.mean()) if h.size else 0.0
        if not (np.isfinite(mean_h) and mean_h > 0):
            raise ValueError(f"curvature mean is {mean_h}: need finite curvature that is not all "
                             "zero (no calibration signal reached this weight?)")
        # The prior precision is at least 1/var(mu): a Gaussian prior as wide as the trained
        # weights.  Weights the data barely reach (rare embedding rows) then stay about as uncertain
        # as the layer's own spread instead of arbitrarily wide; wider, their mass beyond every
        # clipping range swamps the expected loss and ranks formats by range width alone.
        prior, var = damping * mean_h, float(mu.var())
        if var > 0:
            prior = max(prior, 1.0 / var)
        return cls(mu, (h + prior).astype(np.float32))

    @property
    def sigma2(self) -> np.ndarray:
        return 1.0 / self.precision
