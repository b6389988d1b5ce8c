"""Plans: which format each site gets.  A knapsack over loss tables, or one format everywhere."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import BayesQError
from ..formats import CODEBOOKS, BayesqSparse, Float32, Format
from ..types import WeightSite
from .greedy import InfeasibleBudget, greedy_allocate


@dataclass(frozen=True)
class Plan:
    label: str
    choice: dict[str, Format]           # site name -> format
    stored_bits: int
    steps: tuple = field(default=(), compare=False)  # greedy's upgrade records, for the report


def plan_bits(sites: list[WeightSite], choice: dict[str, Format]) -> int:
    return sum(choice[s.name].stored_bits(s.rows, s.L) for s in sites)


def cheapest_bits(sites: list[WeightSite], candidates: dict[str, list[Format]]) -> int:
    return sum(min(f.stored_bits(s.rows, s.L) for f in candidates[s.name]) for s in sites)


def check_budget(sites, candidates, budget: float) -> None:
    """``budget`` in stored bits per weight: an error when even the cheapest formats exceed it."""
    n_weights = sum(s.size for s in sites)
    low = cheapest_bits(sites, candidates)
    if low > budget * n_weights:
        raise BayesQError(f"budget {budget:g} bits/weight cannot be met: the cheapest formats need "
                          f"{low / n_weights:.3f} bits/weight")


def uniform_plans(sites: list[WeightSite], candidates: dict[str, list[Format]], budget_bits: float) -> list[Plan]:
    """One (bits, block) for every site -- each site takes that format, or else its cheapest format of
    at least those bits -- keeping those within budget, most stored bits first."""
    # uniform means one dense affine grid everywhere: codebook and sparse formats are the knapsack's alone
    affine = {k: [f for f in fs if not isinstance(f, (*CODEBOOKS, BayesqSparse))] for k, fs in candidates.items()}
    keys = sorted({(f.bits, f.block) for fs in affine.values() for f in fs if not isinstance(f, Float32)})
    plans = {}
    for bits, block in keys:
        choice = {}
        for s in sites:
            fs = affine[s.name]
            exact = [f for f in fs if (f.bits, f.block) == (bits, block)]
            wider = [f for f in fs if f.bits >= bits] or fs
            choice[s.name] = exact[0] if exact else min(wider, key=lambda f: f.stored_bits(s.rows, s.L))
        total = plan_bits(sites, choice)
        if total <= budget_bits:
            plans[(bits, block)] = Plan(f"uniform b{bits}-g{block}", choice, total)
    return sorted(plans.values(), key=lambda p: (-p.stored_bits, p.label))


def knapsack_plan(sites: list[WeightSite], candidates: dict[str, list[Format]],
                  losses: dict[str, np.ndarray], budget_bits: float) -> Plan:
    """BayesQ's allocation: greedy loss drop per stored bit until the budget is spent."""
    costs = [np.array([f.stored_bits(s.rows, s.L) for f in candidates[s.name]], np.float64) for s in sites]
    try:
        alloc = greedy_allocate(costs, [np.asarray(losses[s.name], np.float64) for s in sites], budget_bits)
    except InfeasibleBudget as e:
        raise BayesQError(str(e)) from None
    choice = {s.name: candidates[s.name][j] for s, j in zip(sites, alloc.choice)}
    return Plan("knapsack", choice, plan_bits(sites, choice), tuple(alloc.steps))


def dense_knapsack_plan(sites: list[WeightSite], candidates: dict[str, list[Format]], losses: dict[str, np.ndarray],
                        budget_bits: float, knapsack: Plan) -> Plan | None:
    """The knapsack's plan with no sparse format on offer, when ``knapsack`` took one and a dense plan
    fits the budget: the plan check then ships pruning only where it beats this on held-back data
    (a pruned plan the tables favoured lost to the dense one on EfficientNet: docs/design.md)."""
    if not any(isinstance(f, BayesqSparse) for f in knapsack.choice.values()):
        return None
    dense = {k: [j for j, f in enumerate(fs) if not isinstance(f, BayesqSparse)] for k, fs in candidates.items()}
    try:
        plan = knapsack_plan(sites, {k: [candidates[k][j] for j in js] for k, js in dense.items()},
                             {k: np.asarray(losses[k])[js] for k, js in dense.items()}, budget_bits)
    except BayesQError:
        return None     # the budget needs pruning somewhere
    return replace(plan, label="knapsack dense")
