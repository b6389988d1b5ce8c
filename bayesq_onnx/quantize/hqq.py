"""HQQ's half-quadratic grid fit under integer zero points: the calibration-free baseline
``--method hqq-int`` (Half-Quadratic Quantization, Badri & Shaji 2023, adapted; not the reference
HQQ, whose zero points are floats, hence the name).

HQQ fits the affine grid of each group to an lp error, ``p < 1`` (errors are treated as sparse
outliers), ``min_z ||W - (clip(rint(W/s + z)) - z) s||_p^p``, by half-quadratic splitting: an
auxiliary error ``W_e`` is shrunk by the generalized soft threshold (the lp proximal step), then
the zero point has a closed form (the mean residual), and the coupling ``beta`` grows by
``kappa`` each round.  Defaults as the reference (mobiusml/hqq ``hqq/core/optimize.py``,
``optimize_weights_proximal_legacy``): ``p = 0.7, beta = 10, kappa = 1.01, 20`` rounds, stop at
the first round that does not lower the error; the scale comes from the group's min/max.

Our formats store *integer* zero points (MatMulNBits packs b-bit zero points; a float zero point
would cost 32 bits per group).  That changes the problem: with the scale fixed, an integer zero
point only slides the window of ``2**bits`` levels along the lattice ``s * Z``, whose points do
not move, so rounding HQQ's continuous zero point (``update_scale=False``, the literal
adaptation) almost never changes the min/max grid, and never for the better in our measurements
(``tests/test_hqq.py``).  With ``update_scale=True`` (default) the half-quadratic rounds keep the
constraint instead: the zero-point step is the same closed form rounded and clipped (the exact
integer minimiser of that one-dimensional quadratic), followed by the analogous closed-form
scale step ``s = <W - W_e, W_q - z> / ||W_q - z||^2``: the scale is the continuous freedom the
integer zero point leaves.

Other differences from the reference, all deliberate:

- groups are ``block`` consecutive elements along the view's last axis (HQQ ``axis=1`` on a
  ``(out, in)`` weight; onnxruntime's ``HQQWeightOnlyQuantizer`` does the same on ``W^T``); a
  short last group is its own group (the reference requires divisibility, onnxruntime pads
  zeros that then count in the min/max and the means);
- the starting range includes 0 (``grid.minmax_grid``): an integer zero point puts 0 on the grid;
- each group stops on its own, at its first round whose lp error (the objective; the reference
  watches the mean absolute error of the whole tensor) does not improve, and returns its best
  evaluated grid (the reference returns the zero point one update past its best);
- every candidate is evaluated with the float32 scale and integer zero point that are stored, and
  the min/max grid is candidate 0, so the result is never worse than min/max in the lp error.
"""
from __future__ import annotations

import numpy as np

from ..errors import BayesQError
from .grid import minmax_grid

_CHUNK = 1 << 18   # view elements per pass: bounds the float64 temporaries (a few MB each)


def _check(view: np.ndarray, bits: int, block: int) -> np.ndarray:
    view = np.asarray(view)
    if view.ndim != 2 or not np.issubdtype(view.dtype, np.floating):
        raise BayesQError(f"HQQ needs a float (rows, L) view, got {view.dtype} {view.shape}")
    if not 1 <= bits <= 8:
        raise BayesQError(f"HQQ bits must be 1..8, got {bits}")
    if block < 1:
        raise BayesQError(f"HQQ block must be >= 1, got {block}")
    if view.size == 0:
        raise BayesQError(f"HQQ: empty view {view.shape}")
    if not np.all(np.isfinite(view)):
        raise BayesQError("HQQ: the weights contain NaN or Inf")
    return view.astype(np.float32, copy=False)


def _grouped(view: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, G, block)`` float64 groups, zero padded, and the mask of real elements."""
    rows, L = view.shape
    pad = -L % block
    w = np.pad(view.astype(np.float64), ((0, 0), (0, pad))).reshape(rows, -1, block)
    m = np.pad(np.ones((rows, L), bool), ((0, 0), (0, pad))).reshape(rows, -1, block)
    return w, m


def _dequant(w, s, z, qmax, integer=True):
    """Codes and dequantized weights: for an integer zero point exactly as ``round_rtn`` rounds
    (``rint(w/s) + z``: with round-half-even, ``rint(w/s + z)`` differs on ties when ``z`` is
    odd), for a continuous one as HQQ does."""
    q = np.clip(np.rint(w / s) + z if integer else np.rint(w / s + z), 0, qmax)
    return q, (q - z) * s


def _lp(err, m, p) -> np.ndarray:
    return np.sum(np.abs(err) ** p * m, axis=-1)


def _shrink(x, beta, p):
    """Generalized soft threshold, the lp proximal step of HQQ: ``sign(x) relu(|x| - |x|^(p-1)/beta)``
    (``x = 0`` stays 0: its threshold is infinite)."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        t = a - a ** (p - 1) / beta
    return np.sign(x) * np.maximum(t, 0.0)


def hqq_objective(view, scale, zero_point, bits: int, block: int, p: float = 0.7) -> np.ndarray:
    """HQQ's objective per group: ``sum |w - Q(w)|^p`` over the group's elements, float64
    ``(rows, n_groups)``; ``Q`` as ``rounding.round_rtn`` rounds onto the stored grid."""
    view = _check(view, bits, block)
    w, m = _grouped(view, block)
    s = np.asarray(scale, np.float32).astype(np.float64)[..., None]
    z = np.asarray(zero_point).astype(np.float64)[..., None]
    if s.shape[:2] != w.shape[:2] or z.shape != s.shape:
        raise BayesQError(f"scale/zero_point must be {w.shape[:2]}, got {np.shape(scale)} / {np.shape(zero_point)}")
    _, r = _dequant(w, s, z, (1 << bits) - 1)
    return _lp(w - r, m, p)


def _hqq_rows(view, bits, block, iters, p, beta, kappa, update_scale, early_stop):
    qmax = (1 << bits) - 1
    w, m = _grouped(view, block)
    n = m.sum(axis=-1, keepdims=True)
    s0, z0 = minmax_grid(view, bits, block)
    s0 = s0.astype(np.float64)[..., None]
    z0 = z0.astype(np.float64)[..., None]
    s, z = s0, z0
    q, r = _dequant(w, s, z, qmax)
    base = best = _lp(w - r, m, p)[..., None]
    best_s, best_z = s0, z0
    active = np.ones(best.shape, bool)
    for _ in range(iters):
        target = w - _shrink(w - r, beta, p) * m        # W - W_e: the weights the grid should fit
        z = np.sum((q - target / s) * m, axis=-1, keepdims=True) / n
        if update_scale:
            z = np.clip(np.rint(z), 0, qmax)
            d = (q - z) * m
            den = np.sum(d * d, axis=-1, keepdims=True)
            num = np.sum(target * d, axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                new = (num / den).astype(np.float32).astype(np.float64)   # the stored precision
            # den == 0: every code sits on the zero point (an all-zero group); keep the scale
            s = np.where((den > 0) & (new > 0) & np.isfinite(new), new, s)
        beta *= kappa
        q, r = _dequant(w, s, z, qmax, integer=update_scale)
        err = _lp(w - r, m, p)[..., None]
        better = active & (err < best)
        best = np.where(better, err, best)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
        if early_stop:
            active = better                              # a group stops at its first non-improving round
            if not active.any():
                break
    if not update_scale:
        # The literal adaptation: round the best continuous zero point; keep it only if the real
        # (integer) grid beats min/max, which wins ties.
        zi = np.clip(np.rint(best_z), 0, qmax)
        _, r = _dequant(w, best_s, zi, qmax)
        err = _lp(w - r, m, p)[..., None]
        best_z = np.where(err < base, zi, z0)
    return best_s[..., 0].astype(np.float32), best_z[..., 0].astype(np.uint8)


def hqq_grid(view, bits: int, block: int, *, iters: int = 20, p: float = 0.7, beta: float = 10.0,
             kappa: float = 1.01, update_scale: bool = True, early_stop: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
    """HQQ grid of a ``(rows, L)`` view: ``(scale float32, zero_point uint8)``, each
    ``(rows, n_groups)``, zero points in ``[0, 2**bits)``; codes by ``rounding.round_rtn``.

    ``beta`` is in the units of the weights (as the reference): the shrink step treats an error
    as an outlier only above ``beta ** (-1 / (2 - p))`` (0.17 with the defaults), so on weights of
    typical LLM size (|w| ~ 0.02) no error is shrunk and each round is a least-squares fit.
    Never worse than ``minmax_grid`` in :func:`hqq_objective` with the same ``p``."""
    view = _check(view, bits, block)
    if iters < 0:
        raise BayesQError(f"HQQ iters must be >= 0, got {iters}")
    if not 0 < p <= 1:
        raise BayesQError(f"HQQ p must be in (0, 1] (the lp shrink step), got {p}")
    if not (beta > 0 and kappa >= 1):
        raise BayesQError(f"HQQ needs beta > 0 and kappa >= 1, got {beta}, {kappa}")
    rows, L = view.shape
    step = max(1, _CHUNK // (L + block))
    parts = [_hqq_rows(view[r:r + step], bits, block, iters, p, float(beta), float(kappa),
                       update_scale, early_stop) for r in range(0, rows, step)]
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
