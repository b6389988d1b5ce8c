"""The posterior kept in a compressed model (docs/design.md, "Keeping the posterior"): its standard
deviations, their log-quantized storage, the prior precision tuned on held-back data, and weight
samples.  Numerics only (no ONNX).

The deployed posterior is the diagonal Laplace ``w ~ N(mu, 1 / (h + lambda))`` with ``h`` the
curvature the compressor already has (activation or gradient, times ``evidence``) and ``lambda``
one prior precision for the whole model, chosen on held-back labelled samples (``tune_prior``).
With activation curvature ``h`` is one value per input index, so ``sigma`` is a ``(1, L)`` row that
broadcasts over the view's rows and is stored once; gradient curvature gives a ``(rows, L)`` array.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..formats import BayesqUniform, Float32, Format
from ..formats.bayesq_uniform import group_index
from ..formats.base import UniformCodes
from ..quantize.grid import minmax_grid
from ..quantize.rounding import round_rtn

# the prior precisions tried, relative to the model's mean curvature: from "the curvature decides"
# (1e-4) to "the prior decides" (1e2); the held-back NLL picks one
PRIOR_GRID = tuple(10.0 ** k for k in range(-4, 3))
LOG_FLOOR = 1e-30      # sigma > 0 always (lambda > 0); the floor only guards log of underflow


def compact(h: np.ndarray, rows: int, L: int) -> np.ndarray:
    """Curvature broadcast to ``(1, L)`` when it is the same for every row (activation curvature),
    else ``(rows, L)``: the shape sigma is stored in."""
    h = np.asarray(h, np.float64)
    r = 1 if h.ndim < 2 or h.shape[0] == 1 else rows
    return np.broadcast_to(h, (r, L)).copy()


def laplace_sigma(h: np.ndarray, prior: float) -> np.ndarray:
    """``1 / sqrt(h + prior)`` (float32); negative curvature entries (probe noise) count as 0."""
    if not prior > 0:
        raise ValueError(f"prior precision must be > 0, got {prior}")
    return (1.0 / np.sqrt(np.maximum(np.asarray(h, np.float64), 0.0) + prior)).astype(np.float32)


def mean_curvature(hs: list[np.ndarray], sizes: list[int]) -> float:
    """Mean curvature per weight over all sites (compact rows stand for ``rows`` identical ones)."""
    total = sum(float(np.maximum(h, 0).mean()) * n for h, n in zip(hs, sizes))
    return total / max(sum(sizes), 1)


@dataclass(frozen=True)
class PriorChoice:
    prior: float                          # the chosen prior precision lambda
    table: tuple[tuple[float, float], ...]  # (lambda, held-back NLL) for every lambda tried


def tune_prior(nll_of: Callable[[float], float], scale: float, grid=PRIOR_GRID) -> PriorChoice:
    """The prior precision ``scale * g`` (``g`` in ``grid``) of least held-back NLL; ``nll_of(lambda)``
    scores the fp32 Bayesian model's predictive.  Ties keep the smaller lambda (the wider posterior)."""
    table = [(scale * g, float(nll_of(scale * g))) for g in grid]
    best = min(table, key=lambda t: (t[1] if np.isfinite(t[1]) else np.inf, t[0]))
    return PriorChoice(best[0], tuple(table))


def draw(mu: np.ndarray, sigma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One weight sample ``mu + sigma * eps`` (float32) with standard normal ``eps`` from ``rng``."""
    eps = rng.standard_normal(np.shape(mu))
    return (mu + sigma * eps).astype(np.float32)


# ----------------------------------------------------------------------------- log quantization


@dataclass(frozen=True)
class LogCodes:
    """``log sigma - offset`` on an affine grid: ``sigma ~= exp((q - zp) * scale + offset)``.

    The affine grid (``codes``, fp16 ``scale``, integer zero point, per group) is the bayesq affine
    format's own, whose range always includes 0; the per-site ``offset`` (the median of
    ``log sigma``, one float32) centres the values so that 0 is inside every group's range at
    little cost."""

    codes: UniformCodes
    offset: float

    def dequantize(self) -> np.ndarray:
        c = self.codes
        g = group_index(c.codes.shape[1], c.block)
        u = (c.codes.astype(np.float32) - c.zero_point[:, g].astype(np.float32)) * c.scale[:, g]
        return np.exp(u.astype(np.float64) + self.offset).astype(np.float32)


def affine_like(mean_format: Format, L: int) -> Format:
    """The bayesq affine format (fp16 scales) with a weight's mean's code bits and group size: how its
    standard deviations (on ``log sigma``) and its SPQ sample sets are stored; fp32 for fp32 means.
    Groups follow the bayesq ops' rule (multiples of 16), so a mean group that is not one (a codebook
    per row, a conv group of 9) or spans the row becomes one group per row."""
    if isinstance(mean_format, Float32) or mean_format.bits >= 16:
        return Float32()
    per_row = -(-L // 16) * 16      # a block covering the row: one group
    block = mean_format.block if 0 < mean_format.block < L and mean_format.block % 16 == 0 else per_row
    return BayesqUniform(min(mean_format.bits, 8), block, "float16")


def log_quantize(sigma: np.ndarray, fmt: BayesqUniform) -> LogCodes:
    """``sigma`` (r, L) > 0 to ``fmt.bits``-bit codes of ``log sigma - offset``, min/max range per group
    (widened to include 0), round to nearest, scales rounded to fp16 first."""
    u = np.log(np.maximum(np.asarray(sigma, np.float64), LOG_FLOOR))
    offset = float(np.float32(np.median(u)))
    v = (u - offset).astype(np.float32)
    block = fmt.block
    scale, zp = minmax_grid(v, fmt.bits, block)
    scale = fmt.round_scales(scale)
    codes = round_rtn(v, scale, zp, fmt.bits, block)
    # the packed format records block 0 as "one group per row"
    return LogCodes(UniformCodes(codes.codes, codes.scale, codes.zero_point, fmt.bits, fmt.block), offset)


def std_stored_bits(fmt: Format, rows: int, L: int) -> int:
    """Every bit stored for one site's sigma: codes, scales, zero points and the float32 offset."""
    if isinstance(fmt, Float32):
        return 32 * rows * L
    return fmt.stored_bits(rows, L) + 32


# ----------------------------------------------------------------------------- fixed sample sets (SPQ)


def quantize_sample(w: np.ndarray, fmt: BayesqUniform) -> UniformCodes:
    """One sampled weight view on its own min/max grid in ``fmt`` (round to nearest)."""
    block = fmt.block
    scale, zp = minmax_grid(w, fmt.bits, block)
    c = round_rtn(w, fmt.round_scales(scale), zp, fmt.bits, block)
    return UniformCodes(c.codes, c.scale, c.zero_point, fmt.bits, fmt.block)
