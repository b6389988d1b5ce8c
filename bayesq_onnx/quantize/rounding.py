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
import scipy.linalg.lapack

from ..formats.base import UniformCodes
from . import rounding_native
from .backend import NUMPY, NumpyBackend
from .grid import minmax_grid


_RTN_CHUNK = 1 << 18   # weights per pass of float64 work on a view (row_slices)


def _codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """Nearest grid code, computed in float64 like ``expected_sq_error`` so both agree on ties."""
    return np.clip(np.rint(w / np.asarray(scale, np.float64)) + zp, 0, qmax)


def _check(view, scale, zp, block) -> int:
    rows, L = view.shape
    g = -(-L // block)
    if scale.shape != (rows, g) or zp.shape != (rows, g):
        raise ValueError(f"scale/zero_point must be ({rows}, {g}), got {scale.shape} / {zp.shape}")
    return g


def row_slices(rows: int, width: int, elements: int = _RTN_CHUNK):
    """Slices of about ``elements`` values, whole rows each: float64 work on a view a few rows at a
    time (a 65M-weight embedding's float64 temporaries would be 0.5 GB each)."""
    step = max(1, elements // max(width, 1))
    return (slice(r, r + step) for r in range(0, rows, step))


def round_rtn(view: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, block: int) -> UniformCodes:
    """Round every weight to its nearest grid point."""
    _check(view, scale, zp, block)
    rows, L = view.shape
    g = np.arange(L) // block
    codes = np.empty((rows, L), np.uint8)
    for sl in row_slices(rows, L):
        codes[sl] = _codes(np.asarray(view[sl], np.float64), scale[sl][:, g], zp[sl][:, g], (1 << bits) - 1)
    return UniformCodes(codes, scale.astype(np.float32), zp.astype(np.uint8), bits, block)


@dataclass(frozen=True, eq=False)
class GPTQFactor:
    """What GPTQ needs from ``H`` whatever the grid: computed once per site, reused per format."""

    U: object           # upper Cholesky factor of the dampened, permuted H^-1 (L, L), on the backend
    diag: np.ndarray    # its diagonal, float64: 1 / diag^2 is each column's conditional precision
    perm: np.ndarray    # column order (act_order: decreasing diag H)
    dead: np.ndarray    # inputs with diag(H) == 0
    damping: float      # added to H's diagonal (its dead entries set to 1 first)
    backend: object = NUMPY

    @property
    def dtype(self):
        return np.float64 if str(self.U.dtype).endswith("float64") else np.float32


def gptq_factor(H: np.ndarray, damp: float = 0.01, act_order: bool = False, dtype=np.float32,
                backend=NUMPY) -> GPTQFactor:
    """As the reference: inputs with ``diag(H) == 0`` never reach the output, so their weights are
    set to 0 and their diagonal to 1; ``damp * mean(diag H)`` is added to the diagonal;
    ``act_order`` quantizes columns by decreasing ``diag(H)``.

    The factor is computed in float64 (``H``'s condition number reaches ``~L / damp``, 1e5-1e6 at
    L = 1k-6k, too close to float32's 1/eps for a Cholesky) and stored in ``dtype``: float32 by
    default, as the reference's column updates run, since a coefficient rounded to 6e-8 of itself
    moves the weights by far less than the quantization error they absorb -- and it halves the
    largest buffer of a site.  Without forming ``H^-1``: with ``J`` the order reversal and
    ``J H J = C C^T``, ``H^-1 = (J C^-1 J)^T (J C^-1 J)`` and ``J C^-1 J`` is upper triangular with a
    positive diagonal, so it *is* the upper Cholesky factor of ``H^-1`` -- one Cholesky and one
    triangular inverse (2/3 L^3 flops) instead of a Cholesky, a solve against the identity and a
    second Cholesky (8/3 L^3)."""
    L = H.shape[0]
    if H.shape != (L, L):
        raise ValueError(f"H must be square, got {H.shape}")
    d = np.array(np.diag(H), np.float64)
    dead = d == 0
    d[dead] = 1.0
    perm = np.argsort(-d, kind="stable") if act_order else np.arange(L)
    # the one float64 copy of H, in reversed column order (see above) and in Fortran order, so that
    # LAPACK factors and inverts it in place: on a 5632-wide input (1B Llama's down projection) each
    # further L x L copy is 254 MB.  Made in C order and transposed: H is symmetric, and LAPACK reads
    # one triangle anyway; a Fortran-order copy of the reversed C array is a transposing gather, 0.39
    # s against 0.03 s at L = 5632 (a fifth of a factor's time)
    rev = perm[::-1]
    H = np.ascontiguousarray(H[np.ix_(rev, rev)] if act_order else H[::-1, ::-1], np.float64).T
    fix = dead[rev]
    H[fix, fix] = 1.0
    H[np.diag_indices(L)] += damp * np.mean(d[perm])
    if isinstance(backend, NumpyBackend):
        C, info = scipy.linalg.lapack.dpotrf(H, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise ValueError("H is not positive definite after dampening; raise damp")
        del H
        Cinv, info = scipy.linalg.lapack.dtrtri(C, lower=1, overwrite_c=1)
        if info != 0:
            raise ValueError("H is not positive definite after dampening; raise damp")
        U = np.array(Cinv[::-1, ::-1], dtype)
        diag = np.diag(Cinv)[::-1].astype(np.float64)
    else:
        torch = backend.torch
        Hr = torch.tensor(np.ascontiguousarray(H), device=backend.device)
        del H
        C, info = torch.linalg.cholesky_ex(Hr)
        if int(info) != 0:
            raise ValueError("H is not positive definite after dampening; raise damp")
        del Hr
        Cinv = torch.linalg.solve_triangular(C, torch.eye(L, dtype=C.dtype, device=C.device), upper=False)
        del C
        U = Cinv.flip(0, 1).to(backend._dtype(dtype))
        diag = Cinv.diagonal().flip(0).cpu().numpy().astype(np.float64)
    return GPTQFactor(U, diag, perm, dead, float(damp * np.mean(d[perm])), backend)


def layer_error_from_objective(view: np.ndarray, deq: np.ndarray, f: GPTQFactor, objective: float) -> float:
    """``||X (W - Q)^T||^2 = tr(E H E^T)`` of codes GPTQ made with factor ``f``, from its own
    ``objective`` (:func:`error_feedback`) instead of an ``L x L`` product per row.  The objective
    is the damped ``tr(E' H_d E'^T)``, ``E' = Q - W'`` with ``W'`` the weights GPTQ started from
    (dead inputs' set to 0), and ``H_d`` is ``H`` with its dead diagonal set to 1, plus ``damping``
    on the diagonal; ``H``'s dead rows and columns are 0, so ``tr(E H E^T) = objective -
    damping ||E'||^2 - ||E'_dead||^2``.  In exact arithmetic the identity is exact; with float32
    column updates it held to 1e-7 relative on random and rank-deficient ``H`` (tests)."""
    rows, L = view.shape
    sq = dead_sq = 0.0
    for sl in row_slices(rows, L):
        e = deq[sl].astype(np.float64) - np.where(f.dead, 0.0, view[sl])
        sq += float(np.einsum("rk,rk->", e, e))
        if f.dead.any():
            dead_sq += float(np.einsum("rk,rk->", e[:, f.dead], e[:, f.dead]))
    return objective - f.damping * sq - dead_sq


# columns whose updates are applied one by one inside a lazy batch; the rest of the batch gets
# them as one matrix product per sub-block (same sums, less memory traffic on wide views)
_SUB_BLOCK = 16


class Columns:
    """Each column's quantizer in GPTQ's loop, for :func:`error_feedback`: the nearest point of the
    column's group's grid (a subclass says which grid), ``group[c]`` the group of the c-th column
    rounded; ``keep`` (L, rows) 1 or 0 per weight in rounding order, or None: a 0 fixes the code and
    value to 0.  The grids ``a`` and ``b`` are in the working precision on the backend, one row per
    group; calling it rounds one column on the backend, :meth:`native` a sub-block's columns in the
    library (``rounding_native``)."""

    kind = -1   # gptq.cpp's quantizer kind

    def __init__(self, backend, group: np.ndarray, a, b, k: int, keep=None):
        self.backend, self.a, self.b, self.k, self.keep = backend, a, b, k, keep
        self.group = np.ascontiguousarray(group, np.int64)   # as the library reads it

    def nearest(self, w, a, b):
        raise NotImplementedError

    def __call__(self, c, w):
        g = self.group[c]
        q, deq = self.nearest(w, self.a[g], self.b[g])
        if self.keep is not None:
            q, deq = q * self.keep[c], deq * self.keep[c]
        return q, deq

    def native_ok(self) -> bool:
        arrays = (self.a, self.b) + (() if self.keep is None else (self.keep,))
        return all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in arrays) and rounding_native.usable(
            self.group, *arrays)

    def native(self, lib, W, U, c0: int, err, codes) -> None:
        c1 = c0 + len(W)
        rounding_native.columns(lib, W, U, c0, err, codes, self.group[c0:c1], self.kind, self.k, self.a, self.b,
                                None if self.keep is None else self.keep[c0:c1])


class AffineColumns(Columns):
    """Affine grids: ``a`` the scales, ``b`` the zero points ``(groups, rows)``, ``k`` the largest code."""

    kind = 0

    def nearest(self, w, scale, zp):
        return self.backend.affine_codes(w, scale, zp, self.k)


class LevelColumns(Columns):
    """Codebooks: ``a`` the thresholds ``(groups, K-1, rows)``, ``b`` the levels ``(groups, rows, K)``,
    ``k`` = K."""

    kind = 1

    def nearest(self, w, thr, lev):
        return self.backend.nearest_level(w, thr, lev)


def error_feedback(view: np.ndarray, f: GPTQFactor, quantize, lazy_block: int = 128, start=None, ahead=None):
    """GPTQ's column loop on ``view`` (rows, L) with factor ``f``, in the factor's dtype and on its
    backend: ``quantize(c, w)`` gives column ``c``'s codes and dequantized values from its current
    weights ``w`` (rows,).  ``start(c, Wt)``, if given, is called at each lazy batch's columns with
    the weights as they stand at the batch start (dynamic groups read those).  ``ahead(c, W)``, if
    given, is called before column ``c`` is rounded with the current weights of columns ``c`` to the
    end of its sub-block of :data:`_SUB_BLOCK` (``W``: (columns, rows), on the backend; every earlier
    column's update applied).  Returns the codes ``(rows, L)`` as numpy, in the view's column
    order, and GPTQ's objective: the sum over columns of the squared scaled errors
    ``(w_c - q_c) / U_cc``, which is the damped layer error of the codes
    (:func:`layer_error_from_objective`).

    Where ``quantize`` is a :class:`Columns` in float32 on numpy and nothing looks ahead, each
    sub-block's columns run in the library (the same bits; ``start`` is then called for a sub-block's
    columns before it: it reads only the batch start, which the sub-block leaves as it was)."""
    rows, L = view.shape
    if tuple(f.U.shape) != (L, L):
        raise ValueError(f"H must be ({L}, {L}) for a view with L={L}, got {tuple(f.U.shape)}")
    be, U, dtype = f.backend, f.U, f.dtype
    lib = None
    if (isinstance(quantize, Columns) and ahead is None and isinstance(be, NumpyBackend) and dtype == np.float32
            and min(U.strides) > 0 and quantize.native_ok()):
        lib = rounding_native.library()
    # Work on W^T (one row per input index): every column update below is contiguous.
    # (one copy where it can: a 32000-word head's is 262 MB)
    Wt = np.asarray(view).T.astype(dtype, order="C")
    Wt[f.dead] = 0.0
    if not np.array_equal(f.perm, np.arange(L)):
        Wt = Wt[f.perm]
    if not isinstance(be, NumpyBackend):
        Wt = be.put(Wt, dtype)
    codes = be.empty((L, rows), np.uint8)          # codes are integers 0..255: exact in uint8
    objective = 0.0
    for i1 in range(0, L, lazy_block):
        i2 = min(i1 + lazy_block, L)
        W1 = Wt[i1:i2] if start is None else be.put(Wt[i1:i2], dtype)   # Wt[i1:i2] keeps the batch start
        err = be.empty((i2 - i1, rows), dtype)
        for j1 in range(i1, i2, _SUB_BLOCK):
            j2 = min(j1 + _SUB_BLOCK, i2)
            if lib is not None:
                if start is not None:
                    for c in range(j1, j2):
                        start(c, Wt)
                quantize.native(lib, W1[j1 - i1:j2 - i1], U, j1, err[j1 - i1:j2 - i1], codes[j1:j2])
            else:
                for c in range(j1, j2):
                    if start is not None:
                        start(c, Wt)
                    if ahead is not None:
                        ahead(c, W1[c - i1:j2 - i1])
                    w = W1[c - i1]
                    q, deq = quantize(c, w)
                    codes[c] = q
                    e = err[c - i1]
                    e[:] = (w - deq) / U[c, c]
                    W1[c - i1 + 1:j2 - i1] -= U[c, c + 1:j2, None] * e
            W1[j2 - i1:] -= U[j1:j2, j2:i2].T @ err[j1 - i1:j2 - i1]
        Wt[i2:] -= U[i1:i2, i2:].T @ err
        objective += _sum_sq(be.get(err))
    out = np.empty((rows, L), np.uint8)
    out[:, f.perm] = be.get(codes).T
    return out, objective


def _sum_sq(a: np.ndarray) -> float:
    """``sum(a^2)`` of a ``(columns, rows)`` batch in float64, a few of its rows at a time."""
    total = 0.0
    for sl in row_slices(*a.shape):
        x = a[sl].astype(np.float64)
        total += float(np.einsum("rk,rk->", x, x))
    return total


def round_gptq(view: np.ndarray, H: np.ndarray | GPTQFactor, scale: np.ndarray | None, zp: np.ndarray | None,
               bits: int, block: int, damp: float = 0.01, lazy_block: int = 128,
               act_order: bool = False, round_scale=None, dtype=np.float32, mask: np.ndarray | None = None,
               prune=None) -> UniformCodes:
    """GPTQ rounding of ``view`` (rows, L) with ``H = X^T X`` (L, L) over the view's ``L`` axis, or
    its precomputed :func:`gptq_factor` (then ``damp``, ``act_order`` and ``dtype`` are the
    factor's), onto the fixed grid ``(scale, zp)``, or onto dynamic min/max groups when both are
    ``None`` (their scales passed through ``round_scale``, e.g. to the float16 the format stores,
    before use).  Under act_order each column keeps its own group's grid.
    ``mask`` (bool ``(rows, L)``): weights outside it are pruned -- fixed to code 0 and value 0, their
    error spread over the columns not yet rounded like any other (SparseGPT's OBS update with a
    given mask); dynamic groups take their range from the survivors (and 0).  The codes of pruned
    weights are 0: the caller keeps only the survivors'.
    ``prune = (of, choose)``: the mask is chosen as rounding goes, as SparseGPT does N:M -- when the
    loop reaches a run of ``of`` columns (``of`` dividing :data:`_SUB_BLOCK`), ``choose(c, W)`` gets
    those columns' current weights ``W`` (rows, of), every earlier column's error spread, and returns
    which survive (bool, same shape), written into ``mask`` (a writable bool (rows, L) array).  A
    dynamic group's range is taken at its start from ``choose``'s provisional pick of the group's
    weights as they stand then.  Needs the identity column order (no act_order)."""
    rows, L = view.shape
    dynamic = scale is None and zp is None
    if not dynamic:
        _check(view, scale, zp, block)
    f = H if isinstance(H, GPTQFactor) else gptq_factor(H, damp, act_order, dtype)
    if tuple(f.U.shape) != (L, L):
        raise ValueError(f"H must be ({L}, {L}) for a view with L={L}, got {tuple(f.U.shape)}")
    if dynamic and not np.array_equal(f.perm, np.arange(L)):
        raise ValueError("dynamic groups follow the column order: act_order needs a fixed grid")
    be, qmax, ng = f.backend, (1 << bits) - 1, -(-L // block)
    # the groups' grids, a row each, in the working precision (float32 grids are exact in it; the
    # division rounds as the reference's does); dynamic ones filled as rounding reaches them
    if dynamic:
        scale, zp = np.empty((rows, ng), np.float32), np.empty((rows, ng), np.uint8)
        sT, zT = be.empty((ng, rows), f.dtype), be.empty((ng, rows), f.dtype)
    else:
        sT, zT = be.put(scale.T, f.dtype), be.put(zp.T, f.dtype)
    keepT = None if mask is None else be.put(np.asarray(mask).T[f.perm], f.dtype)   # (L, rows) 1 = kept
    quantize = AffineColumns(be, f.perm // block, sT, zT, qmax, keepT)
    of, choose = prune if prune is not None else (0, None)
    if choose is not None and (_SUB_BLOCK % of or not np.array_equal(f.perm, np.arange(L)) or mask is None):
        raise ValueError("choosing the mask as rounding goes needs runs dividing 16, no act_order, and a mask")

    def ahead(c, W):
        if c % of == 0:
            keep = np.asarray(choose(c, be.get(W[:of]).T), bool)
            mask[:, c:c + of] = keep
            keepT[c:c + of] = be.put(keep.T, f.dtype)

    def start(c, Wt):
        if c % block == 0:
            g = c // block
            w = be.get(Wt[c:c + block]).T
            if choose is not None:   # the range of the weights that would survive now
                w = w * choose(c, w)
            elif mask is not None:   # pruned weights become 0, which every range holds already
                w = w * np.asarray(mask)[:, c:c + block]
            s, z = minmax_grid(w, bits, block)
            scale[:, g], zp[:, g] = (round_scale(s) if round_scale else s)[:, 0], z[:, 0]
            sT[g], zT[g] = be.put(scale[:, g], f.dtype), be.put(zp[:, g], f.dtype)

    codes, objective = error_feedback(view, f, quantize, lazy_block, start if dynamic else None,
                                      ahead if choose is not None else None)
    return UniformCodes(codes, scale.astype(np.float32), zp.astype(np.uint8), bits, block, objective)
