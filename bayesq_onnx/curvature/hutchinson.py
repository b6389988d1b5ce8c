"""Hutchinson estimate of the Hessian diagonal: ``diag(H) = E_z[z * (H z)]`` for Rademacher ``z``,
with ``H z`` by double backward (exact Hessian-vector products, no finite differences).

The loss is the mean over samples of
- the negative log-likelihood of given labels (its Hessian: Gauss-Newton plus the residual term,
  possibly indefinite), or
- without labels, the KL divergence from the model's own predictive at the trained weights,
  ``KL(p(.|x, w0) || p(.|x, w))``: its gradient at ``w0`` is zero and its Hessian there is the
  Fisher, i.e. the generalized Gauss-Newton matrix (positive semi-definite).

Each probe sees every sample (probes outer, batches inner, one ``z`` per probe), so the spread
across probes is the estimator's own noise, reported per tensor as the relative standard error
``||se|| / ||diag||``: ``se = s / sqrt(N)`` (``s``: per-element standard deviation over the ``N``
probes) and ``||diag||^2`` estimated without the noise's share, ``||mean||^2 - ||se||^2`` (the
plain ``||mean||`` is itself mostly noise when the signal is weak, and would pin the ratio near 1
whatever ``N``).  It falls as ``1/sqrt(N)``; ``inf`` means no signal above the noise yet.  The same
for each tensor's total (its share of the trace), which is far more precise than single entries.

Per-probe estimates ``z_i (Hz)_i`` can be negative even for a PSD ``H``, and the mean of a few
probes often is.  ``nonnegative`` makes the ``CURV.npz`` contract (>= 0) without biasing the
totals: negatives are clipped to 0 and the tensor is rescaled to its unclipped total (clipping alone
adds the positive half of the noise, measured 10x too much curvature on weakly curved tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BayesQError
from ..progress import Progress
from .fisher import Forward, Likelihood, chunks


@dataclass
class HutchinsonResult:
    diagonal: dict[str, np.ndarray]         # mean over probes, float64, unclipped
    rel_stderr: dict[str, float]            # per tensor, see the module docstring (nan with one probe, inf: no signal)
    trace_rel_stderr: dict[str, float]      # the same for the tensor's sum (its trace share)
    probes: int


def hutchinson_diagonal(forward: Forward, params: dict[str, torch.Tensor], data: dict[str, np.ndarray],
                        likelihood: Likelihood, *, labels: np.ndarray | None = None, probes: int = 32,
                        seed: int = 0, batch_size: int = 8) -> HutchinsonResult:
    if probes < 1:
        raise BayesQError(f"--probes must be >= 1, got {probes}")
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    live = dict(zip(names, leaves))
    n = len(next(iter(data.values())))
    gen = torch.Generator().manual_seed(seed)
    mean = [torch.zeros(p.shape, dtype=torch.float64) for p in leaves]
    m2 = [torch.zeros(p.shape, dtype=torch.float64) for p in leaves]    # Welford: sums of squared deviations
    sums = np.zeros((probes, len(leaves)))                               # per-probe trace estimates
    with Progress("hutchinson probes", probes) as prog:
        for k in range(probes):
            z = [torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(p.dtype) * 2 - 1 for p in leaves]
            hz = [torch.zeros(p.shape, dtype=p.dtype) for p in leaves]   # one term per batch: float32 is enough
            for start, batch in chunks(data, batch_size):
                out = forward(live, batch)
                # both losses sum over every axis, so the batch's sum is one call
                loss = likelihood.divergence(out, out) if labels is None else \
                    likelihood.nll(out, labels[start:start + out.shape[0]])
                grads = torch.autograd.grad(loss / n, leaves, create_graph=True, allow_unused=True)
                used = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if not used:
                    continue
                dot = sum((g * z[i]).sum() for i, g in used)
                hv = torch.autograd.grad(dot, [leaves[i] for i, _ in used], allow_unused=True)
                for (i, _), h in zip(used, hv):
                    if h is not None:
                        hz[i] += h
            for i in range(len(leaves)):
                d = (z[i] * hz[i]).double()
                sums[k, i] = float(d.sum())
                delta = d - mean[i]
                mean[i] += delta / (k + 1)
                m2[i] += delta * (d - mean[i])
            prog.step()
    rse, trse = {}, {}
    for i, name in enumerate(names):
        if probes > 1:
            se2 = float((m2[i] / (probes - 1) / probes).sum())
            rse[name] = _relative(se2, float(mean[i].square().sum()))
            tot = float(sums[:, i].mean())
            trse[name] = _relative(float(sums[:, i].var(ddof=1)) / probes, tot * tot)
        else:
            rse[name] = trse[name] = float("nan")
    return HutchinsonResult({k: m.numpy() for k, m in zip(names, mean)}, rse, trse, probes)


def _relative(se2: float, mean2: float) -> float:
    """``se / |signal|`` with ``signal^2 = mean^2 - se^2`` (noise removed); inf without signal."""
    signal2 = mean2 - se2
    return float(np.sqrt(se2 / signal2)) if signal2 > 0 else (float("inf") if se2 > 0 else float("nan"))


def nonnegative(diag: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip to >= 0 and rescale to the unclipped total (0 if that is <= 0); and the count clipped."""
    neg = int((diag < 0).sum())
    clipped = np.maximum(diag, 0.0)
    total, kept = float(diag.sum()), float(clipped.sum())
    if kept > 0:
        clipped *= max(total, 0.0) / kept
    return clipped, neg
