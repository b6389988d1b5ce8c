"""Activation curvature: for ``y = x W`` the Gauss-Newton curvature of the layer-output error is
``2 X^T X``; its diagonal is ``h`` for every weight of input row ``k`` (forward passes only).

The posterior is that of the training objective: the per-row curvature measured on calibration
data, times ``evidence``, the number of rows the weights were fitted on.  Taken literally (the
calibration set as the only evidence) the posterior is wider than a 4-bit step, its mass beyond
any clipping range dominates the expected loss, and that term rewards coarse groups for reasons
that have nothing to do with the trained weights.
"""
from __future__ import annotations

import numpy as np

from ..types import SiteStats, WeightSite
from .base import CurvatureSource


class ActivationCurvature(CurvatureSource):
    name = "activation"

    def __init__(self, stats: dict[str, SiteStats], evidence: float):
        self.stats, self.evidence = stats, evidence

    def diagonal(self, site: WeightSite) -> np.ndarray:
        """``2 diag(X^T X)`` per input (matmul, and conv channels), channel energies (grouped conv), index counts (gather), each
        per calibration row times ``evidence``; a tied embedding/head gets the sum of both uses."""
        st = self.stats[site.name]
        h = np.zeros((1, 1))
        if st.xtx is not None:
            h = h + 2.0 * self.evidence / max(st.n_xtx, 1) * np.diag(st.xtx).reshape(1, site.L)
        if st.sq is not None:
            h = h + 2.0 * self.evidence / max(st.n_sq, 1) * st.sq
        return h
