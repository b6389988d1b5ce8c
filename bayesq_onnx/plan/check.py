"""The plan check (docs/design.md, "Plan check"): the knapsack's plan measured end to end on
held-back data against uniform plans at the same budget -- with our grids, and with the reference
GPTQ's codes -- and the best one shipped."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..parallel import parallel_map
from ..progress import Progress
from .planner import Plan
from .proxy import OutputDistortion
from .tables import Grids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contender:
    plan: Plan
    quantizers: dict          # site name -> SiteQuantizer that rounds it
    grids: Grids              # grid kinds chosen for its formats (absent: the quantizer's first)


def check_plans(contenders: list[Contender], sites, probe, held, batch_size) -> tuple[Contender, dict]:
    """The contender with the least output distortion on ``held`` (ties keep the first: the
    knapsack's), and the report's ``plan_check`` entry."""
    distortion = OutputDistortion(probe, held, batch_size)
    with Progress("plan check", len(contenders)) as p:
        scores = []
        for c in contenders:
            views = parallel_map(lambda s: s.from_view(dequantized(c, s)), sites)
            scores.append(distortion({s.name: v for s, v in zip(sites, views)}))
            p.step()
    i = int(np.argmin(scores))
    n_weights = sum(s.size for s in sites)
    report = {"metric": "relative output squared error on held-back calibration data",
              "candidates": [{"plan": c.plan.label, "bits_per_weight": c.plan.stored_bits / n_weights, "distortion": d}
                             for d, c in zip(scores, contenders)],
              "chosen": contenders[i].plan.label,
              "knapsack_vs_best_uniform": _ratio(scores[0], min(scores[1:])) if len(scores) > 1 else None}
    if i:
        log.warning("plan check: %s beats the knapsack plan on held-back data (%.3g vs %.3g); shipping it",
                    contenders[i].plan.label, scores[i], scores[0])
    return contenders[i], report


def _ratio(knapsack: float, best_other: float) -> float | None:
    """knapsack / best other distortion; both can be 0 (outputs that carry nothing, weights too small
    to change them): equal then, and no ratio when only the other is 0."""
    if best_other > 0:
        return knapsack / best_other
    return 1.0 if knapsack == 0 else None


def dequantized(c: Contender, site) -> np.ndarray:
    """The view ``c`` ships for ``site``."""
    fmt = c.plan.choice[site.name]
    return c.quantizers[site.name].dequantized(fmt, grid_of(c, site))


def grid_of(c: Contender, site) -> str:
    """The grid kind ``c`` rounds ``site`` on."""
    fmt = c.plan.choice[site.name]
    return c.quantizers[site.name].grid_kind(fmt, c.grids.get((site.name, fmt)))
