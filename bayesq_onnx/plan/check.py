"""The plan check (docs/design.md, "Plan check"): the knapsack's plan measured end to end on
held-back data against uniform plans at the same budget -- with our grids, and with the reference
GPTQ's codes -- (and, where it pruned, against its dense twin) and the best one shipped."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import memory
from ..parallel import parallel_map, side_by_side, workers
from ..progress import Progress
from .planner import Plan
from .proxy import OutputDistortion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contender:
    plan: Plan
    # rounded by the reference GPTQ as --method gptq does, not with our grids; calibrated like every
    # contender on the fitting data only (--method gptq uses all of it: docs/design.md, "Plan check")
    reference: bool = False
    # one format everywhere: a baseline the report rates the knapsack against (its dense twin is not)
    uniform: bool = False


def check_plans(contenders: list[Contender], packed: list[dict], sites, stream, probe, held, batch_size
                ) -> tuple[int, dict]:
    """The contender with the least output distortion on ``held`` (ties keep the first: the
    knapsack's), and the report's ``plan_check`` entry.  ``packed``: each contender's packed tensors
    per site; held-back data runs through the model a segment at a time (``runtime/stream.py``), each
    segment on its sites' weights decoded from them, so only one segment's weights are unpacked."""
    scores = held_back_distortions(contenders, packed, sites, stream, probe, held, batch_size, "plan check")
    i = int(np.argmin(scores))
    n_weights = sum(s.size for s in sites)
    uniform = [d for d, c in zip(scores, contenders) if c.uniform]
    report = {"metric": "relative output squared error on held-back calibration data",
              "candidates": [{"plan": c.plan.label, "bits_per_weight": c.plan.stored_bits / n_weights, "distortion": d}
                             for d, c in zip(scores, contenders)],
              "chosen": contenders[i].plan.label,
              "knapsack_vs_best_uniform": _ratio(scores[0], min(uniform)) if uniform else None}
    if i:
        log.warning("plan check: %s beats the knapsack plan on held-back data (%.3g vs %.3g); shipping it",
                    contenders[i].plan.label, scores[i], scores[0])
    return i, report


def held_back_distortions(contenders: list[Contender], packed: list[dict], sites, stream, probe, held, batch_size,
                          what: str) -> list[float]:
    """Each contender's output distortion on ``held``, from its packed tensors (:func:`check_plans`).
    The contenders go in lanes side by side, one per worker (``parallel.side_by_side``): a pass over
    the model runs its segment sessions one at a time, on one core."""
    distortion = OutputDistortion(probe, held, batch_size)
    by_name = {s.name: s for s in sites}

    def score(c: Contender, arrays: dict) -> float:
        states, last = stream.start(held, batch_size), len(stream) - 1
        for k in range(last + 1):
            names = [t for t in stream.reads[k] if t in arrays]
            weights = dict(zip(names, parallel_map(lambda t: decoded(c, arrays[t], by_name[t]), names)))
            if k < last:
                stream.advance(k, states, weights, [])
        # the outputs one batch at a time: a language model's logits are 200 MB a batch
        out = distortion.of_outputs(stream.advance(last, [st], weights)[0] for st in states)
        memory.release()
        return out

    with Progress(what, len(contenders)) as p:
        def lane(idx: list[int]) -> list[float]:
            out = []
            for i in idx:
                out.append(score(contenders[i], packed[i]))
                p.step()
            return out

        n = max(1, min(workers(), len(contenders)))
        lanes = [list(range(j, len(contenders), n)) for j in range(n)]
        scores = [0.0] * len(contenders)
        for idx, got in zip(lanes, side_by_side(lane, lanes)):
            for i, v in zip(idx, got):
                scores[i] = v
    return scores


def decoded(c: Contender, arrays: dict[str, np.ndarray], site) -> np.ndarray:
    """The weight ``c`` ships for ``site``, decoded from its packed tensors as the runtime does."""
    fmt = c.plan.choice[site.name]
    return site.from_view(fmt.unpack(arrays, site.rows, site.L).dequantize())


def quantized_weights(c: Contender, packed: dict):
    """Sequential mode's feedback (``Analysis.blocks``): the weights ``c`` ships for a block's sites,
    decoded from ``packed`` (filled as the block is rounded); an fp32 site is not in it and stays."""
    def weights(block) -> dict[str, np.ndarray]:
        mine = [s for s in block if s.name in packed]
        return dict(zip([s.name for s in mine], parallel_map(lambda s: decoded(c, packed[s.name], s), mine)))
    return weights


def _ratio(knapsack: float, best_other: float) -> float | None:
    """knapsack / best other distortion; both can be 0 (outputs that carry nothing, weights too small
    to change them): equal then, and no ratio when only the other is 0."""
    if best_other > 0:
        return knapsack / best_other
    return 1.0 if knapsack == 0 else None
