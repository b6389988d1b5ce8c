"""Posterior-expected distortion of the affine uniform quantizer (docs/design.md, "Expected loss").

For ``w ~ N(mu, sigma^2)`` and ``Q(w) = (clip(round(w/s) + zp, 0, M) - zp) * s`` work in code
units: ``x = mu/s + zp``, ``k = sigma/s``.  ``Q`` is constant between the thresholds
``p_j = j + 1/2``, ``j = 0..M-1``; the outer regions extend to -inf / +inf (that is the clipping).
Summing the exact truncated-Gaussian moments of ``(c - w)^2`` over the regions telescopes to

    E = (Q(mu) - mu)^2 + sigma^2 - 2 s sigma sum_j R(|p_j - x| / k),
    R(a) = phi(a) - a Phi(-a) = E[(Z - a)^+],

so only thresholds within a few sigma of ``mu`` matter, and ``sigma = 0`` is exactly the
deterministic rounding error.  Three regimes, all within ~1e-3 relative of this exact value:

- Fewer than 5 thresholds within 6 sigma (always when sigma < step/6, and on 1- and 2-bit
  grids), or ``mu`` rounding beyond the clipping range: the sum above over those thresholds.
- 5 or more (so ``1/3 < k``) and ``k < 1``: the same sum over *all* integers' thresholds is the
  Gaussian-smoothed periodic rounding error, whose Fourier series (Poisson summation) is
  ``1/12 + sum_n (-1)^n cos(2 pi n x) exp(-2 pi^2 n^2 k^2) / (pi^2 n^2)`` (4 terms: the 5th is
  below 1e-25); the thresholds that do not exist beyond the clipping range are added back.
  Same value as the direct sum, at one cosine per weight instead of up to 13 erfc calls.
- ``k >= 1`` (sigma >= step): the Gaussian spans many cells and the rounding error is uniform on
  each up to terms of order ``exp(-2 pi^2 k^2) < 3e-9``, so inside the clipping range it is
  ``s^2/12 * P(in range)`` plus the Euler-Maclaurin boundary term ``s^2 (f'(hi) - f'(lo)) / 360``
  (f: the density in code units at the range ends); outside it the exact tail moments (mass times
  squared overshoot) are added.  Against the exact sum: worst relative error 1.5e-4 at ``k = 1``,
  falling as ``k^-4``; without the boundary term it would be 5e-3.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erfc, ndtr

from ..parallel import local_map
from .laplace import DiagonalLaplace

_Z_CUT = 6.0       # a threshold beyond 6 sigma adds R(6) < 2e-10 (relative to E: < 1e-8): dropped
_N_FOURIER = 5     # Fourier regime from 5 thresholds in reach: cheaper there, and sigma > step/3,
                   # where 4 terms are exact (the 5th: exp(-2 pi^2 25/9) / (25 pi^2) < 1e-25)
_CHUNK = 1 << 16   # elements per pass: bounds the float64 temporaries (fastest of 2^12..2^16)
_SQRT2 = 1.4142135623730951
_INV_SQRT_PI = 0.5641895835477563
_INV_SQRT_2PI = 0.3989422804014327


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _select(mask: np.ndarray) -> tuple[slice | np.ndarray, int]:
    """Where ``mask`` holds, as an index for gathers: a full slice when it holds everywhere, so
    the common single-regime chunk works on views instead of gathered copies."""
    n = np.count_nonzero(mask)
    return (slice(None) if n == mask.size else np.flatnonzero(mask)), n


def _threshold_sum(x, k, p0, step, n) -> np.ndarray:
    """``sqrt(2) * sum_{j < n} R(|p0 + j*step - x| / k)``: ``n`` consecutive thresholds from
    ``p0`` (``step`` = +-1).  With ``b = a / sqrt(2)``, ``sqrt(2) R = e^-b^2 / sqrt(pi) - b erfc(b)``."""
    out = np.zeros(x.size)
    live = np.flatnonzero(n)
    if not live.size:
        return out
    # Sorted by count (a radix sort on uint8), the elements still needing a j-th threshold are a
    # prefix, so each pass works on slices.
    n = n[live].astype(np.uint8)
    order = np.argsort(np.uint8(n.max()) - n, kind="stable")
    live, n = live[order], n[order]
    inv = 1.0 / (_SQRT2 * k[live])
    b0 = (p0[live] - x[live]) * inv
    db = step * inv
    count = live.size - np.searchsorted(n[::-1], np.arange(1, int(n[0]) + 1), side="left")
    acc = np.zeros(live.size)
    for j, c in enumerate(count):
        b = db[:c] * j
        b += b0[:c]
        np.abs(b, out=b)
        acc[:c] -= b * erfc(b)
        b *= b
        np.negative(b, out=b)
        acc[:c] += np.exp(b, out=b) * _INV_SQRT_PI
    out[live] = acc
    return out


def _esq_flat(mu, sig, s, zp, qmax: int) -> np.ndarray:
    """``E[(Q(w) - w)^2]`` on 1-D float64 arrays of equal length (see module docstring)."""
    u = mu / s
    r = np.rint(u)
    r += zp                                    # nearest code before clipping, as Q computes it
    c = np.clip(r, 0, qmax)
    x = u + zp                                 # continuous code position of mu
    out = c - zp
    out *= s
    out -= mu
    out *= out
    out += sig * sig                           # exact when no threshold is within 6 sigma
    k = sig / s
    hires = k >= 1.0
    # Thresholds within 6 sigma: from the one above code `lo`, `n` of them.
    lo = np.clip(np.rint(x - _Z_CUT * k), 0, qmax)
    n = np.clip(np.rint(x + _Z_CUT * k), 0, qmax) - lo
    n[hires] = 0
    fourier = (n >= _N_FOURIER) & (c == r)

    i, n_i = _select((n > 0) & ~fourier)
    if n_i:
        out[i] -= s[i] * sig[i] * _SQRT2 * _threshold_sum(x[i], k[i], lo[i] + 0.5, 1.0, n[i])

    i, n_i = _select(fourier)
    if n_i:
        xi, ki = x[i], k[i]
        c1 = np.cos(2 * np.pi * (xi - r[i]))  # reduced argument: cos is 3x cheaper on [-pi, pi]
        q = np.exp(-2 * np.pi**2 * ki * ki)
        cn, cprev, qn, qstep, series = c1, np.ones_like(c1), q, q * q * q, -c1 * q / np.pi**2
        for m in range(2, 5):                 # cos(2 pi m x) and q^(m^2) by recurrence
            cn, cprev = 2 * c1 * cn - cprev, cn
            qn = qn * qstep
            qstep = qstep * q * q
            series += (-1) ** m / (np.pi**2 * m * m) * cn * qn
        gone = _threshold_sum(xi, ki, np.full_like(xi, -0.5), -1.0,
                              np.maximum(np.floor(0.5 - (xi - _Z_CUT * ki)), 0))
        gone += _threshold_sum(xi, ki, np.full_like(xi, qmax + 0.5), 1.0,
                               np.maximum(np.floor(xi + _Z_CUT * ki - qmax + 0.5), 0))
        si = s[i]
        out[i] = si * si * (1.0 / 12 + series) + si * sig[i] * _SQRT2 * gone

    i, n_i = _select(hires)
    if n_i:
        xi, ki = x[i], k[i]
        y = xi - qmax                           # position relative to the top code
        al = (-0.5 - xi) / ki                   # clipping thresholds, standardised
        be = (0.5 - y) / ki
        pa, pb = _pdf(al), _pdf(be)
        fa, fb = ndtr(al), ndtr(-be)
        k2 = ki * ki
        tails = (k2 + xi * xi) * fa - ki * pa * (xi - 0.5) + (k2 + y * y) * fb + ki * pb * (y + 0.5)
        inner = (1.0 - fa - fb) / 12.0 + (al * pa - be * pb) / (360.0 * k2)
        out[i] = s[i] ** 2 * (tails + inner)
    return out


def expected_sq_error(mu, sigma2, scale, zero_point, bits: int) -> np.ndarray:
    """Elementwise ``E_{w ~ N(mu, sigma2)}[(Q(w) - w)^2]`` (float64, the broadcast shape of the
    inputs) for the ``bits``-bit affine quantizer with integer ``zero_point``."""
    args = [np.asarray(a) for a in (mu, sigma2, scale, zero_point)]
    if np.any(args[1] < 0):
        raise ValueError("sigma2 must be >= 0")
    if not np.all(args[2] > 0):
        raise ValueError("scale must be > 0")
    shape = np.broadcast_shapes(*(a.shape for a in args))
    work = shape or (1,)
    views = [np.broadcast_to(a, work) for a in args]
    out = np.empty(work, np.float64)
    per_row = int(np.prod(work[1:]))
    step = max(1, _CHUNK // max(per_row, 1))
    qmax = (1 << bits) - 1
    for r in range(0, work[0], step):   # chunks along axis 0 bound the float64 temporaries
        m, s2, sc, z = (np.array(v[r:r + step], np.float64).ravel() for v in views)
        out[r:r + step] = _esq_flat(m, np.sqrt(s2), sc, z, qmax).reshape(out[r:r + step].shape)
    return out.reshape(shape)


def expected_loss(post: DiagonalLaplace, scale, zero_point, bits: int, block: int) -> np.ndarray:
    """Whitened distortion ``sum_i precision_i E[(Q(w_i) - w_i)^2]`` per group.

    ``scale`` / ``zero_point`` are ``(..., rows, n_groups)``; leading axes (e.g. candidate grids)
    are evaluated against the same posterior.  Returns float64 ``(..., rows, n_groups)``.
    """
    qmax = (1 << bits) - 1
    return _per_group(post, scale, zero_point, block, lambda m, p, s, z: _esq_flat(m, 1.0 / np.sqrt(p), s, z, qmax))


def rounding_loss(post: DiagonalLaplace, scale, zero_point, bits: int, block: int) -> np.ndarray:
    """``expected_loss`` at sigma -> 0 less its constant ``sum sigma^2 * precision``: the
    precision-weighted rounding error of the posterior mean, ``sum_i precision_i (Q(mu_i) - mu_i)^2``
    per group (same shapes).  A few elementwise operations per weight instead of the closed form's
    dozens: a cheap screen of grids."""
    qmax = (1 << bits) - 1

    def err2(m, p, s, z):
        e = np.clip(np.rint(m / s) + z, 0, qmax)   # the code Q picks, as _esq_flat computes it
        e -= z
        e *= s
        e -= m
        return np.square(e, out=e)

    return _per_group(post, scale, zero_point, block, err2)


def _per_group(post: DiagonalLaplace, scale, zero_point, block: int, elementwise) -> np.ndarray:
    """``sum_i precision_i * elementwise(mu_i, precision_i, scale_i, zp_i)`` per group, the
    arguments flat float64 and the grids ``(..., rows, n_groups)`` broadcast over the view."""
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point)
    rows, L = post.mu.shape
    lead = scale.shape[:-2]
    starts = np.arange(0, L, block)
    if scale.shape[-2:] != (rows, starts.size) or zero_point.shape != scale.shape:
        raise ValueError(f"scale/zero_point must be (..., {rows}, {starts.size}), "
                         f"got {scale.shape} / {zero_point.shape}")
    prec = np.broadcast_to(post.precision, post.mu.shape)
    out = np.empty(scale.shape, np.float64)
    step = max(1, _CHUNK // (L * max(int(np.prod(lead)), 1)))

    def chunk(r):   # rows r..r+step: independent of the others, so on every core (local_map)
        sl = slice(r, r + step)
        shp = lead + post.mu[sl].shape
        m = np.broadcast_to(post.mu[sl], shp).astype(np.float64).ravel()
        p = np.broadcast_to(prec[sl], shp).astype(np.float64)
        sc = np.repeat(scale[..., sl, :], block, axis=-1)[..., :L].astype(np.float64).ravel()
        z = np.repeat(zero_point[..., sl, :], block, axis=-1)[..., :L].astype(np.float64).ravel()
        e = elementwise(m, p.ravel(), sc, z).reshape(shp)
        out[..., sl, :] = np.add.reduceat(e * p, starts, axis=-1)

    for _ in local_map(chunk, range(0, rows, step)):
        pass
    return out


def pruned_loss(post: DiagonalLaplace, mask: np.ndarray) -> float:
    """Whitened distortion of the weights outside ``mask`` (bool, the view's shape), set to 0: the
    error of a pruned weight is the weight itself, so its expected loss is its full posterior second
    moment, ``sum precision_i E[w_i^2] = sum precision_i (mu_i^2 + sigma_i^2)`` (float64)."""
    gone = ~np.asarray(mask, bool)
    mu = post.mu[gone].astype(np.float64)
    prec = np.broadcast_to(post.precision, post.mu.shape)[gone].astype(np.float64)
    return float((prec * np.square(mu)).sum() + gone.sum())   # precision * sigma^2 = 1 per weight
