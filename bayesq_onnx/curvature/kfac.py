"""K-FAC factors of the Fisher for linear sites (``y = x W``: MatMul with a weight initializer, or Gemm).

Per site, from the same backward passes as the diagonal Fisher (same labels, same weights):
- ``A = sum_rows x x^T / R``   (R rows of x over the calibration set: the input factor, ``X^T X / R``)
- ``G = sum_terms weight * sum_rows g g^T / n``  (``g = d loss / d y`` per row, n samples)
so that the Fisher block of ``W`` (in, out) is approximately ``A (x) G``, the row index of ``W``
running over ``A`` and its column index over ``G`` (the "expand" convention for sequences: one
sample contributes all its rows).  A weight read by several linear nodes pools its rows over the uses.
Gemm with ``transB`` stores ``W`` as (out, in); the factors are still (in, in) and (out, out).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..progress import Progress
from .fisher import FisherPlan, Likelihood, SquareSums, backward_rows, chunks, group_size, output_cotangents


@dataclass(frozen=True)
class LinearSite:
    weight: str     # initializer name
    x: str          # the node's input tensor
    y: str          # the node's output tensor


def linear_sites(graph, params: dict) -> list[LinearSite]:
    """MatMul / Gemm nodes whose second input is a rank-2 weight (a ``PlainGraph`` from onnx_torch)."""
    sites = []
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] in params \
                and params[node.inputs[1]].dim() == 2 and not node.attrs.get("transA", 0):
            sites.append(LinearSite(node.inputs[1], node.inputs[0], node.outputs[0]))
    return sites


def fisher_and_kfac(run, params: dict[str, torch.Tensor], data: dict[str, np.ndarray], likelihood: Likelihood,
                    plan: FisherPlan, labels, seed: int, unit: int, sites: list[LinearSite]):
    """Diagonal Fisher (as ``fisher.fisher_diagonal``) and K-FAC factors in one pass.
    ``run(params, batch, keep) -> (output, {name: tensor})`` exposes the sites' x and y."""
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    live = dict(zip(names, leaves))
    acc = SquareSums([p.shape for p in leaves])
    ynames = sorted({s.y for s in sites})
    keep = sorted({s.x for s in sites} | set(ynames))
    a_sum, g_sum, rows, out_dim = {}, {}, {}, {}
    rng = np.random.default_rng(seed)
    group = group_size(params)
    n = len(next(iter(data.values())))
    with Progress("fisher + k-fac", n) as prog:
        for start, batch in chunks(data, unit):
            out, kept = run(live, batch, keep)
            for s in sites:
                x = kept[s.x].detach().double()
                x = x.reshape(-1, x.shape[-1])
                a_sum[s.weight] = a_sum.get(s.weight, 0) + x.T @ x
                rows[s.weight] = rows.get(s.weight, 0) + x.shape[0]
                out_dim[s.weight] = kept[s.y].shape[-1]
            v = output_cotangents(out, likelihood, plan, labels, start, rng)
            for grads in backward_rows(out, leaves + [kept[y] for y in ynames], v, group):
                acc.add(grads[:len(leaves)])
                ygrad = dict(zip(ynames, grads[len(leaves):]))
                for s in sites:
                    g = ygrad[s.y]
                    if g is not None:
                        g = g.double().reshape(-1, g.shape[-1])
                        g_sum[s.weight] = g_sum.get(s.weight, 0) + g.T @ g
            prog.step(out.shape[0])
    fisher = {k: (a / n).numpy() for k, a in zip(names, acc.result())}
    factors = {}
    for wname in dict.fromkeys(s.weight for s in sites):
        factors[f"A/{wname}"] = (a_sum[wname] / rows[wname]).numpy()
        g = g_sum.get(wname)
        factors[f"G/{wname}"] = (g / n).numpy() if g is not None else np.zeros((out_dim[wname],) * 2)
    return fisher, factors
