"""Loss tables, the knapsack's input: one pass per source (``Recipe.tables``, docs/design.md "Loss
tables").  Each takes some sites (a segment's worth at a time), their candidates and quantizers
and returns :class:`Tables`: a loss per (site, candidate), and the grid each measured format is to
be rounded on.  Quantizers only
cache what they compute; every choice is in what a pass returns.

Within a site the candidates off the lower convex hull of (stored bits, loss) are never worth
taking: they get +inf without being rounded or measured.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..formats import CODEBOOKS, BayesqSparse, Float32, Format
from ..parallel import parallel_map
from .greedy import lower_hull
from .planner import Plan
from .proxy import OutputDistortion

Grids = dict[tuple[str, Format], str]   # (site name, format) -> grid kind chosen by measurement


@dataclass(frozen=True)
class Tables:
    losses: dict[str, np.ndarray]                  # site -> loss per candidate (+inf: off the hull)
    grids: Grids = field(default_factory=dict)


class KronTables:
    """The layer output error each candidate is predicted to leave (:meth:`SiteQuantizer.layer_loss`,
    no rounding), times the site's end-to-end factor: the model's output distortion per unit of
    layer output error, measured once per site with one candidate's real codes.  The output-side
    factor of a Kronecker-factored curvature, reduced to a scalar: on MiniLM it varies by 200x
    between sites and by +-15% between the formats of one site.  Not so on convolutions and in an
    embedding table's 2-bit range: there candidates are measured each (:func:`_measured_below`).
    Measured from the site's segment of the model on (``OutputDistortion.segmented``), on
    ``recipe.scale_samples`` samples that the quantizers' ``X^T X`` leave out (``factor_unseen``):
    GPTQ fits the rows it is calibrated on, and how much of that fit other rows lose differs
    from site to site (docs/design.md, "Loss tables")."""

    name = "kron"
    uniform_checked = 0   # the plan check measures the knapsack against the reference GPTQ plan only
    factor_unseen = True  # the factor's samples are left out of the X^T X its layer errors come from

    def __init__(self, distortion: OutputDistortion, sites):
        self.distortion, self._names, self._from_segment = distortion, [s.name for s in sites], None
        self._lock = threading.Lock()   # blocks in flight at once (parallel.Overlap) ask for the cut together

    def __call__(self, sites, candidates, quantizers) -> Tables:
        from_segment = self._segmented()

        def site_table(s) -> np.ndarray:
            q, fs = quantizers[s.name], candidates[s.name]
            table, hull = _hull_table(s, fs, q.layer_loss)
            ref = _scale_reference(s, fs, hull)
            if ref is not None:
                codes = q.quick_codes(fs[ref])
                err = q.layer_error(codes)
                table[hull] *= from_segment({s.name: s.from_view(codes.dequantize())}) / err if err > 0 else 0.0
                for j in _measured_below(s, fs, hull, ref, q):
                    table[j] = from_segment({s.name: s.from_view(q.quick_codes(fs[j]).dequantize())})
            return table

        return Tables(_per_site(sites, site_table))

    def _segmented(self):
        with self._lock:
            if self._from_segment is None:   # cut once for all the sites, whichever part is asked for first
                self._from_segment = self.distortion.segmented(self._names)
            return self._from_segment

    def grids_for(self, plan: Plan, sites, quantizers, known: Grids) -> Grids:
        """Where a site offers several grids for its planned format (grouped Conv and Gather: no
        ``X^T X`` for GPTQ to judge them by), the best of them measured end to end (from the site's
        segment on), as the proxy tables do for every candidate: the diagonal expected loss that
        the search minimises can favour clipping the model does not tolerate.  Formats in
        ``known`` are not measured again."""
        measure = self._segmented()

        def choose(s):
            q, f = quantizers[s.name], plan.choice[s.name]
            kinds = q.grid_kinds(f)
            if len(kinds) < 2 or (s.name, f) in known:
                return None
            return min((measure({s.name: s.from_view(q.dequantized(f, k))}), k) for k in kinds)[1]

        return {(s.name, plan.choice[s.name]): k for s, k in zip(sites, parallel_map(choose, sites)) if k}


class ProxyTables:
    """The task-aware distortion measured for every candidate on the site's hull (pre-screened by
    the closed form at sigma -> 0): a dozen forward passes of the site's cone each, on
    ``recipe.proxy_samples`` samples.  Where several grids are on offer, each is measured and the
    best kept."""

    name = "proxy"
    uniform_checked = 3   # uniform plans with our grids measured beside the knapsack's
    factor_unseen = False  # its 32 samples, left out, would leave X^T X too few

    def __init__(self, distortion: OutputDistortion, sites=None):
        self.distortion = distortion

    def __call__(self, sites, candidates, quantizers) -> Tables:
        def site_table(s) -> tuple[np.ndarray, Grids]:
            q, fs = quantizers[s.name], candidates[s.name]
            table, hull = _hull_table(s, fs, q.screen_loss)
            grids: Grids = {}
            measure = self.distortion.restricted_to([s.name])   # only the part of the model it reaches
            for j in hull:
                if isinstance(fs[j], Float32):
                    table[j] = 0.0
                    continue
                table[j], grids[s.name, fs[j]] = min(
                    (measure({s.name: s.from_view(q.dequantized(fs[j], k))}), k) for k in q.grid_kinds(fs[j]))
            return table, grids

        per_site = _per_site(sites, site_table)
        return Tables({name: table for name, (table, _) in per_site.items()},
                      {k: v for _, grids in per_site.values() for k, v in grids.items()})

    def grids_for(self, plan: Plan, sites, quantizers, known: Grids) -> Grids:
        return {}   # every hull candidate's grids were measured with the tables


class ClosedFormTables:
    """The posterior-expected loss itself: comparable across sites only when the curvature is that
    of one global loss (gradient curvature from a file)."""

    name = "closed_form"
    uniform_checked = 3
    factor_unseen = False

    def __call__(self, sites, candidates, quantizers) -> Tables:
        def site_table(s) -> np.ndarray:
            q, fs = quantizers[s.name], candidates[s.name]
            table, hull = _hull_table(s, fs, q.screen_loss)
            table[hull] = [q.expected_loss(fs[j]) for j in hull]
            return table

        return Tables(_per_site(sites, site_table))

    def grids_for(self, plan: Plan, sites, quantizers, known: Grids) -> Grids:
        return {}


class HawqTables:
    """HAWQ-V2/V3's sensitivity, the field's mixed-precision baseline (``--method hawq``): the mean
    Hessian trace of one global loss over the site's weights, ``Tr(H_i) / n_i``, times the squared
    quantization error ``||W - Q(W)||^2`` of the candidate on the min/max grid rounded to nearest (or
    its codebook's levels; :meth:`SiteQuantizer.weight_error`), as the papers define it: the
    perturbation of the quantizer, before GPTQ's error feedback, which moves weights on purpose and
    whose larger weight-space error would rank formats by how much GPTQ compensated, not by harm.
    The traces come from ``curvature/trace.py``; nothing is rounded or measured here."""

    name = "hawq"
    uniform_checked = 0   # its uniform plans with GPTQ's own codes are the reference GPTQ plan
    factor_unseen = False

    def __init__(self, traces: dict[str, float]):
        self.traces = traces

    def __call__(self, sites, candidates, quantizers) -> Tables:
        def site_table(s) -> np.ndarray:
            table, hull = _hull_table(s, candidates[s.name], quantizers[s.name].weight_error)
            # off the hull stays +inf: a trace of 0 (no gradient reaches the site) makes every
            # format on it free, and 0 * inf would be NaN
            table[hull] *= self.traces[s.name]
            return table

        return Tables(_per_site(sites, site_table))

    def grids_for(self, plan: Plan, sites, quantizers, known: Grids) -> Grids:
        return {}   # one grid per format: GPTQ's own (dynamic) min/max groups


MEASURED = {t.name: t for t in (KronTables, ProxyTables)}   # the passes built on an OutputDistortion


def _per_site(sites, site_table) -> dict:
    """``site_table`` of every site, by site name (it returns all it finds: parallel.py)."""
    return dict(zip((s.name for s in sites), parallel_map(site_table, sites)))


def _hull_table(site, formats, screen) -> tuple[np.ndarray, list[int]]:
    """A table that is +inf off the lower convex hull of (stored bits, ``screen``) and holds the
    screen on it, and the hull (by stored bits).  With sparse candidates, the dense candidates' own
    hull is kept too: the plan check's dense twin (planner.dense_knapsack_plan) chooses among them."""
    costs = np.array([f.stored_bits(site.rows, site.L) for f in formats], np.float64)
    values = np.array([screen(f) for f in formats])
    hull = set(lower_hull(costs, values))
    dense = [j for j, f in enumerate(formats) if not isinstance(f, BayesqSparse)]
    if len(dense) < len(formats):
        hull |= {dense[i] for i in lower_hull(costs[dense], values[dense])}
    hull = sorted(hull, key=lambda j: costs[j])
    table = np.full(len(formats), np.inf)
    table[hull] = values[hull]
    return table, hull


# kron's factors see at least this many output positions, from at least SCALE_MIN_SAMPLES samples
SCALE_POSITIONS = 512
SCALE_MIN_SAMPLES = 4


def factor_samples(positions: int, most: int) -> int:
    """How many calibration samples ``kron`` measures its factors on, when each sample's outputs
    span ``positions`` positions (a language model's tokens; 1 for a pooled embedding or a class):
    enough for :data:`SCALE_POSITIONS` of them, never fewer than :data:`SCALE_MIN_SAMPLES`, never
    more than ``most`` (``recipe.scale_samples``).  A measurement costs its samples' tokens, and
    a factor's noise falls with the positions it averages, not only the samples: SmolLM2 (128
    tokens a sample) on 4 samples instead of 8 read perplexity 95.5 / 76.4 / 67.0 at 3.0 / 3.5 /
    4.0 bits against 95.0 / 77.4 / 67.6, with the tables 40% shorter; MiniLM, one embedding a
    sample, lost on 4 (cosine 0.9824 against 0.9846 at 4.0 bits), and keeps 8 (docs/design.md,
    "Loss tables")."""
    return max(min(SCALE_MIN_SAMPLES, most), min(most, -(-SCALE_POSITIONS // max(positions, 1))))


# an embedding table's candidates storing fewer bits per weight than this are measured each
TABLE_LINEAR_BITS = 3.0


def _measured_below(site, formats, hull, ref: int, q) -> list[int]:
    """The hull candidates of a site whose ``kron`` entry is their own measured distortion instead
    of the scalar factor's product.  On a table that is only looked up, those that store fewer than
    :data:`TABLE_LINEAR_BITS` bits per weight: their error leaves the range where the output's
    distortion grows as its square (MiniLM's word embedding at nf2: 0.045 per unit of its error's
    squared scale at a tenth of it, 0.111 at its full size; lut2 0.033 and 0.042; its 3-bit ones
    1.02x and 1.05x), and the table is half of MiniLM's weights.  On a convolution that GPTQ rounds
    (it has an ``X^T X``), those that store fewer bits than the factor's reference.  There the
    distortion per unit of layer output error is not one number (a pointwise convolution's output
    channels meet very different downstream gains): on EfficientNet-lite0 at 3 bits, even the exact layer error of each
    candidate's codes times the factor left KL 0.55, measuring every candidate 0.38 (tables 27 s
    instead of 7), and measuring only those below the reference the same 0.38 (13 s)
    (docs/design.md, "Loss tables").  Matmul sites keep the scalar: measuring their cheaper
    candidates too changed nothing measured on that model's classifier head and did not help on MiniLM
    (cosine 0.965 against 0.970 at 3.6 bits, level elsewhere), and a language model has hundreds
    of them, where one measurement each is already most of the analysis."""
    if site.kind.only_looked_up:
        below = TABLE_LINEAR_BITS * site.size
    elif site.kind.convolved and q.xtx is not None:
        below = formats[ref].stored_bits(site.rows, site.L)
    else:
        return []
    return [j for j in hull if not isinstance(formats[j], Float32) and formats[j].stored_bits(site.rows, site.L) < below]


def _scale_reference(site, formats, hull) -> int | None:
    """The candidate whose real codes measure a site's end-to-end factor under ``kron``: an affine
    one on the hull (one rounding; codebooks need Lloyd-Max first), nearest to 4 bits per weight,
    where errors are small enough to stay linear and large enough to measure (a dense grid: a
    pruned weight's error is no small perturbation)."""
    affine = [j for j in hull if not isinstance(formats[j], (Float32, *CODEBOOKS, BayesqSparse))] or \
             [j for j in hull if not isinstance(formats[j], Float32)]
    if not affine:
        return None
    return min(affine, key=lambda j: abs(formats[j].stored_bits(site.rows, site.L) / site.size - 4.0))
