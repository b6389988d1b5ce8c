"""Calibration-only distillation (docs/design.md, "Distillation"): after the plan is chosen and
rounded, the continuous part of every quantized weight is tuned on the calibration samples so that
the quantized model's outputs move toward the full-precision model's.

What moves and what does not:

- affine formats: each group's scale, as ``s0 * exp(t)`` (positive, and Adam's steps are then
  relative changes); the integer codes and zero points stay (every format here stores its zero
  point as an integer, so there is no float zero point to tune);
- codebooks: each level, as ``l0 + t * spacing`` with ``spacing`` the group's mean level spacing
  (again a relative step); a scaled codebook's row scales as an affine grid's and its shared levels
  as a codebook's; the codes stay.

Codes are not re-rounded: GPTQ chose them with error feedback, which a nearest re-rounding would
undo.  The tuned values are rounded to what the format stores (fp16 or fp32) before anything is
measured, so what is measured is what ships.

The model is any differentiable ``forward(weights, batch) -> {output: tensor}`` (the ONNX
interpreter of ``curvature/onnx_torch``) with the weights replaced by name; numerics only here.
Loss per float output: ``KL(p_ref || p)`` over the last axis for logits (the name test of
``curvature/trace.likelihood_for``), else the squared error relative to the reference's mean
energy per sample (the plan check's distortion, per batch); summed over outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..calib.readers import n_samples
from ..formats import Format, LutCodes, ScaledLutCodes, SparseCodes, UniformCodes
from ..formats.bayesq_uniform import round_values
from ..progress import Progress
from ..types import WeightSite

LEARNING_RATE = 1e-3   # Adam's step in relative units: 0.1% of a scale or of a level spacing per step

Forward = Callable[[dict, dict], dict]


@dataclass
class Distilled:
    """The tuned codes per site (stored values: ``fmt.round_scales`` applied) and the calibration
    loss before and after tuning (the distillation objective on all fitting samples, stored values)."""

    codes: dict[str, UniformCodes | LutCodes]
    loss_before: float
    loss_after: float


class _Tunable:
    """One site's dequantization as a function of its continuous parameters ``t`` (zero: untuned)."""

    def __init__(self, site: WeightSite, fmt: Format, q: UniformCodes | LutCodes | SparseCodes):
        self.site, self.fmt, self.sparse = site, fmt, q if isinstance(q, SparseCodes) else None
        if self.sparse is not None:   # the survivors' scales are tuned; the pruned weights stay 0
            q = q.inner
            self.mask = torch.from_numpy(self.sparse.mask)
        self.q = q
        rows, L = q.codes.shape
        g = torch.from_numpy(np.arange(L) // q.block if q.block else np.zeros(L, np.int64))
        # a codebook's own levels are tuned; a scaled codebook's scales as an affine grid's, and its
        # levels (one set for the whole weight) as a codebook's
        self.lut = isinstance(q, LutCodes) and not isinstance(q, ScaledLutCodes)
        self.shared = isinstance(q, ScaledLutCodes)
        if self.shared:
            self.base = torch.from_numpy(np.asarray(q.scale, np.float32))
            levels = torch.from_numpy(np.asarray(q.levels, np.float32))
            self.levels0, self.level_unit = levels, (levels.max() - levels.min()) / max(len(levels) - 1, 1)
            self.u = torch.zeros_like(levels, requires_grad=True)
            self.codes = torch.from_numpy(q.codes.astype(np.int64))
            self.g = g
        elif self.lut:
            lut = torch.from_numpy(np.asarray(q.lut, np.float32))
            spread = (lut.amax(-1, keepdim=True) - lut.amin(-1, keepdim=True)) / max(lut.shape[-1] - 1, 1)
            self.base, self.unit = lut, spread
            self.index = (torch.arange(rows)[:, None], g[None, :], torch.from_numpy(q.codes.astype(np.int64)))
        else:
            self.base = torch.from_numpy(np.asarray(q.scale, np.float32))
            zp = q.zero_point[:, g.numpy()].astype(np.float32)
            self.steps = torch.from_numpy(q.codes.astype(np.float32) - zp)   # code - zero point, fixed
            self.g = g
        self.t = torch.zeros_like(self.base, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.t, self.u] if self.shared else [self.t]

    def values(self, t: torch.Tensor) -> torch.Tensor:
        """Scales ``(rows, G)`` or levels ``(rows, G, 2**bits)`` at ``t``."""
        return self.base + t * self.unit if self.lut else self.base * torch.exp(t)

    def shared_levels(self, u: torch.Tensor) -> torch.Tensor:
        """A scaled codebook's levels ``(2**bits,)`` at ``u``."""
        return self.levels0 + u * self.level_unit

    def current(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The values and shared levels at the parameters, differentiable."""
        return self.values(self.t), self.shared_levels(self.u) if self.shared else None

    def as_stored(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The values and shared levels at the parameters as the format stores them (fp16 for -f16)."""
        v = self.fmt.round_scales(self.values(self.t.detach()).numpy())
        lv = round_values(self.shared_levels(self.u.detach()).numpy(), "float16", "levels") if self.shared else None
        return v, lv

    def view(self, values: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        if self.lut:
            return values[self.index]
        if self.shared:
            return levels[self.codes] * values[:, self.g]
        v = self.steps * values[:, self.g]
        if self.sparse is not None:    # survivors in row-major order, as SparseCodes.dequantize
            return torch.zeros(self.mask.shape, dtype=v.dtype).masked_scatter(self.mask, v)
        return v

    def weight(self, values: torch.Tensor, levels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The initializer (native layout and type) these values (and shared levels) dequantize to."""
        s = self.site
        permuted = tuple(s.shape[p] for p in s.perm)
        return self.view(values, levels).reshape(permuted).permute(tuple(np.argsort(s.perm).tolist())).to(dtype)

    def stored(self) -> UniformCodes | LutCodes | SparseCodes:
        """The codes with the tuned values as the format stores them."""
        v, lv = self.as_stored()
        if self.shared:
            return ScaledLutCodes.of(self.q.codes, v, lv, self.q.bits, self.q.block)
        if self.lut:
            return LutCodes(codes=self.q.codes, lut=v, bits=self.q.bits, block=self.q.block)
        q = UniformCodes(codes=self.q.codes, scale=v, zero_point=self.q.zero_point, bits=self.q.bits, block=self.q.block)
        return q if self.sparse is None else SparseCodes(self.sparse.mask, q, self.sparse.keep, self.sparse.of)


def _loss(out: dict, ref: dict, energy: dict[str, float], logits: set[str]) -> torch.Tensor:
    total = 0.0
    for k, r in ref.items():
        y = out[k]
        if k in logits:
            logp0 = torch.log_softmax(r, dim=-1)
            total = total + (logp0.exp() * (logp0 - torch.log_softmax(y, dim=-1))).sum(-1).mean()
        else:
            total = total + (y - r).square().sum() / (y.shape[0] * energy[k])
    return total


def _batches(n: int, size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches of ``size`` sample indices: seeded shuffles, each sample once per epoch."""
    size, out, order = min(size, n), [], np.empty(0, np.int64)
    while len(out) < steps:
        if len(order) < size:
            order = rng.permutation(n)
        out.append(np.sort(order[:size]))
        order = order[size:]
    return out


def distill(forward: Forward, weights: dict[str, torch.Tensor], sites: list[WeightSite],
            chosen: dict[str, tuple[Format, UniformCodes | LutCodes]], data: dict[str, np.ndarray],
            outputs: list[str], logits: set[str], steps: int, batch_size: int, seed: int = 0) -> Distilled:
    """Tune ``chosen`` (site name -> its format and codes; sites left in float are absent) toward
    the outputs of ``forward`` at ``weights`` (the full-precision initializers, native types) on
    ``data``, ``steps`` Adam steps of ``batch_size`` samples (a multiple of the model's fixed batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # sums in one order: the same bytes on every machine
    try:
        return _distill(forward, weights, sites, chosen, data, outputs, logits, steps, batch_size, seed)
    finally:
        torch.set_num_threads(threads)


def _distill(forward, weights, sites, chosen, data, outputs, logits, steps, batch_size, seed):
    tun = {s.name: _Tunable(s, *chosen[s.name]) for s in sites if s.name in chosen}
    dtypes = {k: weights[k].dtype for k in tun}
    n = n_samples(data)
    chunks = [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    with torch.no_grad():
        reference = [{k: v.detach() for k, v in forward({}, c).items() if k in outputs} for c in chunks]
    energy = {k: max(sum(float(r[k].double().square().sum()) for r in reference) / n, 1e-30) for k in outputs}

    def calibration_loss() -> float:
        """The objective on every fitting sample, at the values as stored."""
        stored = {k: [None if a is None else torch.from_numpy(a) for a in t.as_stored()] for k, t in tun.items()}
        total = 0.0
        with torch.no_grad():
            for c, ref in zip(chunks, reference):
                w = {k: t.weight(*stored[k], dtypes[k]) for k, t in tun.items()}
                total += float(_loss(forward(w, c), ref, energy, logits)) * n_samples(c)
        return total / n

    before = calibration_loss()
    opt = torch.optim.Adam([p for t in tun.values() for p in t.parameters()], lr=LEARNING_RATE)
    rng = np.random.default_rng(seed)
    # reference outputs of a batch drawn across chunks: gather them per sample
    flat_ref = {k: torch.cat([r[k] for r in reference]) for k in outputs}
    with Progress("distilling", steps) as p:
        for idx in _batches(n, batch_size, steps, rng):
            batch = {k: v[idx] for k, v in data.items()}
            ref = {k: flat_ref[k][torch.from_numpy(idx)] for k in outputs}
            opt.zero_grad()
            w = {k: t.weight(*t.current(), dtypes[k]) for k, t in tun.items()}
            _loss(forward(w, batch), ref, energy, logits).backward()
            opt.step()
            p.step()
    return Distilled({k: t.stored() for k, t in tun.items()}, before, calibration_loss())
