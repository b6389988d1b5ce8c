"""Quantize one site's view in a given format: choose the grid, round, remember the result.

Numerics only (no onnx): the view, its posterior and its input factor ``X^T X`` come in; codes
and their expected losses come out, cached per format because planners ask for many of them.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

from ..config import METHODS, Method
from ..formats import (CODEBOOKS, BayesqLut, BayesqScaledLut, BayesqSparse, Float32, Format, LutCodes,
                       ScaledLutCodes, SparseCodes, UniformCodes)
from ..formats.bayesq_scaled_lut import scaled_table
from ..formats.bayesq_sparse import compact, top_mask
from ..posterior.expected_loss import expected_loss, pruned_loss, rounding_loss
from ..posterior.laplace import DiagonalLaplace
from .codebook import codebook_codes, codebook_dequantize, expected_codebook_loss, lloyd_max, round_gptq_codebook
from .grid import minmax_grid, search_grid
from .hqq import hqq_grid
from .backend import NUMPY
from .rounding import GPTQFactor, gptq_factor, layer_error_from_objective, round_gptq, round_rtn, row_slices
from .scaled_codebook import scaled_codebook


def _rounder(fmt: Format):
    """How ``fmt`` stores scales (e.g. to float16), or None when it stores them as computed."""
    return getattr(fmt, "round_scales", None)


def _stored(fmt: Format, scale: np.ndarray) -> np.ndarray:
    """Scales as the format stores them: codes must be chosen on the grid the runtime will use."""
    r = _rounder(fmt)
    return scale if r is None else r(scale)


# rows a site's screen and layer-loss prediction are estimated from (SiteQuantizer._screen_rows)
SCREEN_ROWS = 128


class SharedFactor:
    """GPTQ's factor of one ``X^T X`` (independent of the format and of the weights), computed once
    for every site that reads the same input -- q, k and v; gate and up -- whichever thread asks
    first; the others wait for it."""

    def __init__(self, xtx: np.ndarray, damp: float, act_order: bool, backend=NUMPY):
        self._args, self._lock, self._value = (xtx, damp, act_order), threading.Lock(), None
        self.backend = backend

    def get(self) -> GPTQFactor:
        with self._lock:
            if self._value is None:
                self._value = gptq_factor(*self._args, backend=self.backend)
            return self._value

    def __getstate__(self):   # a lock does not pickle (Ray ships quantizers to its workers)
        return self._args, self._value, self.backend

    def __setstate__(self, state):
        (self._args, self._value, self.backend), self._lock = state, threading.Lock()


class _GPTQWork:
    """What GPTQ computes for a site whatever the grid, shared by the quantizers of that site."""

    def __init__(self, factor: SharedFactor | None):
        self.factor = factor                              # of H^-1: independent of the format
        self.own: dict[Format, UniformCodes] = {}         # GPTQ's own codes (dynamic groups)


class SiteQuantizer:
    def __init__(self, view: np.ndarray, posterior: DiagonalLaplace, xtx: np.ndarray | None,
                 method: Method, gptq_damp: float = 0.01, act_order: bool = False, measure_grids: bool = False,
                 factor: SharedFactor | None = None, backend=NUMPY, levels_on_means: bool = False):
        """``measure_grids``: the searched and the min/max grid are both offered to be measured end to
        end (:meth:`grid_kinds`) even where GPTQ runs, instead of the layer output error choosing.
        ``levels_on_means``: codebook levels fitted to the posterior means (``sigma -> 0``), not to
        the posterior (:meth:`_codebook`).
        ``factor``: GPTQ's factor of ``xtx`` with these settings, shared with other sites (default:
        this site's own).  ``backend``: where GPTQ runs (``quantize.backend``; a shared factor
        brings its own)."""
        self.view, self.posterior, self.method, self.measure_grids = view, posterior, method, measure_grids
        self.levels_on_means = levels_on_means
        self.xtx, self._gptq_damp, self._act_order = xtx, gptq_damp, act_order
        self._backend = factor.backend if factor is not None else backend
        self._work = _GPTQWork(factor or self._new_factor())
        # caches of pure functions of (format, grid kind): the answers never depend on the call order
        self._grids: dict[tuple[Format, str], tuple] = {}   # small: one scale and zero point per group
        self._grid_losses: dict[tuple[Format, str], np.ndarray] = {}   # and one loss per group
        self._codes: dict[tuple[Format, str], UniformCodes] = {}

    @property
    def _gptq(self) -> bool:
        return self.method.gptq and self.xtx is not None

    @property
    def _dynamic(self) -> bool:
        """Grids found during GPTQ rounding (not with act_order, which needs them first)."""
        return self.method.grid == "dynamic" and self._gptq and not self._act_order

    def _codebook(self, fmt: BayesqLut | BayesqScaledLut) -> np.ndarray:
        """Posterior-weighted Lloyd-Max levels per group: the table ``(rows * G, 2**bits)`` as the
        runtime decodes it; for one scaled codebook (``BayesqScaledLut``) also ``self._grids[fmt,
        "scaled"]``: its scales and levels.  Fitted to the posterior (a Gaussian E-step over each
        weight's width), or with ``levels_on_means`` to the means.  Its nearest codes and expected
        loss are made when asked for (:meth:`_lut_codes`, :meth:`expected_loss`): where GPTQ rounds
        onto the table, nothing asks for the nearest codes."""
        if (fmt, "lut") not in self._grids:
            fit_sigma = 0.0 if self.levels_on_means else self._sigma()
            if isinstance(fmt, BayesqScaledLut):
                levels, scale = scaled_codebook(self.posterior.mu, fit_sigma, self.posterior.precision,
                                                1 << fmt.bits, fmt.block)
                self._grids[fmt, "scaled"] = scale, levels
                codebook = scaled_table(scale, levels).reshape(-1, 1 << fmt.bits)   # as the runtime computes it
            else:
                codebook = lloyd_max(self.posterior.mu, fit_sigma, self.posterior.precision, 1 << fmt.bits,
                                     block=fmt.block or None)
                codebook = fmt.round_scales(codebook)   # the levels as stored (fp16 or fp32), then the codes
            self._grids[fmt, "lut"] = codebook
        return self._grids[fmt, "lut"]

    def _sigma(self) -> np.ndarray:
        """The posterior's widths in float64, made per use: held, a 1B head's would be 0.5 GB."""
        return np.sqrt(self.posterior.sigma2.astype(np.float64))

    def grid_kinds(self, fmt: Format) -> tuple[str, ...]:
        """The grids worth measuring end to end in this format.  Where GPTQ runs on a matmul, its
        layer output error already picks the grid (see :meth:`codes`); elsewhere (convolutions,
        Gather: ``measure_grids``, or no ``X^T X``) the diagonal expected loss that the search
        minimises, and even the layer output error, can favour clipping that the model does not
        tolerate -- measured on a Fashion-MNIST CNN: at 2 bits, GPTQ on the searched grid left
        15-30% less layer error than on min/max groups and 2-9x the end-to-end distortion -- so
        min/max is offered too (where GPTQ runs: its own dynamic min/max groups)."""
        if isinstance(fmt, CODEBOOKS):
            return ("lut",)
        if isinstance(fmt, BayesqSparse):   # the survivors' min/max groups (GPTQ's own where it runs)
            return ("dynamic",) if self._gptq and not self._act_order else ("minmax",)
        if isinstance(fmt, Float32) or self.method.grid != "posterior" or (self._gptq and not self.measure_grids):
            return (self.method.grid,)
        return ("posterior", "minmax")

    def grid_kind(self, fmt: Format, kind: str | None = None) -> str:
        """The grid ``fmt`` is rounded on when ``kind`` is asked for: ``kind``, checked, or else the
        first on offer."""
        kinds = self.grid_kinds(fmt)
        if kind is None:
            return kinds[0]
        if kind not in kinds:
            raise ValueError(f"grid {kind!r} is not offered for {fmt.name}")
        return kind

    def _grid(self, fmt: Format, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``kind`` grid in ``fmt``: scales as stored, and zero points."""
        if (fmt, kind) not in self._grids:
            if self._dynamic:
                q = self.codes(fmt, kind)
                scale, zp = q.scale, q.zero_point
            elif kind == "posterior":
                # clipping at 1.0, 0.9, ..., 0.4 of the group's range, screened at sigma -> 0;
                # the closed form decides between min/max and the two best-screened ranges (on
                # MiniLM 99.99% of groups get the grid the full search picks, at 0.5-0.7x its cost)
                scale, zp, loss = search_grid(self.posterior, fmt.bits, fmt.block, n_steps=7, min_shrink=0.4)
                if np.array_equal(_stored(fmt, scale), scale):   # else rated again as stored, if asked
                    self._grid_losses[fmt, kind] = loss
            elif kind == "hqq":
                scale, zp = hqq_grid(self.view, fmt.bits, fmt.block)
            else:  # minmax, and dynamic groups wherever GPTQ does not run (grouped Conv, Gather, act_order)
                scale, zp = minmax_grid(self.view, fmt.bits, fmt.block)
            self._grids[fmt, kind] = _stored(fmt, scale), zp
        return self._grids[fmt, kind]

    def _grid_loss(self, fmt: Format, kind: str) -> np.ndarray:
        """The closed-form expected loss of the ``kind`` grid per group, computed when first asked:
        of the grids a site's codes are tried on, often one is kept (a Gather's or a convolution's
        grids are measured end to end) and only that one is rated -- on the 0.1B Llama's embedding
        one closed form over 24.6M weights fewer (the run's user time 106 -> 102 s)."""
        if (fmt, kind) not in self._grid_losses:
            scale, zp = self._grid(fmt, kind)
            self._grid_losses[fmt, kind] = expected_loss(self.posterior, scale, zp, fmt.bits, fmt.block)
        return self._grid_losses[fmt, kind]

    def expected_loss(self, fmt: Format, kind: str | None = None) -> float:
        """Closed-form posterior-expected whitened distortion of the format's grid (0 for fp32)."""
        if isinstance(fmt, CODEBOOKS):
            if (fmt, "lut") not in self._grid_losses:   # posterior-expected, whatever the levels were fitted to
                self._grid_losses[fmt, "lut"] = expected_codebook_loss(
                    self.view, self._sigma(), self.posterior.precision, self._codebook(fmt), block=fmt.block or None)
            return float(self._grid_losses[fmt, "lut"].sum())
        if isinstance(fmt, BayesqSparse):
            return self._sparse_expected_loss(fmt)
        return 0.0 if isinstance(fmt, Float32) else float(self._grid_loss(fmt, self.grid_kind(fmt, kind)).sum())

    def screen_loss(self, fmt: Format) -> float:
        """Precision-weighted rounding error of the posterior mean on the plain min/max grid (the
        closed form at sigma -> 0): enough to rank a site's own formats before the expensive work,
        and blind to the posterior mass of barely-seen weights beyond the clipping range, which
        otherwise ranks formats by range width alone (rare embedding rows)."""
        return self._rounding_error(fmt, self.posterior.precision)

    def layer_loss(self, fmt: Format) -> float:
        """The layer output error ``||X (W - Q)^T||^2`` that ``fmt``'s codes are predicted to leave,
        without rounding them: the min/max grid's rounding error of each weight times what an error
        there costs -- where GPTQ runs, its conditional precision ``1 / U_ii^2`` (``H^-1 = U^T U``:
        the cost of an error in column ``i`` once the columns after it have compensated for it, which
        is exactly how GPTQ accumulates its error), elsewhere the posterior precision.  Measured on
        MiniLM: within 0.75-1.25x of the GPTQ-rounded codes' error at 2-6 bits (8-bit errors, far
        below every other candidate's, come out up to 4x high)."""
        if isinstance(fmt, BayesqSparse) and self._gptq:
            return self._sparse_layer_loss(fmt)
        return self._rounding_error(fmt, self._layer_weights())

    def weight_error(self, fmt: Format) -> float:
        """``||W - Q(W)||^2``, unweighted, on the min/max grid rounded to nearest (or the codebook's
        levels): HAWQ's quantization perturbation, before any error feedback moves the weights.
        Estimated from :data:`SCREEN_ROWS` rows as :meth:`layer_loss` is."""
        return self._rounding_error(fmt, np.ones((1, 1)))

    def layer_error(self, q: UniformCodes | LutCodes) -> float:
        """The layer output error that codes ``q`` leave, in :meth:`layer_loss`'s units: with GPTQ's
        ``H = X^T X`` the exact ``||X (W - Q)^T||^2 = tr(E H E^T)`` -- from GPTQ's own objective where
        GPTQ made the codes (``O(rows L)``: the product is ``O(rows L^2)``, a tenth of a 1B Llama's
        loss tables); elsewhere the precision-weighted squared error."""
        deq, total = q.dequantize(), 0.0
        objective = getattr(q, "gptq_objective", None)
        if self._gptq and objective is not None:
            return layer_error_from_objective(self.view, deq, self._factor(), objective)
        precision = np.broadcast_to(self.posterior.precision, deq.shape)
        for sl in row_slices(*deq.shape):   # float64 rows at a time: 0.5 GB a temporary on a whole 1B embedding
            e = deq[sl].astype(np.float64) - self.view[sl]
            total += float(np.einsum("rk,rk->", e @ self.xtx, e) if self._gptq else (precision[sl] * np.square(e)).sum())
        return total

    def _layer_weights(self) -> np.ndarray:
        if not self._gptq:
            return self.posterior.precision
        f = self._factor()
        w = np.empty(self.view.shape[1], np.float64)
        w[f.perm] = 1.0 / np.square(f.diag)
        w[f.dead] = 0.0       # inputs that are always 0: their weights never reach the output
        return w[None, :]

    def _rounding_error(self, fmt: Format, weight: np.ndarray) -> float:
        """``sum_i weight_i (Q(mu_i) - mu_i)^2`` on the min/max grid, or on the codebook's levels,
        estimated from :data:`SCREEN_ROWS` rows (:meth:`_screen_rows`)."""
        if isinstance(fmt, Float32):
            return 0.0
        rows, mult = self._screen_rows(weight)
        mu = self.view[rows]
        w = np.broadcast_to(weight, self.view.shape)[rows]
        if isinstance(fmt, BayesqSparse):
            keep = self._mask(fmt, rows)
            wide = np.broadcast_to(w, mu.shape)
            inner = DiagonalLaplace(compact(mu, keep, fmt.keep, fmt.of), compact(wide, keep, fmt.keep, fmt.of))
            grid = minmax_grid(inner.mu, fmt.bits, fmt.inner_block)
            per_row = rounding_loss(inner, *grid, fmt.bits, fmt.inner_block).sum(axis=1) + \
                (np.where(keep, 0.0, wide * np.square(mu, dtype=np.float64))).sum(axis=1)   # a pruned weight's error is itself
        elif isinstance(fmt, BayesqScaledLut):
            # one codebook and the screened rows' scales at sigma -> 0, fitted on those rows, each
            # counted as often as it stands for rows
            prec = np.broadcast_to(self.posterior.precision, self.view.shape)[rows] * mult[:, None]
            levels, scale = scaled_codebook(mu, 0.0, prec, 1 << fmt.bits, fmt.block, rounds=1)
            table = scaled_table(scale, levels).reshape(-1, 1 << fmt.bits)
            block = fmt.block or None
            err = codebook_dequantize(codebook_codes(mu, table, block=block), table, block=block) - mu
            per_row = (w * np.square(err, dtype=np.float64)).sum(axis=1)
        elif isinstance(fmt, BayesqLut):
            # the codebook at sigma -> 0, as the affine grids are screened: lloyd_max's start (the
            # precision-weighted k-means of the means, or min/max levels where better), without the
            # Gaussian rounds.  Its rounding error of the means is 0.01-4% below the full codebook's
            # (16 levels on 768-wide rows the most; 0.1B Llama sites), far inside the prediction's
            # +-25%, at 0.1-0.6x the cost
            block = fmt.block or None
            prec = np.broadcast_to(self.posterior.precision, self.view.shape)[rows]
            codebook = fmt.round_scales(lloyd_max(mu, 0.0, prec, 1 << fmt.bits, block=block, iters=0))
            err = codebook_dequantize(codebook_codes(mu, codebook, block=block), codebook, block=block) - mu
            per_row = (w * np.square(err, dtype=np.float64)).sum(axis=1)
        else:
            per_row = rounding_loss(DiagonalLaplace(mu, w), *minmax_grid(mu, fmt.bits, fmt.block), fmt.bits,
                                    fmt.block).sum(axis=1)
        return float(mult @ per_row)

    def _screen_rows(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows to estimate a sum over the view's independent rows from, and each one's multiplier.
        Rows are drawn systematically in proportion to their total ``weight`` times their squared
        range (what a row's rounding error scales with), and each counts inversely to that: the
        estimate is unbiased, and as the drawn quantity tracks the error its spread is small (a few
        percent over :data:`SCREEN_ROWS` rows, far below the +-25% of the prediction itself).  A Lloyd-Max screen on a 768 x 768 site costs a sixth, on a 32000-row embedding a
        250th.  Sites of at most that many rows are summed exactly."""
        n_rows = self.view.shape[0]
        if n_rows <= SCREEN_ROWS:
            return np.arange(n_rows), np.ones(n_rows)
        w = np.asarray(weight, np.float64)
        mass = np.broadcast_to(w.sum(axis=1) if w.shape[1] > 1 else w[:, 0] * self.view.shape[1], (n_rows,))
        # a row's rounding error scales with its weight and with its range squared
        mass = mass * self._squared_ranges
        cum = np.cumsum(mass)
        if cum[-1] <= 0:
            return np.arange(0), np.zeros(0)
        rows = np.minimum(np.searchsorted(cum, (np.arange(SCREEN_ROWS) + 0.5) * cum[-1] / SCREEN_ROWS, side="right"),
                          n_rows - 1)
        return rows, cum[-1] / SCREEN_ROWS / mass[rows]

    @functools.cached_property
    def _squared_ranges(self) -> np.ndarray:
        """Each view row's (max - min)^2: read once, not per screened format (a 1B head is 65M weights)."""
        return np.square(np.ptp(self.view, axis=1).astype(np.float64))

    def quick_codes(self, fmt: Format) -> UniformCodes | LutCodes:
        """Real codes in ``fmt`` at the cost of one rounding and no grid search: GPTQ's own (dynamic
        min/max groups) where GPTQ runs, else nearest on the min/max grid; codebooks need their
        Lloyd-Max levels (:meth:`codes`)."""
        if isinstance(fmt, (*CODEBOOKS, BayesqSparse)):
            return self.codes(fmt)
        if self._gptq and not self._act_order:
            return self._own_gptq(fmt)
        return round_rtn(self.view, *minmax_grid(self.view, fmt.bits, fmt.block), fmt.bits, fmt.block)

    def codes(self, fmt: Format, kind: str | None = None) -> UniformCodes | LutCodes:
        """The codes in ``fmt`` on the ``kind`` grid (one of :meth:`grid_kinds`; default the first)."""
        if isinstance(fmt, CODEBOOKS):
            return self._lut_codes(fmt)
        if isinstance(fmt, BayesqSparse):
            return self._sparse_codes(fmt)
        kind = self.grid_kind(fmt, kind)
        if (fmt, kind) not in self._codes:
            own = self._gptq and not self._act_order and (self._dynamic or kind == "minmax")
            scale, zp = (None, None) if own else self._grid(fmt, kind)
            if self._gptq:
                q = (self._own_gptq(fmt) if own else
                     round_gptq(self.view, self._factor(), scale, zp, fmt.bits, fmt.block, round_scale=_rounder(fmt)))
                if self.method.grid == "posterior" and kind == "posterior" and not self.measure_grids \
                        and not self._act_order:
                    # The searched grid is fixed before error feedback moves the weights; the
                    # reference's dynamic min/max groups follow them.  Keep whichever leaves the
                    # smaller layer output error ||X (W - Q)^T||^2: never worse than plain GPTQ
                    # on the calibration rows, in the same format.
                    alt = self._own_gptq(fmt)
                    if self.layer_error(alt) < self.layer_error(q):
                        q = alt
                self._codes[fmt, kind] = q
            else:
                self._codes[fmt, kind] = round_rtn(self.view, scale, zp, fmt.bits, fmt.block)
        return self._codes[fmt, kind]

    def _lut_codes(self, fmt: BayesqLut | BayesqScaledLut) -> LutCodes:
        """Lloyd-Max levels, then GPTQ error feedback onto them where ``X^T X`` is known (else the
        codes Lloyd-Max itself assigns)."""
        codebook = self._codebook(fmt)
        rows, L = self.view.shape
        block = fmt.block or L

        def make(codes, objective=None):
            if isinstance(fmt, BayesqScaledLut):   # the same table, with the scales and levels it is made of
                return ScaledLutCodes.of(codes, *self._grids[fmt, "scaled"], fmt.bits, fmt.block, objective)
            return LutCodes(codes, codebook.reshape(rows, -1, 1 << fmt.bits), fmt.bits, fmt.block, objective)

        if (fmt, "lut") not in self._codes:
            self._codes[fmt, "lut"] = make(*round_gptq_codebook(self.view, self._factor(), codebook, block)) \
                if self._gptq else make(codebook_codes(self.view, codebook, block=fmt.block or None))
        return self._codes[fmt, "lut"]

    def _mask(self, fmt: BayesqSparse, rows=slice(None)) -> np.ndarray:
        """The weights ``fmt`` keeps (of view rows ``rows``): in each run of ``fmt.of``, the ``fmt.keep``
        whose pruning would cost most -- a pruned weight's expected loss is its posterior second moment
        ``mu^2 + sigma^2`` times what an error there costs (:meth:`_layer_weights`: GPTQ's conditional
        precision where it runs, as SparseGPT's saliency ``w^2 / [H^-1]_ii``, else the posterior
        precision, which ranks by ``|mu| / sigma``: the weights whose posterior mass sits nearest 0 go
        first, the spike of a spike-and-slab reading of the Laplace posterior).  A function of the
        pattern alone: every bit width of one pattern prunes the same weights."""
        mu = self.view[rows]
        second = np.square(mu, dtype=np.float64) + np.broadcast_to(self.posterior.sigma2, self.view.shape)[rows]
        return top_mask(np.broadcast_to(self._layer_weights(), self.view.shape)[rows] * second, fmt.keep, fmt.of)

    def _sparse_codes(self, fmt: BayesqSparse) -> SparseCodes:
        if (fmt, "sparse") not in self._codes:
            self._codes[fmt, "sparse"] = self._sparse_round(fmt)
        return self._codes[fmt, "sparse"]

    def _sparse_round(self, fmt: BayesqSparse, rows=slice(None)) -> SparseCodes:
        """The survivors' codes (of view rows ``rows``).  Where ``X^T X`` is known, GPTQ's error feedback
        with the pruned weights fixed to 0 and their error spread over the columns still to round, as
        SparseGPT does: with runs of 2, 4 or 8 and no act_order, each run's mask chosen as rounding
        reaches it, on dynamic min/max groups or the posterior-searched grid, whichever leaves less
        layer error; else the posterior mask fixed first, on min/max groups of the survivors (and
        0).  Without ``X^T X``: the posterior mask, nearest on min/max groups."""
        view, keep = self.view[rows], self._mask(fmt, rows)
        kept = np.where(keep, view, np.float32(0))
        if self._gptq and not self._act_order and 16 % fmt.of == 0:
            # SparseGPT's N:M: each run's mask chosen when rounding reaches it, from the weights as
            # error feedback has left them (the second moment about the moved mean)
            f = self._factor()
            cost = np.where(f.dead, 0.0, 1.0 / np.square(f.diag))
            sigma2 = np.broadcast_to(self.posterior.sigma2, self.view.shape)[rows]

            def choose(c, w):
                cols = slice(c, c + w.shape[1])
                return top_mask(cost[cols] * (np.square(w, dtype=np.float64) + sigma2[:, cols]), fmt.keep, fmt.of)

            # dynamic min/max groups, and the clipping range the posterior search picks for the
            # survivors the posterior would keep (as for dense grids, :meth:`codes`): whichever
            # leaves the smaller layer output error on these rows
            prec = np.broadcast_to(self.posterior.precision, self.view.shape)[rows]
            scale, zp, _ = search_grid(DiagonalLaplace(compact(view, keep, fmt.keep, fmt.of),
                                                       compact(prec, keep, fmt.keep, fmt.of)),
                                       fmt.bits, fmt.inner_block, n_steps=7, min_shrink=0.4)
            best = None
            for grid in ((None, None), (_stored(fmt, scale), zp)):
                m = keep.copy()
                q = round_gptq(view, f, *grid, fmt.bits, fmt.block, round_scale=_rounder(fmt), mask=m,
                               prune=(fmt.of, choose))
                e = np.where(m, q.dequantize(), np.float32(0)).astype(np.float64) - view
                err = float(np.einsum("rk,rk->", e @ self.xtx, e))
                if best is None or err < best[0]:
                    best = err, q, m
            _, q, keep = best
        elif self._gptq:
            grid = (None, None) if not self._act_order else minmax_grid(kept, fmt.bits, fmt.block)
            grid = grid if grid[0] is None else (_stored(fmt, grid[0]), grid[1])
            q = round_gptq(view, self._factor(), *grid, fmt.bits, fmt.block, round_scale=_rounder(fmt), mask=keep)
        else:
            scale, zp = minmax_grid(kept, fmt.bits, fmt.block)
            q = round_rtn(kept, _stored(fmt, scale), zp, fmt.bits, fmt.block)
        inner = UniformCodes(compact(q.codes, keep, fmt.keep, fmt.of), q.scale, q.zero_point, fmt.bits, fmt.inner_block)
        return SparseCodes(keep, inner, fmt.keep, fmt.of)

    def _sparse_layer_loss(self, fmt: BayesqSparse) -> float:
        """:meth:`layer_loss` of a sparse format where GPTQ runs: the exact layer output error of the
        codes GPTQ gives :data:`SCREEN_ROWS` rows (their unbiased estimate, as :meth:`_screen_rows`).
        Not the diagonal prediction: error feedback moves the weights still to be pruned, and on
        correlated inputs the pruned weights' real cost came out 3x the prediction from their
        original values (a test case of tests/test_sparse.py); a GPTQ pass on a row sample costs
        about what a Lloyd-Max screen does."""
        rows, mult = self._screen_rows(self._layer_weights())
        if not rows.size:
            return 0.0
        e = self._sparse_round(fmt, rows).dequantize().astype(np.float64) - self.view[rows]
        return float(mult @ np.einsum("rk,rk->r", e @ self.xtx, e))

    def _sparse_expected_loss(self, fmt: BayesqSparse) -> float:
        """Closed-form expected loss of the sparse codes' grid: the survivors' as for a dense grid, the
        pruned weights' their full second moment (:func:`pruned_loss`)."""
        q = self._sparse_codes(fmt)
        prec = np.broadcast_to(self.posterior.precision, self.view.shape)
        inner = DiagonalLaplace(compact(self.posterior.mu, q.mask, fmt.keep, fmt.of),
                                compact(prec, q.mask, fmt.keep, fmt.of))
        kept = expected_loss(inner, q.inner.scale, q.inner.zero_point, fmt.bits, fmt.inner_block)
        return float(kept.sum()) + pruned_loss(self.posterior, q.mask)

    def _new_factor(self) -> SharedFactor | None:
        return None if self.xtx is None else SharedFactor(self.xtx, self._gptq_damp, self._act_order, self._backend)

    def _factor(self) -> GPTQFactor:
        return self._work.factor.get()

    def _own_gptq(self, fmt: Format) -> UniformCodes:
        """GPTQ's own codes in ``fmt``: dynamic min/max groups (the reference's default)."""
        if fmt not in self._work.own:
            self._work.own[fmt] = round_gptq(self.view, self._factor(), None, None, fmt.bits, fmt.block,
                                             round_scale=_rounder(fmt))
        return self._work.own[fmt]

    def reference(self) -> SiteQuantizer:
        """This site quantized as ``--method gptq`` does.  Without act_order it shares this one's
        GPTQ work: the factor of ``H^-1``, and GPTQ's own codes, which :meth:`codes` computes
        anyway to compare with the searched grid's (the plan check would otherwise round every
        site twice the same way)."""
        ref = SiteQuantizer(self.view, self.posterior, self.xtx, METHODS["gptq"], self._gptq_damp, backend=self._backend)
        if not self._act_order:
            ref._work = self._work
        return ref

    def dequantized(self, fmt: Format, kind: str | None = None) -> np.ndarray:
        """The weights the runtime will compute with, as a view."""
        return self.view if isinstance(fmt, Float32) else self.codes(fmt, kind).dequantize()

    def forget(self) -> None:
        """Drop cached codes and the GPTQ factor once packed: bounded memory on big models."""
        self._codes, self._work = {}, _GPTQWork(self._new_factor())
