"""Rounding a view onto a fixed per-group affine grid: nearest (RTN) or GPTQ error feedback.

GPTQ (Frantar et al. 2022; IST-DASLab/gptq ``gptq.py``) quantizes the columns of the view one at
a time along ``L`` and spreads each column's error over the columns not yet quantized, so as to
minimise ``||X W^T - X Q^T||^2`` with ``H = X^T X``.  The update for column ``i`` uses row ``i``
of the upper Cholesky factor of ``H^-1``, which equals the OBS update with the inverse Hessian
of the remaining columns; lazy batches apply the updates to later columns as one matrix product.

Grids are either fixed before rounding (the reference's ``static_groups``; what BayesQ's searched
ranges need) or *dynamic*, the reference's default: a group's min/max range is taken from the
weights as they stand when rounding reaches the group's first column, i.e. after the updates of
all earlier lazy batches but not of earlier columns of the same batch (``find_params`` reads ``W``,
not the batch copy ``W1``).  Dynamic groups follow the column order, so they exclude act_order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..formats.base import UniformCodes
from .grid import minmax_grid


def _codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """Nearest grid code, computed in float64 like ``expected_sq_error`` so both agree on ties."""
    return np.clip(np.rint(w / np.asarray(scale, np.float64)) + zp, 0, qmax)


def _check(view, scale, zp, block) -> int:
    rows, L = view.shape
    g = -(-L // block)
    if scale.shape != (rows, g) or zp.shape != (rows, g):
        raise ValueError(f"scale/zero_point must be ({rows}, {g}), got {scale.shape} / {zp.shape}")
    return g


def round_rtn(view: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, block: int) -> UniformCodes:
    """Round every weight to its nearest grid point."""
    _check(view, scale, zp, block)
    g = np.arange(view.shape[1]) // block
    codes = _codes(np.asarray(view, np.float64), scale[:, g], zp[:, g], (1 << bits) - 1)
    return UniformCodes(codes.astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8), bits, block)


@dataclass(frozen=True, eq=False)
class GPTQFactor:
    """What GPTQ needs from ``H`` whatever the grid: computed once per site, reused per format."""

    U: np.ndarray       # upper Cholesky factor of the dampened, permuted H^-1 (L, L)
    perm: np.ndarray    # column order (act_order: decreasing diag H)
    dead: np.ndarray    # inputs with diag(H) == 0


def gptq_factor(H: np.ndarray, damp: float = 0.01, act_order: bool = False) -> GPTQFactor:
    """As the reference: inputs with ``diag(H) == 0`` never reach the output, so their weights are
    set to 0 and their diagonal to 1; ``damp * mean(diag H)`` is added to the diagonal;
    ``act_order`` quantizes columns by decreasing ``diag(H)``."""
    L = H.shape[0]
    if H.shape != (L, L):
        raise ValueError(f"H must be square, got {H.shape}")
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(L)
    H = H[np.ix_(perm, perm)]
    H[np.diag_indices(L)] += damp * np.mean(np.diag(H))
    try:
        Hinv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H, lower=True), np.eye(L))
        U = scipy.linalg.cholesky(Hinv, lower=False)
    except np.linalg.LinAlgError:
        raise ValueError("H is not positive definite after dampening; raise damp") from None
    return GPTQFactor(U, perm, dead)


def round_gptq(view: np.ndarray, H: np.ndarray | GPTQFactor, scale: np.ndarray | None, zp: np.ndarray | None,
               bits: int, block: int, damp: float = 0.01, lazy_block: int = 128,
               act_order: bool = False, round_scale=None) -> UniformCodes:
    """GPTQ rounding of ``view`` (rows, L) with ``H = X^T X`` (L, L) over the view's ``L`` axis, or
    its precomputed :func:`gptq_factor` (then ``damp`` and ``act_order`` are the factor's), onto
    the fixed grid ``(scale, zp)``, or onto dynamic min/max groups when both are ``None`` (their
    scales passed through ``round_scale``, e.g. to the float16 the format stores, before use).
    Under act_order each column keeps its own group's grid."""
    rows, L = view.shape
    dynamic = scale is None and zp is None
    if not dynamic:
        _check(view, scale, zp, block)
    f = H if isinstance(H, GPTQFactor) else gptq_factor(H, damp, act_order)
    if f.U.shape != (L, L):
        raise ValueError(f"H must be ({L}, {L}) for a view with L={L}, got {f.U.shape}")
    if dynamic and not np.array_equal(f.perm, np.arange(L)):
        raise ValueError("dynamic groups follow the column order: act_order needs a fixed grid")
    qmax = (1 << bits) - 1
    U, perm = f.U, f.perm
    # Work on W^T (one row per input index): every column update below is contiguous.
    Wt = np.array(np.asarray(view).T, np.float64)
    Wt[f.dead] = 0.0
    Wt = Wt[perm]
    if dynamic:
        scale, zp = np.empty((rows, -(-L // block)), np.float32), np.empty((rows, -(-L // block)), np.uint8)
    St, Zt = np.empty((L, rows)), np.empty((L, rows))

    codes = np.empty((L, rows), np.float64)
    for i1 in range(0, L, lazy_block):
        i2 = min(i1 + lazy_block, L)
        W1, U1 = Wt[i1:i2].copy(), U[i1:i2, i1:i2]   # Wt[i1:i2] keeps the batch-start weights
        err = np.empty((i2 - i1, rows))
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic and c % block == 0:
                g = c // block
                s, z = minmax_grid(Wt[c:c + block].T, bits, block)
                scale[:, g], zp[:, g] = (round_scale(s) if round_scale else s)[:, 0], z[:, 0]
            St[c], Zt[c] = scale[:, perm[c] // block], zp[:, perm[c] // block]
            codes[c] = _codes(W1[i], St[c], Zt[c], qmax)
            err[i] = (W1[i] - (codes[c] - Zt[c]) * St[c]) / U1[i, i]
            W1[i + 1:] -= U1[i, i + 1:, None] * err[i]
        Wt[i2:] -= U[i1:i2, i2:].T @ err

    out = np.empty((rows, L), np.uint8)
    out[:, perm] = codes.T
    return UniformCodes(out, scale.astype(np.float32), zp.astype(np.uint8), bits, block)
