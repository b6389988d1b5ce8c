"""Diagonal Fisher ``E[g^2]`` of per-sample gradients, with labels drawn from the model's own
predictive (no labels needed), their exact expectation, or given labels (the empirical Fisher).

The model is any differentiable ``forward(params, batch) -> output`` (the ONNX interpreter of
``onnx_torch`` or a torch module through ``torch.func.functional_call``); ``output`` has samples
on axis 0.  The per-sample loss is the negative log-likelihood summed over the output's positions:

- ``categorical``: ``-sum_t log softmax(f_t)[y_t]`` over the last axis (``t`` runs over the other
  axes, e.g. sequence positions); negative labels are ignored (padding).
- ``gaussian``: ``0.5 * sum (f - y)^2``, unit variance: the Fisher is then ``J^T J`` of the raw
  output, so it scales with the output's units (embeddings, regression heads).

Result: ``F_i = (1/n) sum_n E_y[(d loss_n / d w_i)^2]`` per weight, float64, in the weight's shape.
Without labels the expectation over ``y`` is exact when it is affordable (a sample's output entries
times the number of weights at most ``EXACT_BUDGET``: one gradient row per output entry), else a
Monte Carlo average over ``draws`` sampled labels per input (default 1).
Exact: the output Fisher factors as ``sum_k v_k v_k^T`` (categorical, per position:
``diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T``; positions are independent and each score has
mean zero, so cross terms vanish; gaussian: the identity), and ``F = sum_k (J^T v_k)^2``.
Every gradient is a backward pass of an output cotangent ``v`` (``J^T v``), batched
(``is_grads_batched``) when several share one forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import BayesQError
from ..progress import Progress

EXACT_BUDGET = 1 << 28   # output entries x weights per sample up to which the label expectation is exact

Forward = Callable[[dict, dict], torch.Tensor]


# ----------------------------------------------------------------------------- likelihoods


class Likelihood:
    name = "base"

    def nll(self, f: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        """Loss of one sample's output ``f`` (no sample axis) against labels ``y``."""
        raise NotImplementedError

    def sample(self, f: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        """Labels for one sample drawn from the model's predictive at ``f``."""
        raise NotImplementedError

    def grad_out(self, f: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        """``d nll / d f`` (detached, ``f``'s shape): the cotangent whose backward is the sample's gradient."""
        raise NotImplementedError

    def exact_cotangents(self, f: torch.Tensor) -> torch.Tensor:
        """Rows ``v_k`` (``(K,) + f.shape``) with ``sum_k v_k v_k^T = E_y[grad_f nll grad_f nll^T]``, the
        Fisher of the output, so that ``E_y[(grad_w nll)^2] = sum_k (J^T v_k)^2`` exactly."""
        raise NotImplementedError

    def divergence(self, f: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """``KL(p(.|f0) || p(.|f))`` for one sample: zero with zero gradient at ``f = f0``, its Hessian
        there is the Fisher (Gauss-Newton) of this likelihood."""
        raise NotImplementedError

    def check_labels(self, labels: np.ndarray, out_shape: tuple[int, ...], n: int) -> np.ndarray:
        raise NotImplementedError


class Categorical(Likelihood):
    name = "categorical"

    def nll(self, f, y):
        logp = torch.log_softmax(f, dim=-1).reshape(-1, f.shape[-1])
        y = torch.from_numpy(np.asarray(y, np.int64).reshape(-1))
        keep = y >= 0
        return -logp[keep.nonzero().reshape(-1), y[keep]].sum()

    def sample(self, f, rng):
        p = torch.softmax(f.detach().double(), dim=-1).reshape(-1, f.shape[-1]).numpy()
        cdf = np.cumsum(p, axis=1)
        u = rng.random((p.shape[0], 1)) * cdf[:, -1:]   # inverse CDF: deterministic for a seed
        y = np.minimum((cdf < u).sum(axis=1), p.shape[1] - 1)
        return y.reshape(f.shape[:-1])

    def grad_out(self, f, y):
        p = torch.softmax(f.detach(), dim=-1).reshape(-1, f.shape[-1])
        y = torch.from_numpy(np.asarray(y, np.int64).reshape(-1))
        keep = (y >= 0).nonzero().reshape(-1)
        g = torch.zeros_like(p)
        g[keep] = p[keep]
        g[keep, y[keep]] -= 1.0
        return g.reshape(f.shape)

    def exact_cotangents(self, f):
        # per position t, diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T: rows sqrt(p_tc) (p_t - e_c)
        p = torch.softmax(f.detach(), dim=-1).reshape(-1, f.shape[-1])
        T, C = p.shape
        v = torch.zeros(T, C, T, C, dtype=f.dtype)
        t = torch.arange(T)
        v[t, :, t, :] = p[:, None, :] - torch.eye(C, dtype=f.dtype)
        v *= p.sqrt()[:, :, None, None]
        return v.reshape((T * C,) + tuple(f.shape))

    def divergence(self, f, f0):
        logp0 = torch.log_softmax(f0.detach(), dim=-1)
        return (logp0.exp() * (logp0 - torch.log_softmax(f, dim=-1))).sum()

    def check_labels(self, labels, out_shape, n):
        want = (n,) + tuple(out_shape[:-1])
        if labels.dtype.kind not in "iu":
            raise BayesQError(f"categorical labels must be integers, got dtype {labels.dtype}")
        if labels.shape != want:
            raise BayesQError(f"labels have shape {labels.shape}; the output needs {want} "
                              "(one class index per sample and position)")
        if labels.size and labels.max() >= out_shape[-1]:
            raise BayesQError(f"label {int(labels.max())} is out of range for {out_shape[-1]} classes")
        return labels.astype(np.int64)


class Gaussian(Likelihood):
    name = "gaussian"

    def nll(self, f, y):
        return 0.5 * (f - torch.from_numpy(np.asarray(y)).to(f.dtype)).square().sum()

    def sample(self, f, rng):
        return f.detach().double().numpy() + rng.standard_normal(tuple(f.shape))

    def grad_out(self, f, y):
        return f.detach() - torch.from_numpy(np.asarray(y)).to(f.dtype)

    def exact_cotangents(self, f):
        # the output Fisher of a unit-variance Gaussian is the identity
        return torch.eye(f.numel(), dtype=f.dtype).reshape((f.numel(),) + tuple(f.shape))

    def divergence(self, f, f0):
        return 0.5 * (f - f0.detach()).square().sum()

    def check_labels(self, labels, out_shape, n):
        want = (n,) + tuple(out_shape)
        if labels.dtype.kind != "f":
            raise BayesQError(f"gaussian labels must be floats, got dtype {labels.dtype}")
        if labels.shape != want:
            raise BayesQError(f"labels have shape {labels.shape}; the output needs {want}")
        if not np.isfinite(labels).all():
            raise BayesQError("labels contain NaN or Inf")
        return labels


LIKELIHOODS: dict[str, Likelihood] = {"categorical": Categorical(), "gaussian": Gaussian()}


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise BayesQError(f"unknown likelihood {name!r}; choose from {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name]


# ----------------------------------------------------------------------------- per-sample gradients


def chunks(data: dict[str, np.ndarray], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    n = len(next(iter(data.values())))
    for i in range(0, n, size):
        yield i, {k: v[i:i + size] for k, v in data.items()}


@dataclass(frozen=True)
class FisherPlan:
    """How the expectation over labels is taken: ``given`` labels, ``exact``, or ``draws`` samples."""

    mode: str       # "given" | "exact" | "sampled"
    draws: int      # sampled labels per input ("sampled" only)


def fisher_plan(out_numel: int, n_weights: int, labels: np.ndarray | None, draws: int | None) -> FisherPlan:
    """Given labels; else ``draws`` sampled labels if asked for; else exact when affordable."""
    if labels is not None:
        return FisherPlan("given", 1)
    if draws is None:
        return FisherPlan("exact", 1) if out_numel * n_weights <= EXACT_BUDGET else FisherPlan("sampled", 1)
    if draws < 1:
        raise BayesQError(f"the number of sampled labels per input must be >= 1, got {draws}")
    return FisherPlan("sampled", int(draws))


def output_cotangents(out: torch.Tensor, likelihood: Likelihood, plan: FisherPlan, labels, start: int,
                      rng: np.random.Generator) -> torch.Tensor:
    """Rows ``v`` (``(K,) + out.shape``) such that the chunk's contribution to ``n * F`` is
    ``sum_k (J^T v_k)^2``: each row is one sample's output gradient (zero for the other samples of
    the chunk), scaled so that the label expectation comes out right."""
    rows = []
    for j in range(out.shape[0]):
        f = out[j].detach()
        if plan.mode == "given":
            vs = likelihood.grad_out(f, labels[start + j])[None]
        elif plan.mode == "exact":
            vs = likelihood.exact_cotangents(f)
        else:
            vs = torch.stack([likelihood.grad_out(f, likelihood.sample(f, rng)) for _ in range(plan.draws)])
            vs = vs / np.sqrt(plan.draws)
        full = torch.zeros((vs.shape[0],) + tuple(out.shape), dtype=out.dtype)
        full[:, j] = vs
        rows.append(full)
    return torch.cat(rows)


def backward_rows(out: torch.Tensor, inputs: list[torch.Tensor], v: torch.Tensor, group: int):
    """``J^T v_k`` for every row of ``v``, for each of ``inputs``: yields tuples of ``(k, *shape)``
    tensors (None where an input is unused), ``group`` rows per batched backward."""
    import warnings
    k = 0
    while k < v.shape[0]:
        rows = v[k:k + group]
        if rows.shape[0] == 1:
            grads = torch.autograd.grad(out, inputs, rows[0], retain_graph=True, allow_unused=True)
            yield tuple(None if g is None else g[None] for g in grads)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # vmap's "performance drop" notes for ops it loops over
                yield torch.autograd.grad(out, inputs, rows, retain_graph=True, allow_unused=True,
                                          is_grads_batched=True)
        k += rows.shape[0]


class SquareSums:
    """``sum_k g_k^2`` per weight: float32 partial sums in place (float64 arithmetic on every sample
    costs 10x more on large models), flushed into float64 every ``FLUSH`` rows, so each float32
    partial adds at most ``FLUSH`` positive terms (relative rounding error <= FLUSH * 2^-24 ~ 4e-6)."""

    FLUSH = 64

    def __init__(self, shapes):
        self.part = [torch.zeros(s, dtype=torch.float32) for s in shapes]
        self.total = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.rows = 0

    def add(self, grads) -> None:
        """``grads``: per weight ``(k, *shape)`` rows, or None (unused weight)."""
        k = 0
        for a, g in zip(self.part, grads):
            if g is None:
                continue
            k = g.shape[0]
            if k == 1:
                a.addcmul_(g[0], g[0])
            else:
                a.add_(torch.einsum("k...,k...->...", g, g))
        self.rows += k
        if self.rows >= self.FLUSH:
            self.flush()

    def flush(self) -> None:
        for t, a in zip(self.total, self.part):
            t.add_(a)
            a.zero_()
        self.rows = 0

    def result(self) -> list[torch.Tensor]:
        self.flush()
        return self.total


def group_size(params: dict[str, torch.Tensor], budget: int = 1 << 25) -> int:
    """Rows per batched backward so that the batched gradients stay within ``budget`` floats."""
    return max(1, budget // max(1, sum(p.numel() for p in params.values())))


def fisher_diagonal(forward: Forward, params: dict[str, torch.Tensor], data: dict[str, np.ndarray],
                    likelihood: Likelihood, *, labels: np.ndarray | None = None, draws: int | None = None,
                    seed: int = 0, unit: int = 1, plan: FisherPlan | None = None) -> dict[str, np.ndarray]:
    """Diagonal Fisher per parameter (float64, the parameter's shape); see the module docstring.
    Inputs go in chunks of ``unit`` samples (the model's fixed batch, or 1)."""
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    live = dict(zip(names, leaves))
    acc = SquareSums([p.shape for p in leaves])
    n = len(next(iter(data.values())))
    if plan is None:
        with torch.no_grad():
            probe = forward({k: v.detach() for k, v in params.items()}, {k: v[:unit] for k, v in data.items()})
        plan = fisher_plan(probe[0].numel(), sum(p.numel() for p in leaves), labels, draws)
    rng = np.random.default_rng(seed)
    group = group_size(params)
    with Progress("fisher", n) as prog:
        for start, batch in chunks(data, unit):
            out = forward(live, batch)
            v = output_cotangents(out, likelihood, plan, labels, start, rng)
            for grads in backward_rows(out, leaves, v, group):
                acc.add(grads)
            prog.step(out.shape[0])
    return {k: (a / n).numpy() for k, a in zip(names, acc.result())}
