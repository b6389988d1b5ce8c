"""Posterior-weighted Lloyd-Max codebooks for the LUT formats (docs/design.md, "Codebooks").

Each weight is a Gaussian ``w_i ~ N(mu_i, sigma_i^2)`` with importance ``weight_i`` (the posterior
precision ``h_i + lambda``).  A group's codebook ``c_0 <= ... <= c_{K-1}`` is chosen to minimise

    J(c) = sum_i weight_i E[(Q(w_i) - w_i)^2],   Q = nearest level,

the same functional ``posterior/expected_loss.py`` evaluates for affine grids (Q applied to the
random weight), so LUT and uniform candidates are compared on one scale by the planner.

E-step: exact.  The partition is the Voronoi partition of the levels (thresholds ``t_j``, the
midpoints); every Gaussian spreads its mass over the cells it reaches, with truncated-Gaussian
moments.  Assigning each weight by its mean instead (``Q(mu_i)``) would minimise
``sum weight_i ((c - mu_i)^2 + sigma_i^2)``, in which sigma is a constant: the codebook would ignore
the posterior width, and its loss would not be the quantity the uniform grids are measured by.
M-step: the exact centroid for that E-step, ``c_k = sum_i weight_i E[w_i 1{w_i in cell k}] /
sum_i weight_i P(w_i in cell k)``: the Lloyd centroid of the weighted mixture of Gaussians.  Both
steps minimise ``J`` over one argument with the other fixed, so ``J`` never increases.

Per weight, with ``a_j = |t_j - mu| / sigma`` and ``R(a) = phi(a) - a Phi(-a) = E[(Z - a)^+]``:

    E[(Q(w) - w)^2] = (Q(mu) - mu)^2 + sigma^2 - 2 sigma sum_j (c_{j+1} - c_j) R(a_j)

(crossing ``t_j`` away from ``mu`` changes the squared error by ``2 (c_{j+1} - c_j) (t_j - w)``;
``expected_loss.py``'s formula is the uniform case).  Thresholds beyond 6 sigma are dropped
(``R(6) < 2e-10``); sigma = 0 gives the deterministic rounding error exactly.

Start: Lloyd only finds a local minimum, and on small groups with many levels it stays far from
the best (2-5x the optimal loss with 16 levels on 64 weights, measured from the uniform or quantile
starts).  The default start is therefore the sigma -> 0 optimum, weighted 1-D k-means of the means
by dynamic programming over contiguous cells (exact up to 64 weights per group, 128 above 8 levels;
larger groups are cut into that many runs first), or the uniform min/max levels where those have the lower expected loss:
with sigma > 0 Lloyd refines it, and it is never worse than the uniform format.

Layout: ``mu`` is ``(..., L)``; groups are ``block`` consecutive elements of the last axis (the
last group of a row may be short; ``block=None``: one group per row).  Codebooks are
``(G, levels)`` with ``G = rows * ceil(L / block)`` in row-major order (group ``j`` of row ``r``
is ``r * ceil(L / block) + j``).

Native path: where ``libbayesq_ops.so`` is built, :func:`lloyd_max` and
:func:`expected_codebook_loss` hand each prepared chunk to the same algorithm in C++
(``codebook_native``, ``custom_ops/src/codebook.cpp``); the numpy code here is the reference and
the fallback, and ``BAYESQ_CODEBOOK=numpy`` forces it.
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from ..errors import BayesQError
from ..parallel import local_map
from . import codebook_native
from .grid import minmax_grid
from .rounding import GPTQFactor, LevelColumns, error_feedback, gptq_factor

_Z_CUT = 6.0          # thresholds beyond 6 sigma: R(6) < 2e-10 relative to sigma^2, dropped
# Lloyd's rounds cut at 4 sigma: R(4) < 1e-5, so a level moves by ~1e-5 of sigma less than it
# would; measured on SmolLM-like rows (768-2048 weights, 4-16 levels) the final loss is within
# 0.02% of the 6-sigma rounds' while each E-step walks a third fewer thresholds.  Every loss
# reported (expected_codebook_loss) keeps the 6-sigma cut.
_Z_LLOYD = 4.0
_CHUNK = 1 << 20      # element-levels per pass: bounds the (element, threshold) pairs
_INV_SQRT_2PI = 0.3989422804014327


# ---------------------------------------------------------------------------------------------
# layout

def _rows(mu, block) -> tuple[np.ndarray, int, int]:
    mu = np.asarray(mu)
    if mu.ndim < 1 or mu.size == 0:
        raise BayesQError(f"codebook: need a non-empty array of weights, got shape {mu.shape}")
    L = mu.shape[-1]
    block = L if block is None else int(block)
    if block < 1:
        raise BayesQError(f"codebook block must be >= 1, got {block}")
    return mu.reshape(-1, L), L, block


def _grouped(x, rows_shape, L, block, fill=0.0) -> np.ndarray:
    """``(rows, L)`` -> ``(G, block)`` float64, the short last group padded with ``fill``."""
    x = np.broadcast_to(np.asarray(x, np.float64), rows_shape)
    pad = -L % block
    if pad:
        x = np.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return np.ascontiguousarray(x).reshape(-1, block)


def _ungroup(x, rows, L, block) -> np.ndarray:
    return x.reshape(rows, -1)[:, :L]


def _checked(mu, sigma, weight, block) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``mu`` as rows ``(rows, L)``, ``sigma`` and ``weight`` broadcast to them (views), ``L`` and the
    block, after checking shapes and values (each array in its own shape: nothing is copied)."""
    mu2, L, block = _rows(mu, block)
    rows, shape = mu2.shape[0], np.shape(mu)
    for name, a in (("sigma", sigma), ("weight", weight)):
        try:
            ok = np.broadcast_shapes(np.shape(a), shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise BayesQError(f"codebook: {name} shape {np.shape(a)} does not broadcast to {shape}")
    sigma, weight = np.asarray(sigma), np.asarray(weight)
    if not (np.all(np.isfinite(mu2)) and np.all(np.isfinite(sigma)) and np.all(np.isfinite(weight))):
        raise BayesQError("codebook: mu, sigma and weight must be finite")
    if np.any(sigma < 0) or np.any(weight < 0):
        raise BayesQError("codebook: sigma and weight must be >= 0")
    return (mu2, np.broadcast_to(sigma, shape).reshape(rows, L), np.broadcast_to(weight, shape).reshape(rows, L),
            L, block)


def _prepared_chunks(mu, sigma, weight, block, levels):
    """Grouped, padded float64 ``mu, sigma, weight`` (pads get weight 0) a few whole rows at a time
    (groups never span rows), about ``_CHUNK`` element-levels each: yields each chunk's slice of the
    groups, its three arrays ``(g, block)`` and the mask of real (not padding) entries.  The whole
    matrix grouped would be three float64 copies of it and a mask: 0.8 GB for a 32000 x 768 head."""
    mu2, sig, w, L, blk = _checked(mu, sigma, weight, block)
    ng = -(-L // blk)
    step = max(1, _CHUNK // (ng * blk * levels))
    for r in range(0, mu2.shape[0], step):
        shape = (min(step, mu2.shape[0] - r), L)
        yield (slice(r * ng, (r + shape[0]) * ng), *(_grouped(x[r:r + step], shape, L, blk) for x in (mu2, sig, w)),
               _grouped(np.ones(shape), shape, L, blk) > 0)


def _n_groups(mu, block) -> int:
    mu2, L, blk = _rows(mu, block)
    return mu2.shape[0] * -(-L // blk)


def _check_codebook(codebook, G: int, sort: bool = False) -> np.ndarray:
    """The levels as stored (float32), as float64 ``(G, K)``; sorted on request, else required
    sorted (codes index the levels in order)."""
    c = np.asarray(codebook)
    if c.ndim != 2 or c.shape[0] != G or not 1 <= c.shape[1] <= 256:
        raise BayesQError(f"codebook must be ({G}, levels) with 1..256 levels, got {c.shape}")
    c = c.astype(np.float32)
    if not np.all(np.isfinite(c)):
        raise BayesQError("codebook levels must be finite")
    if sort:
        c = np.sort(c, axis=1)
    elif np.any(np.diff(c, axis=1) < 0):
        raise BayesQError("codebook levels must be sorted in increasing order within each group")
    return c.astype(np.float64)


def _chunks(G: int, width: int, levels: int):
    step = max(1, _CHUNK // max(width * levels, 1))
    for g in range(0, G, step):
        yield slice(g, g + step)


# ---------------------------------------------------------------------------------------------
# the exact E-step

def _nearest(mu, thr) -> np.ndarray:
    """Index of the nearest level: the number of the group's thresholds below ``mu`` (a tie goes
    to the lower level), by binary lifting over the sorted thresholds (padded with +inf to
    ``2**b - 1``): ``b = ceil(log2 K)`` gathers instead of ``K - 1`` comparisons."""
    g, k1 = thr.shape
    b = k1.bit_length()
    padded = np.full((g, (1 << b) - 1), np.inf)
    padded[:, :k1] = thr
    flat = padded.ravel()
    idx = np.repeat(np.arange(g) * padded.shape[1], mu.shape[1]).reshape(mu.shape)
    start = idx.copy()
    for step in (1 << np.arange(b - 1, -1, -1)):
        idx += step * (flat[idx + (step - 1)] < mu)
    return idx - start


def _estep(mu, sig, w, c, stats: bool, z_cut: float = _Z_CUT):
    """Per-element ``E[(Q(w) - w)^2]`` (G, B) and, with ``stats``, the cell masses ``A`` and
    first moments ``B`` (G, K) summed with ``weight``: the centroid is ``B / A``.  Thresholds
    beyond ``z_cut`` sigma are dropped."""
    g, K = c.shape
    thr = 0.5 * (c[:, 1:] + c[:, :-1])
    near = _nearest(mu, thr)
    cf, tf = c.ravel(), thr.ravel()
    gidx = np.arange(g)[:, None]
    cell = (gidx * K + near).ravel()
    d = cf[cell] - mu.ravel()
    loss = d * d + (sig * sig).ravel()
    if stats:
        A = np.bincount(cell, w.ravel(), g * K)
        Bm = np.bincount(cell, (w * mu).ravel(), g * K)
    if K > 1:
        # Only elements whose own cell ends within z_cut sigma of mu reach any threshold: find
        # them with the two thresholds bounding that cell, then walk outwards from there.
        reach = (z_cut * sig).ravel()
        nf, mf = near.ravel(), mu.ravel()
        row = np.repeat(np.arange(g) * (K - 1), mu.shape[1])
        below = tf[row + np.maximum(nf - 1, 0)]
        above = tf[row + np.minimum(nf, K - 2)]
        live = np.flatnonzero(((nf > 0) & (mf - below < reach)) | ((nf < K - 1) & (above - mf < reach)))
    else:
        live = np.zeros(0, np.intp)
    if live.size:
        mu0, s0, w0, n0 = mf[live], sig.ravel()[live], w.ravel()[live], nf[live]
        acc = np.zeros(live.size)
        # thresholds padded with -inf / +inf at each group's ends, and the level gap across each
        # (0 at the pads): a walk stops at a pad by itself (a = inf), whichever its length
        tp = np.empty((g, K + 1))
        tp[:, 0], tp[:, 1:K], tp[:, K] = -np.inf, thr, np.inf
        gap = np.zeros((g, K + 1))
        gap[:, 1:K] = c[:, 1:] - c[:, :-1]
        tpf, gapf = tp.ravel(), gap.ravel()
        if stats:
            flow = np.zeros(g * (K + 1))     # weight moved up across each threshold (net)
            flow_m = np.zeros(g * (K + 1))   # and its first moment
        base = np.repeat(np.arange(g) * (K + 1), mu.shape[1])[live] + n0
        for up in (True, False):
            pos, ms, ss, ws = np.arange(live.size), mu0, s0, w0
            # padded index of the first threshold beyond mu's cell (step k adds +k up, -k down)
            tj = base + 1 if up else base
            for _ in range(K - 1):
                tk = tpf[tj]
                a = (tk - ms) / ss if up else (ms - tk) / ss
                ok = a < z_cut
                if not ok.all():
                    # keep the elements still walking (index + take: cheaper than boolean masks)
                    keep = np.flatnonzero(ok)
                    if not keep.size:
                        break
                    pos, ms, ss, ws, tj, a = (x[keep] for x in (pos, ms, ss, ws, tj, a))
                tail = ndtr(-a)                         # mass beyond t, away from mu
                dens = np.exp(-0.5 * a * a) * _INV_SQRT_2PI
                acc[pos] += gapf[tj] * (dens - a * tail)
                if stats:
                    # the cell beyond t gains the mass (and E[w 1{beyond t}]), the one on mu's side loses it
                    mom = ws * (ms * tail + (ss if up else -ss) * dens)
                    flow += np.bincount(tj, ws * tail if up else -ws * tail, flow.size)
                    flow_m += np.bincount(tj, mom if up else -mom, flow.size)
                tj = tj + 1 if up else tj - 1
        loss[live] -= 2.0 * s0 * acc
        if stats:
            A, Bm = A.reshape(g, K), Bm.reshape(g, K)
            for tot, f in ((A, flow), (Bm, flow_m)):
                f = f.reshape(g, K + 1)[:, 1:K]       # threshold j: from cell j to cell j + 1
                tot[:, 1:] += f
                tot[:, :-1] -= f
    # round-off can leave a hair below 0 where sigma dominates and the terms cancel
    loss = np.maximum(loss, 0.0).reshape(mu.shape)
    if stats:
        return loss, A.reshape(g, K), Bm.reshape(g, K)
    return loss


def expected_codebook_loss(mu, sigma, weight, codebook, *, block: int | None = None) -> np.ndarray:
    """Closed-form ``sum_i weight_i E[(Q(w_i) - w_i)^2]`` per group, float64 ``(G,)``, for
    ``w_i ~ N(mu_i, sigma_i^2)`` and ``Q`` the nearest level of the group's codebook (as stored:
    float32, sorted).  ``sigma`` and ``weight`` broadcast to ``mu``."""
    c = _check_codebook(codebook, _n_groups(mu, block))
    out = np.empty(c.shape[0])
    lib = codebook_native.library()

    def chunk(args):
        sl, m, s, w, _ = args
        if lib is not None:
            return sl, codebook_native.loss(lib, m, s, w, c[sl], _Z_CUT)
        return sl, np.sum(_estep(m, s, w, c[sl], stats=False) * w, axis=1)

    for sl, loss in local_map(chunk, _prepared_chunks(mu, sigma, weight, block, c.shape[1])):
        out[sl] = loss
    return out


# ---------------------------------------------------------------------------------------------
# initialisation

def _sorted_live(mu, w, valid):
    """Each group's entries sorted by ``mu``, those with weight first: ``x, v (g, B)`` (the rest
    repeat the largest live value with weight 0), the live count, and the first-occurrence mask
    of the distinct live values.  A group without any weight counts its entries equally."""
    g, B = mu.shape
    w = np.where(valid, w, 0.0)
    none = w.sum(axis=1) <= 0
    w = np.where(none[:, None] & valid, 1.0, w)
    live = w > 0
    key = np.where(live, mu, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    x = np.take_along_axis(key, order, axis=1)
    v = np.take_along_axis(w, order, axis=1)
    n_live = live.sum(axis=1)
    last = x[np.arange(g), n_live - 1]
    x = np.where(np.isfinite(x), x, last[:, None])
    first = np.ones((g, B), bool)
    first[:, 1:] = x[:, 1:] != x[:, :-1]
    first &= np.arange(B)[None, :] < n_live[:, None]
    return x, v, n_live, first


def _exact_levels(x, n_live, first, K) -> np.ndarray:
    """Groups with at most ``K`` distinct values: exactly those, the largest repeated."""
    rank = np.cumsum(first, axis=1) - 1
    lv = np.repeat(x[np.arange(x.shape[0]), n_live - 1][:, None], K, axis=1)
    r, col = np.nonzero(first)
    lv[r, rank[r, col]] = x[r, col]
    return lv


def _quantile_levels(x, v, K) -> np.ndarray:
    """Weighted quantiles ``(k + 1/2) / K`` of the sorted values."""
    cum = np.cumsum(v, axis=1)
    cum /= cum[:, -1:]
    q = (np.arange(K) + 0.5) / K
    idx = np.minimum(np.sum(cum[:, None, :] < q[None, :, None], axis=-1), x.shape[1] - 1)
    return np.take_along_axis(x, idx, axis=1)


# the k-means DP works on at most this many runs of sorted values per group (up to 8 levels, and
# above): it costs O(levels runs^2); with 64 runs, 4-8 levels end within 0.05% of 128 runs' loss
# after the Lloyd rounds (measured on Llama-shaped rows of 256-2048 weights) at a quarter of the
# cost, while 16 levels on 64 runs start over 1% above the exact DP
_DP_BINS = 64
_DP_BINS_MANY = 128
def _dp_bins(K: int) -> int:
    return _DP_BINS if K <= 8 else _DP_BINS_MANY


_DP_MAX_LEVELS = 32   # above this many levels the start is quantiles (the DP costs O(K bins^2))
_DP_CELLS = 1 << 19   # DP matrix entries per pass: bounds its temporaries


def _run_bounds(x, n_live, M):
    """Cut each group's ``n_live`` sorted values into at most ``M`` runs: ``M/2`` of equal count
    (resolution where the values are dense) merged with ``M/2`` of equal width (outliers, where
    the optimal levels sit alone, get runs of their own).  Returns the boundaries ``(g, M + 1)``
    (``0 ... n_live``, the tail repeating ``n_live``) and the number of runs."""
    g, B = x.shape
    h = M // 2
    m = np.arange(h + 1)[None, :]
    nl = n_live[:, None]
    by_count = np.where(nl <= h, np.minimum(m, nl), (m * nl) // h)
    lo, hi = x[:, :1], x[np.arange(g), n_live - 1][:, None]
    cuts = lo + (hi - lo) * (m / h)
    # entries below each cut, by binary lifting over the sorted values (those past n_live are +inf)
    b = B.bit_length()
    padded = np.full((g, (1 << b) - 1), np.inf)
    padded[:, :B] = np.where(np.arange(B)[None, :] < nl, x, np.inf)
    flat = padded.ravel()
    idx = np.repeat((np.arange(g) * padded.shape[1])[:, None], h + 1, axis=1)
    start = idx.copy()
    for step in (1 << np.arange(b - 1, -1, -1)):
        idx += step * (flat[idx + (step - 1)] < cuts)
    by_width = idx - start
    by_width[:, -1] = n_live
    both = np.sort(np.concatenate([by_count, by_width], axis=1), axis=1)
    dup = np.zeros(both.shape, bool)
    dup[:, 1:] = both[:, 1:] == both[:, :-1]
    both = np.sort(np.where(dup, np.iinfo(np.intp).max, both), axis=1)[:, :M + 1]
    runs = np.sum(both < np.iinfo(np.intp).max, axis=1) - 1
    return np.minimum(both, nl), runs


def _kmeans_levels(x, v, n_live, K) -> np.ndarray:
    """Weighted 1-D k-means of the sorted values (the sigma -> 0 problem) by dynamic programming
    over contiguous cells: ``D_k(i) = min_j D_{k-1}(j) + cost(j, i)``, ``cost`` the weighted squared
    deviation of entries ``j..i-1`` from their mean (prefix sums), read at ``i = n_live``.
    Exact for groups of at most 64 live entries (128 above 8 levels); larger groups are cut into that many
    runs (:func:`_run_bounds`) whose boundaries are the only cell boundaries allowed (then Lloyd
    moves them).  ``O(K bins^2)`` per group."""
    g, B = x.shape
    M = min(B, _dp_bins(K))
    out = np.empty((g, K))
    step = max(1, _DP_CELLS // (M + 1) ** 2)
    none_cell = np.arange(M + 1)[:, None] <= np.arange(M + 1)[None, :]     # [i, j]: j >= i
    for s in range(0, g, step):
        xs, vs, nl = x[s:s + step], v[s:s + step], n_live[s:s + step].astype(np.intp)
        vs = vs / vs.max(axis=1, keepdims=True)          # the optimum ignores the weights' scale
        n = xs.shape[0]
        mean = np.sum(xs * vs, axis=1, keepdims=True) / np.sum(vs, axis=1, keepdims=True)
        xc = xs - mean                                    # centred: prefix sums lose less
        zero = np.zeros((n, 1))
        P0 = np.concatenate([zero, np.cumsum(vs, axis=1)], axis=1)
        P1 = np.concatenate([zero, np.cumsum(vs * xc, axis=1)], axis=1)
        P2 = np.concatenate([zero, np.cumsum(vs * xc * xc, axis=1)], axis=1)
        if M < B:
            bnd, nl = _run_bounds(xs, nl, M)
            P0, P1, P2 = (np.take_along_axis(P, bnd, axis=1) for P in (P0, P1, P2))
        # cost(j, i) = P2[i] - P2[j] - gain[i, j], gain = (P1[i] - P1[j])^2 / (P0[i] - P0[j]);
        # so D_k(i) = P2[i] + min_j (D_{k-1}(j) - P2[j] - gain[i, j]).  j >= i is no cell
        # (gain -inf); a cell of weight 0 (past n_live, never read at n_live) has gain 0.
        gain = P1[:, :, None] - P1[:, None, :]
        gain *= gain
        d0 = P0[:, :, None] - P0[:, None, :]
        gain /= np.where(d0 > 0, d0, 1.0)
        np.copyto(gain, -np.inf, where=none_cell)
        D = P2 - gain[:, :, 0]                            # one cell: cost(0, i)
        args = np.zeros((K - 1, n, M + 1), np.intp)
        for k in range(1, K):
            # cell k ends at i after k nonempty cells and before K - 1 - k more: j in [k, i),
            # i in [k + 1, M - (K - 1 - k)] for every group (n_live <= M); the rest stays +inf
            hi = M - (K - 1 - k)
            Mk = (D - P2)[:, None, k:hi] - gain[:, k + 1:hi + 1, k:hi]
            a = np.argmin(Mk, axis=2)
            args[k - 1, :, k + 1:hi + 1] = a + k
            Dn = np.full_like(D, np.inf)
            Dn[:, k + 1:hi + 1] = np.take_along_axis(Mk, a[:, :, None], axis=2)[:, :, 0] + P2[:, k + 1:hi + 1]
            D = Dn
        bounds = np.empty((n, K + 1), np.intp)
        i = nl
        bounds[:, K] = i
        r = np.arange(n)
        for k in range(K - 1, 0, -1):
            i = args[k - 1, r, i]
            bounds[:, k] = i
        bounds[:, 0] = 0
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        s0 = np.take_along_axis(P0, hi, axis=1) - np.take_along_axis(P0, lo, axis=1)
        s1 = np.take_along_axis(P1, hi, axis=1) - np.take_along_axis(P1, lo, axis=1)
        out[s:s + step] = s1 / s0 + mean
    return out


def _lloyd_sorted(x, v, c, rounds) -> np.ndarray:
    """Lloyd at sigma = 0 on sorted values ``x`` with weights ``v``: each cell is a run of the
    sorted values, so a round costs ``O(K log B)`` per group (prefix sums and a binary search
    per threshold) instead of a pass over the weights.  Stops per group at a fixed point."""
    g, B = x.shape
    K = c.shape[1]
    if K == 1 or rounds <= 0:
        return c
    zero = np.zeros((g, 1))
    P0 = np.concatenate([zero, np.cumsum(v, axis=1)], axis=1)
    P1 = np.concatenate([zero, np.cumsum(v * x, axis=1)], axis=1)
    b = B.bit_length()
    padded = np.full((g, (1 << b) - 1), np.inf)
    padded[:, :B] = x
    flat = padded.ravel()
    base = (np.arange(g) * padded.shape[1])[:, None]
    active = np.arange(g)
    for _ in range(rounds):
        ca = c[active]
        thr = 0.5 * (ca[:, 1:] + ca[:, :-1])
        # entries <= t_j belong to levels <= j (a tie goes down): count them by binary lifting
        idx = np.repeat(base[active], K - 1, axis=1)
        start = idx.copy()
        for step in (1 << np.arange(b - 1, -1, -1)):
            idx += step * (flat[idx + (step - 1)] <= thr)
        cut = np.concatenate([np.zeros((active.size, 1), np.intp), idx - start,
                              np.full((active.size, 1), B)], axis=1)
        A = np.diff(np.take_along_axis(P0[active], cut, axis=1), axis=1)
        S = np.diff(np.take_along_axis(P1[active], cut, axis=1), axis=1)
        ok = A > 0
        new = np.where(ok, S / np.where(ok, A, 1.0), ca)
        lo = np.concatenate([np.full((active.size, 1), -np.inf), thr], axis=1)
        hi = np.concatenate([thr, np.full((active.size, 1), np.inf)], axis=1)
        new = np.sort(np.clip(new, lo, hi).astype(np.float32), axis=1).astype(np.float64)
        moved = np.any(new != ca, axis=1)
        c[active] = new
        active = active[moved]
        if not active.size:
            break
    return c


_KMEANS_ROUNDS = 200   # sigma = 0 Lloyd rounds after a quantile / k-means start (cheap: O(K log B))


def _start_levels(mu, w, valid, K, how) -> np.ndarray:
    """``"quantile"`` or ``"kmeans"`` start ``(g, K)``, float32-valued, then Lloyd at sigma = 0
    to a fixed point (a no-op after the exact k-means).  Groups with at most ``K`` distinct
    values get exactly those either way (loss 0 at sigma = 0)."""
    x, v, n_live, first = _sorted_live(mu, w, valid)
    few = first.sum(axis=1) <= K
    lv = np.empty((mu.shape[0], K))
    if few.any():
        lv[few] = _exact_levels(x[few], n_live[few], first[few], K)
    rest = ~few
    if rest.any():
        lv[rest] = (_kmeans_levels(x[rest], v[rest], n_live[rest], K) if how == "kmeans"
                    else _quantile_levels(x[rest], v[rest], K))
    lv = np.sort(lv.astype(np.float32), axis=1).astype(np.float64)
    return _lloyd_sorted(x, v, lv, _KMEANS_ROUNDS)


def _minmax_levels(mu2, K, block) -> np.ndarray:
    """The levels of ``grid.minmax_grid`` at ``log2(K)`` bits, ``(G, K)``: the uniform format's
    own grid, so Lloyd started there never ends above that format's loss."""
    scale, zp = minmax_grid(np.asarray(mu2, np.float32), K.bit_length() - 1, block)
    lv = (np.arange(K, dtype=np.float32) - zp[..., None].astype(np.float32)) * scale[..., None]
    return lv.reshape(-1, K).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Lloyd-Max

def _lloyd_chunk(mu, sig, w, c, iters, tol, alt=None):
    """Lloyd rounds on one chunk of groups.  A group stops once a round lowers its loss by no
    more than ``tol`` of it (or no level moves), so its result does not depend on the groups it
    is batched with.  ``alt``: a second start; the first round's E-step rates both and each group
    goes on from the one with the lower loss (ties keep ``c``)."""
    c = np.sort(c.astype(np.float32), axis=1).astype(np.float64)
    active = np.ones(c.shape[0], bool)
    prev = np.full(c.shape[0], np.inf)
    for r in range(max(iters, int(alt is not None))):
        a = np.flatnonzero(active)
        if not a.size:
            break
        ca = c[a]
        loss, A, Bm = _estep(mu[a], sig[a], w[a], ca, stats=True, z_cut=_Z_LLOYD)
        J = np.sum(loss * w[a], axis=1)                 # the loss of the levels being updated
        if r == 0 and alt is not None:
            cb = np.sort(alt.astype(np.float32), axis=1).astype(np.float64)   # every group is active
            loss_b, A_b, B_b = _estep(mu, sig, w, cb, stats=True, z_cut=_Z_LLOYD)
            J_b = np.sum(loss_b * w, axis=1)
            b = J_b < J
            ca[b], A[b], Bm[b], J[b] = cb[b], A_b[b], B_b[b], J_b[b]
            c[b] = cb[b]
            if r >= iters:
                break
        total = A.sum(axis=1, keepdims=True)
        # a cell with (almost) no mass keeps its level: the loss does not depend on it
        ok = A > 1e-12 * total
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.where(ok, Bm / np.where(ok, A, 1.0), ca)
        # the centroid lies in its (closed) cell; clamp round-off so the order is kept
        thr = 0.5 * (ca[:, 1:] + ca[:, :-1])
        lo = np.concatenate([np.full((a.size, 1), -np.inf), thr], axis=1)
        hi = np.concatenate([thr, np.full((a.size, 1), np.inf)], axis=1)
        new = np.sort(np.clip(new, lo, hi).astype(np.float32), axis=1).astype(np.float64)
        c[a] = new
        active[a] = (prev[a] - J > tol * J) & np.any(new != ca, axis=1)
        prev[a] = J
    return c


def lloyd_max(mu, sigma, weight, levels: int, *, block: int | None = None, iters: int = 25,
              init: str | np.ndarray = "auto", tol: float = 1e-3) -> np.ndarray:
    """Posterior-weighted Lloyd-Max codebook per group: float32 ``(G, levels)``, sorted (the
    nearest level of each ``mu``: :func:`codebook_codes`, once the levels are stored as the
    format stores them).

    ``sigma`` (posterior std, 0 allowed) and ``weight`` (importance, >= 0: the precision)
    broadcast to ``mu``.  ``init`` (all deterministic):

    - ``"kmeans"``: weighted k-means of the means by dynamic programming (the sigma -> 0
      optimum, exact for groups of at most 64 weights, 128 above 8 levels; at most 32 levels);
    - ``"quantile"``: weighted quantiles ``(k + 1/2) / levels`` of the means;
    - ``"minmax"``: the levels of ``grid.minmax_grid`` (``levels`` a power of two);
    - ``"auto"`` (default): per group, whichever of kmeans (quantile above 32 levels) and
      minmax has the lower expected loss;
    - a ``(G, levels)`` array.

    kmeans and quantile starts are polished by Lloyd at sigma = 0 (cheap, on sorted values), and
    a group with at most ``levels`` distinct means starts at exactly those.  Then at most
    ``iters`` exact Lloyd rounds; a group stops after the round that lowered its loss by no more
    than ``tol`` of it.  Lloyd never raises the loss, so with ``"minmax"`` and ``"auto"`` the
    result is never worse than the uniform min/max format of the same bits, and at sigma = 0
    with groups of at most 64 weights (128 above 8 levels) ``"kmeans"`` and ``"auto"`` are optimal.
    """
    if not 1 <= int(levels) <= 256:
        raise BayesQError(f"codebook levels must be 1..256 (uint8 codes), got {levels}")
    if iters < 0 or not tol >= 0:
        raise BayesQError(f"codebook needs iters >= 0 and tol >= 0, got {iters}, {tol}")
    K = int(levels)
    pow2 = K >= 2 and K & (K - 1) == 0
    mu2, _, _, _, blk = _checked(mu, sigma, weight, block)
    G = _n_groups(mu, block)
    if isinstance(init, str):
        if init not in ("auto", "kmeans", "quantile", "minmax"):
            raise BayesQError("codebook init must be 'auto', 'kmeans', 'quantile', 'minmax' or "
                              f"an array, got {init!r}")
        if init == "minmax" and not pow2:
            raise BayesQError(f"codebook init 'minmax' needs a power-of-two number of levels, got {K}")
        small = K <= _DP_MAX_LEVELS
        if init == "kmeans" and not small:
            raise BayesQError(f"codebook init 'kmeans' takes at most {_DP_MAX_LEVELS} levels, got {K}; "
                              "use 'quantile'")
        start = "kmeans" if init == "kmeans" or (init == "auto" and small) else "quantile"
        if init in ("auto", "minmax") and pow2:
            c_mm = _minmax_levels(mu2, K, blk)
    else:
        c0 = _check_codebook(init, G, sort=True)
        if c0.shape[1] != K:
            raise BayesQError(f"codebook init has {c0.shape[1]} levels, expected {K}")
    out = np.empty((G, K), np.float64)
    lib = codebook_native.library()

    def chunk(args):   # the chunks are independent: fitted on every core (parallel.local_map)
        sl, m, s, w, valid = args
        if not isinstance(init, str):
            c = c0[sl]
        elif init == "minmax":
            c = c_mm[sl]
        else:
            c = None                      # the kmeans / quantile start, computed per group below
        # "auto": both starts as stored (float32), compared on the objective itself in Lloyd's first round
        alt = c_mm[sl] if isinstance(init, str) and init == "auto" and pow2 else None
        if lib is not None:
            return sl, codebook_native.fit(lib, m, s, w, valid, K, start if c is None else "given", c, alt,
                                           iters=iters, tol=tol, dp_bins=_dp_bins(K),
                                           kmeans_rounds=_KMEANS_ROUNDS, z_lloyd=_Z_LLOYD)
        if c is None:
            c = _start_levels(m, w, valid, K, start)
        return sl, _lloyd_chunk(m, s, w, c, iters, tol, alt)

    for sl, levels in local_map(chunk, _prepared_chunks(mu, sigma, weight, block, K)):
        out[sl] = levels
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# codes

def codebook_codes(mu, codebook, *, block: int | None = None) -> np.ndarray:
    """Nearest level of each weight (a tie goes to the lower level), uint8 in ``mu``'s shape."""
    mu2, L, blk = _rows(mu, block)
    rows = mu2.shape[0]
    m = _grouped(mu2, (rows, L), L, blk)
    c = _check_codebook(codebook, m.shape[0])
    codes = np.empty(m.shape, np.uint8)
    for sl in _chunks(m.shape[0], blk, c.shape[1]):
        thr = 0.5 * (c[sl, 1:] + c[sl, :-1])
        codes[sl] = _nearest(m[sl], thr)
    return _ungroup(codes, rows, L, blk).reshape(np.shape(mu))


def codebook_dequantize(codes, codebook, *, block: int | None = None) -> np.ndarray:
    """The weights the codes stand for, float32 in ``codes``' shape."""
    codes = np.asarray(codes)
    c2, L, blk = _rows(codes, block)
    rows = c2.shape[0]
    G = rows * -(-L // blk)
    cb = np.asarray(codebook, np.float32)
    if cb.ndim != 2 or cb.shape[0] != G:
        raise BayesQError(f"codebook must be ({G}, levels), got {cb.shape}")
    if c2.size and int(c2.max()) >= cb.shape[1]:
        raise BayesQError(f"code {int(c2.max())} out of range for {cb.shape[1]} levels")
    grp = np.arange(rows)[:, None] * (G // rows) + (np.arange(L) // blk)[None, :]
    return cb[grp, c2.astype(np.intp)].reshape(codes.shape)


def round_gptq_codebook(view, H: np.ndarray | GPTQFactor, codebook, block: int, *, damp: float = 0.01,
                        lazy_block: int = 128, act_order: bool = False, dtype=np.float32) -> tuple[np.ndarray, float]:
    """GPTQ error-feedback rounding of a ``(rows, L)`` view onto fixed per-group codebooks
    ``(rows * ceil(L / block), levels)``: ``rounding.round_gptq`` with the nearest codebook
    level in place of the affine grid (the same column loop, ``rounding.error_feedback``, and
    ``H`` handling, ``rounding.gptq_factor``).  Returns uint8 codes ``(rows, L)`` and GPTQ's
    objective (``rounding.error_feedback``)."""
    view = np.asarray(view)
    if view.ndim != 2:
        raise BayesQError(f"GPTQ needs a (rows, L) view, got shape {view.shape}")
    if not np.all(np.isfinite(view)):
        raise BayesQError("GPTQ: the weights contain NaN or Inf")
    rows, L = view.shape
    ng = -(-L // block)
    c = _check_codebook(codebook, rows * ng)
    try:
        f = H if isinstance(H, GPTQFactor) else gptq_factor(H, damp, act_order, dtype)
    except ValueError as e:
        raise BayesQError(str(e)) from None
    if tuple(f.U.shape) != (L, L):
        raise BayesQError(f"H must be ({L}, {L}) for a view with L={L}, got {tuple(f.U.shape)}")
    be = f.backend
    lev = c.reshape(rows, ng, -1).transpose(1, 0, 2)           # (groups, rows, K)
    # the thresholds in float64, then in the working precision: as codebook_codes computes them
    thr = 0.5 * (lev[..., 1:] + lev[..., :-1])
    quantize = LevelColumns(be, f.perm // block, be.put(thr.transpose(0, 2, 1), f.dtype), be.put(lev, f.dtype),
                            lev.shape[2])
    return error_feedback(view, f, quantize, lazy_block)
