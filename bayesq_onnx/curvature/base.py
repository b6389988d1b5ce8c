"""A curvature source gives, per site, the diagonal curvature ``h >= 0`` of the loss at the trained
weights, broadcastable to the site's view ``(rows, L)`` (the Laplace posterior's data term)."""
from __future__ import annotations

import numpy as np

from ..types import WeightSite


class CurvatureSource:
    name = "base"

    def diagonal(self, site: WeightSite) -> np.ndarray:
        raise NotImplementedError
