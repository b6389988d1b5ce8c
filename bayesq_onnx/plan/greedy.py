"""Greedy multiple-choice knapsack: each block gets one candidate format; spend a bit budget where
it buys the largest loss drop per stored bit (docs/design.md, "Allocation").

Quality bound: upgrades along each block's lower convex hull, taken in ratio order up to the first
one that does not fit, are the LP-relaxation optimum minus a fraction of that one upgrade.  The
LP optimum is a lower bound on the exact optimum, so the greedy loss exceeds the optimum by less
than the loss drop of a single hull upgrade; continuing with upgrades that still fit (and, once no
hull upgrade fits, with off-hull ones) only lowers it further.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from ..errors import BayesQError


class InfeasibleBudget(BayesQError, ValueError):
    """Even the cheapest candidate of every block exceeds the budget."""


@dataclass(frozen=True)
class Step:
    """One upgrade taken: block ``block`` went from candidate ``from_`` to ``to`` because it
    bought ``loss_drop`` for ``extra_bits`` (``ratio``), the best ratio that still fit."""

    block: int
    from_: int
    to: int
    ratio: float
    extra_bits: float
    loss_drop: float


@dataclass(frozen=True)
class Allocation:
    choice: list[int]        # candidate index per block
    total_cost: float
    total_loss: float
    steps: list[Step]        # in the order taken (empty for the exact solver)


def _check(costs, losses) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(costs) != len(losses):
        raise ValueError(f"{len(costs)} cost arrays but {len(losses)} loss arrays")
    cs = [np.asarray(c, np.float64) for c in costs]
    ls = [np.asarray(v, np.float64) for v in losses]
    for b, (c, v) in enumerate(zip(cs, ls)):
        if c.ndim != 1 or c.shape != v.shape or c.size == 0:
            raise ValueError(f"block {b}: costs {c.shape} and losses {v.shape} must be equal, non-empty 1-D")
        if not np.all(np.isfinite(c)) or np.any(np.isnan(v)) or np.any(v == -np.inf):
            raise ValueError(f"block {b}: costs must be finite and losses finite or +inf")
    return cs, ls


def _cheapest(c: np.ndarray, v: np.ndarray) -> int:
    return int(np.lexsort((v, c))[0])     # least cost, then least loss


def lower_hull(costs, losses) -> list[int]:
    """Indices of the lower convex hull of the points ``(cost, loss)``, by increasing cost, that a
    greedy upgrade path visits: it starts at the cheapest candidate and keeps only candidates that
    lower the loss, so loss drop per extra bit never increases along it.  Collinear points are
    kept (smaller steps fit tighter budgets).  ``+inf`` losses are never visited, except the
    start when the cheapest candidate has one."""
    c, v = np.asarray(costs, np.float64), np.asarray(losses, np.float64)
    start = _cheapest(c, v)
    hull = [start]
    for j in np.lexsort((v, c)):
        if not np.isfinite(v[j]) or c[j] <= c[hull[-1]] or v[j] >= v[hull[-1]]:
            continue   # off the Pareto front: costs no more than, or loses no less than, the last
        # drop the last point while it lies above the chord from the one before it to j
        while len(hull) >= 2 and np.isfinite(v[a := hull[-2]]) and (
                (v[hull[-1]] - v[a]) * (c[j] - c[a]) > (v[j] - v[a]) * (c[hull[-1]] - c[a])):
            hull.pop()
        hull.append(int(j))
    return hull


def _ratio(drop: float, extra: float) -> float:
    return math.inf if drop == math.inf else drop / extra


def greedy_allocate(costs: list[np.ndarray], losses: list[np.ndarray], budget: float) -> Allocation:
    """Start every block at its cheapest candidate; repeatedly take the fitting upgrade with the
    largest (loss drop) / (extra bits) until none fits.  ``costs[b][j]`` are stored bits of
    candidate ``j`` of block ``b``, ``losses[b][j]`` its loss (``+inf``: never choose)."""
    cs, ls = _check(costs, losses)
    choice = [_cheapest(c, v) for c, v in zip(cs, ls)]
    total = math.fsum(c[j] for c, j in zip(cs, choice))
    if total > budget:
        raise InfeasibleBudget(f"budget {budget:g} bits is below the minimum achievable {total:g} bits "
                               "(every block at its cheapest candidate)")
    steps: list[Step] = []

    def take(b: int, j: int) -> None:
        nonlocal total
        i = choice[b]
        extra, drop = float(cs[b][j] - cs[b][i]), float(ls[b][i] - ls[b][j])
        steps.append(Step(b, i, j, _ratio(drop, extra), extra, drop))
        choice[b], total = j, total + extra

    # Hull upgrades in ratio order.  Ratios fall along each hull, so a heap holding each block's
    # next upgrade yields them in global order; one that does not fit never will (the remaining
    # budget only shrinks), so that block leaves the heap.
    hulls = [lower_hull(c, v) for c, v in zip(cs, ls)]
    heap = []

    def push(b: int, pos: int) -> None:
        if pos + 1 < len(hulls[b]):
            i, j = hulls[b][pos], hulls[b][pos + 1]
            heapq.heappush(heap, (-_ratio(ls[b][i] - ls[b][j], cs[b][j] - cs[b][i]), b, pos))

    for b in range(len(cs)):
        push(b, 0)
    while heap:
        _, b, pos = heapq.heappop(heap)
        j = hulls[b][pos + 1]
        if total + (cs[b][j] - cs[b][choice[b]]) <= budget:
            take(b, j)
            push(b, pos + 1)

    # Leftover budget smaller than every next hull step: off-hull candidates may still fit.
    # Padded (blocks, candidates) tables; padding costs +inf, so it never fits.
    C = np.full((len(cs), max(c.size for c in cs)), np.inf)
    V = np.full_like(C, np.inf)
    for b, (c, v) in enumerate(zip(cs, ls)):
        C[b, :c.size], V[b, :v.size] = c, v
    rows = np.arange(len(cs))
    with np.errstate(invalid="ignore"):   # inf - inf on padding: nan, which compares False
        while True:
            extra = C - C[rows, choice][:, None]
            drop = V[rows, choice][:, None] - V
            ok = (extra > 0) & (drop > 0) & (total + extra <= budget)
            if not ok.any():
                break
            r = np.where(ok, drop / np.where(ok, extra, 1.0), -np.inf)
            b, j = np.unravel_index(int(np.argmax(r)), r.shape)
            take(int(b), int(j))

    return Allocation(choice, math.fsum(c[j] for c, j in zip(cs, choice)),
                      math.fsum(v[j] for v, j in zip(ls, choice)), steps)
