"""Quantize one site's view in a given format: choose the grid, round, remember the result.

Numerics only (no onnx): the view, its posterior and its input factor ``X^T X`` come in; codes
and their expected losses come out, cached per format because planners ask for many of them.
"""
from __future__ import annotations

import numpy as np

from ..config import Method
from ..formats import Float32, Format, UniformCodes
from ..posterior.expected_loss import expected_loss
from ..posterior.laplace import DiagonalLaplace
from .grid import minmax_grid, search_grid
from .rounding import round_gptq, round_rtn


class SiteQuantizer:
    def __init__(self, view: np.ndarray, posterior: DiagonalLaplace, xtx: np.ndarray | None,
                 method: Method, gptq_damp: float = 0.01):
        self.view, self.posterior, self.xtx = view, posterior, xtx
        self.method, self.gptq_damp = method, gptq_damp
        self._codes: dict[Format, UniformCodes] = {}
        self._grid_loss: dict[Format, float] = {}

    def grid(self, fmt: Format):
        if self.method.grid == "posterior":
            scale, zp, loss = search_grid(self.posterior, fmt.bits, fmt.block)
            return scale, zp, float(loss.sum())
        scale, zp = minmax_grid(self.view, fmt.bits, fmt.block)
        return scale, zp, float(expected_loss(self.posterior, scale, zp, fmt.bits, fmt.block).sum())

    def expected_loss(self, fmt: Format) -> float:
        """Closed-form posterior-expected whitened distortion of the format's grid (0 for fp32)."""
        if isinstance(fmt, Float32):
            return 0.0
        if fmt not in self._grid_loss:
            self._grid_loss[fmt] = self.grid(fmt)[2]
        return self._grid_loss[fmt]

    def codes(self, fmt: Format) -> UniformCodes:
        if fmt not in self._codes:
            scale, zp, loss = self.grid(fmt)
            self._grid_loss[fmt] = loss
            if self.method.rounding == "gptq" and self.xtx is not None:
                q = round_gptq(self.view, self.xtx, scale, zp, fmt.bits, fmt.block, damp=self.gptq_damp)
            else:
                q = round_rtn(self.view, scale, zp, fmt.bits, fmt.block)
            self._codes[fmt] = q
        return self._codes[fmt]

    def dequantized(self, fmt: Format) -> np.ndarray:
        """The weights the runtime will compute with, as a view."""
        return self.view if isinstance(fmt, Float32) else self.codes(fmt).dequantize()

    def forget(self, keep: set[Format]) -> None:
        """Drop cached codes not in ``keep`` (bounded memory on big models)."""
        for f in [f for f in self._codes if f not in keep]:
            del self._codes[f]
