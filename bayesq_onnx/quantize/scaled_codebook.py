"""One codebook for a whole weight, scaled per group (``formats/bayesq_scaled_lut.py``): a weight
stands for ``scale[r, g] * levels[q]``.  A per-row codebook stores ``2**bits`` fp16 levels per row
(a third of a bit per weight at 3 bits on a 384-wide row); this stores one fp16 scale per group and
the levels once, and the shape of the levels -- fitted to the whole weight's distribution -- is what
a row's own codebook mostly captures anyway (docs/design.md, "Scaled codebooks").

Fitted by alternation, both steps posterior-weighted as ``codebook.lloyd_max`` is: the levels by
Lloyd-Max on the weights divided by their group's scale (``sigma`` and the weights' importance
scaled with them), on at most ``fit_elements`` of them: whole rows drawn by importance and counted
inversely to it (:func:`_fit_rows`; 2^16 weights in rows spread evenly, 170 of MiniLM's 30522
embedding rows, fitted levels to rows that barely matter and lost accuracy, docs/design.md, "Scaled
codebooks"); then each group's scale, by a search over multiples of the current one and two
least-squares steps with the codes fixed, on the precision-weighted rounding error of the posterior
means.  Rating the scales by the posterior-expected error instead (a three-point Gauss-Hermite
rule) widened the scales of barely-seen rows -- rare embedding rows, whose posterior is the prior --
to cover mass their real weights do not have: on MiniLM at 2.56 bits the embedding then lost cosine
0.885 -> 0.867 on unseen text (docs/design.md, "Scaled codebooks").  Starts at each group's largest
magnitude.  Scales and levels are returned as stored (fp16-exact float32), so
codes assigned against ``scaled_table`` (formats/bayesq_scaled_lut.py) are the ones the runtime decodes.
"""
from __future__ import annotations

import numpy as np

from ..errors import BayesQError
from ..formats.bayesq_uniform import round_values
from . import codebook_native
from .codebook import lloyd_max
from .rounding import row_slices

_MULTIPLES = np.linspace(0.7, 1.3, 7)   # of a group's scale, searched before the least-squares steps
_LS_STEPS = 2


def _starts(L: int, block: int) -> np.ndarray:
    return np.arange(0, L, block) if block else np.zeros(1, np.int64)


def _gidx(L: int, block: int) -> np.ndarray:
    """Each column's group."""
    return np.arange(L) // block if block else np.zeros(L, np.int64)


def _group_sum(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return a.sum(axis=1, keepdims=True) if len(starts) == 1 else np.add.reduceat(a, starts, axis=1)


def _nearest(x: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Index of the nearest level: the number of thresholds below ``x`` (a tie goes to the lower
    level, as codebook_codes).  One comparison per threshold, summed in uint8: 12-29x faster than
    ``np.searchsorted`` on 4-16 levels (590k weights)."""
    q = np.zeros(x.shape, np.uint8)
    for t in thr:
        q += x > t
    return q


def _errors(mu, w, scale, levels, starts, gidx) -> np.ndarray:
    """Per group, ``sum w (mu - s c[nearest])^2`` (float64 ``(rows, G)``), a few rows at a time."""
    thr = 0.5 * (levels[1:] + levels[:-1])
    out = np.empty(scale.shape, np.float64)
    for sl in row_slices(*mu.shape):
        s = scale[sl][:, gidx].astype(np.float32)   # float32 products, float64 sums: a ranking of scales
        q = _nearest(mu[sl] / s, thr)
        out[sl] = _group_sum((w[sl] * np.square(mu[sl] - s * levels[q])).astype(np.float64), starts)
    return out


def _fit_scales(mu, w, levels, scale, block: int) -> np.ndarray:
    """Each group's scale for fixed levels: the best of a few multiples of ``scale``, then
    least-squares steps (codes fixed, the error-minimising scale ``sum w mu c / sum w c^2``), each
    kept only where it lowers the group's error.  Natively where the library is built (row by row, the
    same bits: ``custom_ops/src/scaled_codebook.cpp``; 5-6x faster on the 0.1B Llama's weights), else
    :func:`_fit_scales_numpy`."""
    lib = codebook_native.library()
    best = None if lib is None else codebook_native.fit_scales(lib, mu, w, levels, scale, block, _MULTIPLES,
                                                               _LS_STEPS)
    if best is None:
        L = mu.shape[1]
        best = _fit_scales_numpy(mu, w, levels, scale, _starts(L, block), _gidx(L, block))
    return best


def _fit_scales_numpy(mu, w, levels, scale, starts, gidx) -> np.ndarray:
    best, err = scale, _errors(mu, w, scale, levels, starts, gidx)
    for m in _MULTIPLES:
        cand = scale * m
        e = _errors(mu, w, cand, levels, starts, gidx)
        better = e < err
        best, err = np.where(better, cand, best), np.where(better, e, err)
    thr = 0.5 * (levels[1:] + levels[:-1])
    for _ in range(_LS_STEPS):
        num, den = np.zeros(best.shape), np.zeros(best.shape)
        for sl in row_slices(*mu.shape):
            c = levels[_nearest(mu[sl] / best[sl][:, gidx], thr)].astype(np.float64)
            num[sl] = _group_sum(w[sl] * mu[sl] * c, starts)
            den[sl] = _group_sum(w[sl] * c * c, starts)
        cand = np.where(den > 0, num / np.where(den > 0, den, 1.0), best)
        cand = np.where(cand > 0, cand, best)
        e = _errors(mu, w, cand, levels, starts, gidx)
        better = e < err
        best, err = np.where(better, cand, best), np.where(better, e, err)
    return best


def _fit_rows(w, amax, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows to fit the levels on and each one's multiplier: drawn systematically in proportion to
    their importance times their squared range (what a row's rounding error scales with) and counted
    inversely to it, so the fit's objective is an unbiased estimate of the whole weight's; all rows
    (multiplier 1) where there are at most ``n``."""
    rows = len(amax)
    if n >= rows:
        return np.arange(rows), np.ones(rows)
    mass = w.sum(axis=1, dtype=np.float64) * np.square(amax.max(axis=1))
    cum = np.cumsum(mass)
    if cum[-1] <= 0:
        return np.linspace(0, rows - 1, n).astype(np.int64), np.full(n, rows / n)
    fit = np.minimum(np.searchsorted(cum, (np.arange(n) + 0.5) * cum[-1] / n, side="right"), rows - 1)
    return fit, cum[-1] / n / mass[fit]


def scaled_codebook(mu, sigma, weight, levels: int, block: int = 0, *, rounds: int = 2,
                    fit_elements: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """``(levels (2**bits,), scale (rows, G))``, float32 holding fp16 values, for the ``(rows, L)``
    posterior means ``mu`` (``sigma`` and ``weight`` broadcast to them); ``block`` 0: one scale per
    row.  Deterministic."""
    mu = np.asarray(mu, np.float32)
    if mu.ndim != 2 or mu.size == 0:
        raise BayesQError(f"scaled codebook: need a non-empty (rows, L) view, got shape {mu.shape}")
    rows, L = mu.shape
    w = np.broadcast_to(np.asarray(weight, np.float32), mu.shape)
    sig = np.broadcast_to(np.asarray(sigma, np.float32), mu.shape)
    starts, gidx = _starts(L, block), _gidx(L, block)
    amax = np.maximum.reduceat(np.abs(mu), starts, axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax, 1.0)
    fit, mult = _fit_rows(w, amax, max(1, fit_elements // L))
    for _ in range(rounds):
        s = scale[fit][:, gidx]
        c = lloyd_max((mu[fit] / s).reshape(1, -1), (sig[fit] / s).reshape(1, -1),
                      (w[fit] * np.square(s) * mult[:, None]).reshape(1, -1), levels)[0]
        c = np.unique(round_values(c, "float16", "lut"))   # sorted; fp16 may merge two close levels
        c = np.pad(c, (0, levels - len(c)), mode="edge")
        scale = _fit_scales(mu, w, c, scale, block)
    return c, round_values(scale, "float16", "scales")
