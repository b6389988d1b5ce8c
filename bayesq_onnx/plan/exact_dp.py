"""Exact multiple-choice knapsack by dynamic programming over integer costs: the yardstick the
greedy allocator is tested against on small instances (time and memory ~ blocks x budget)."""
from __future__ import annotations

import math

import numpy as np

from .greedy import Allocation, InfeasibleBudget, _check


def exact_allocate(costs: list[np.ndarray], losses: list[np.ndarray], budget: float) -> Allocation:
    """Minimum total loss with exactly one candidate per block and total cost <= ``budget``.
    Costs must be non-negative integers and losses finite."""
    cs, ls = _check(costs, losses)
    if any(np.any(c < 0) or np.any(c != np.round(c)) for c in cs):
        raise ValueError("exact_allocate needs non-negative integer costs")
    if not all(np.all(np.isfinite(v)) for v in ls):
        raise ValueError("exact_allocate needs finite losses (+inf would read as infeasible)")
    cap = int(math.floor(budget))
    if cap < 0 or sum(int(c.min()) for c in cs) > cap:
        raise InfeasibleBudget(f"budget {budget:g} is below the minimum achievable "
                               f"{sum(int(c.min()) for c in cs)}")
    best = np.zeros(cap + 1)            # best[k]: least loss of the blocks so far within cost k
    picks = []
    for c, v in zip(cs, ls):
        cand = np.full((c.size, cap + 1), np.inf)
        for j, (cj, vj) in enumerate(zip(c.astype(int), v)):
            if cj <= cap:
                cand[j, cj:] = best[:cap + 1 - cj] + vj
        pick = np.argmin(cand, axis=0)
        best = cand[pick, np.arange(cap + 1)]
        picks.append(pick)
    choice, k = [], cap
    for c, pick in zip(reversed(cs), reversed(picks)):
        j = int(pick[k])
        choice.append(j)
        k -= int(c[j])
    choice.reverse()
    return Allocation(choice, math.fsum(c[j] for c, j in zip(cs, choice)),
                      math.fsum(v[j] for v, j in zip(ls, choice)), [])
