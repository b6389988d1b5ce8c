"""Curvature read from ``CURV.npz``: keys = initializer names, values = diagonal curvature in the
initializer's own shape, all finite and >= 0 (what ``bayesq-onnx curvature`` writes).  The file
holds the curvature of the loss per sample; like the activation source, it is multiplied by the
``evidence`` (the samples the weights were trained on) to make the posterior's precision."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BayesQError, first_line
from ..types import WeightSite
from .base import CurvatureSource


class FileCurvature(CurvatureSource):
    name = "file"

    def __init__(self, path: str | Path, sites: list[WeightSite], evidence: float = 1.0):
        path = Path(path)
        if not path.is_file():
            raise BayesQError(f"curvature file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {s.name: z[s.name] for s in sites if s.name in z.files}
        except Exception as e:
            raise BayesQError(f"cannot read curvature file {path}: {first_line(e)}") from None
        missing = [s.name for s in sites if s.name not in arrays]
        if missing:
            raise BayesQError(f"curvature file {path} has no entry for {len(missing)} weight(s), e.g. {missing[0]!r}")
        for s in sites:
            a = arrays[s.name]
            if tuple(a.shape) != s.shape:
                raise BayesQError(f"curvature for {s.name!r} has shape {a.shape}, the weight has {s.shape}")
            if not np.isfinite(a).all() or (a < 0).any():
                raise BayesQError(f"curvature for {s.name!r} must be finite and >= 0")
        self.arrays, self.evidence = arrays, evidence

    def diagonal(self, site: WeightSite) -> np.ndarray:
        return site.to_view(self.arrays[site.name].astype(np.float64)) * self.evidence
