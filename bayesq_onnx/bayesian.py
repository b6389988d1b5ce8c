"""``compress --keep-posterior``: a compressed model that keeps its Laplace posterior and samples from it
(docs/design.md, "Keeping the posterior").  Wires ``api.Analysis`` (the means), ``posterior/keep.py``
(standard deviations, prior tuning, log quantization, sample sets) and ``lower/sampling.py`` (the graph).

    ba = BayesianAnalysis("m.onnx", Recipe(bits=8.0), KeepPosterior(), calib="c.npz", labels="y.npy")
    res = ba.compress(8.0, output="m.bayes.onnx")      # means + standard deviations within 8 bits/weight
    fp32 = ba.fp32_model()                             # the uncompressed Bayesian model, for comparison
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from .api import Analysis, Result
from .calib.readers import n_samples
from .config import KeepPosterior, Recipe
from .errors import BayesQError, first_line
from .formats import Float32
from .graph.model_io import save_json_atomic, save_model_atomic
from .lower.sampling import Layout, PosteriorWeight, SampleSets, SigmaStore, add_sampling, opset, unfuse_matmuls
from .posterior.keep import (PRIOR_GRID, affine_like, compact, draw, laplace_sigma, log_quantize, mean_curvature,
                             quantize_sample, std_stored_bits, tune_prior)
from .progress import Progress
from .runtime import custom_ops
from .validate.uncertainty import class_labels, nll, softmax

SEARCH_STEPS = 5      # bisection steps for the means' budget, after the step down that made it fit
MIN_STEP = 1 / 64     # the least step down (bits/weight): a total just over the budget still moves
MAX_STEPS_DOWN = 20
MAX_OPSET = 21        # onnxruntime 1.32 registers RandomNormalLike for opsets 1-21 only


class BayesianAnalysis:
    """The posterior of every MatMul / Conv weight, fitted and tuned once; :meth:`compress` for any
    budget of means and standard deviations together."""

    def __init__(self, model, recipe: Recipe, keep: KeepPosterior = KeepPosterior(), *, calib=None,
                 labels=None, _check_paths=()):
        if recipe.target == "ort-cpu" and not custom_ops.available():
            raise BayesQError("--keep-posterior needs the bayesq custom-op library for --target ort-cpu "
                              f"({custom_ops.unavailable_reason()}); --target portable uses standard ops")
        if not recipe.custom_ops:
            raise BayesQError("--keep-posterior stores means in formats with a dequantize op: it needs the "
                              "bayesq formats (custom_ops=True)")
        self.keep = keep
        if labels is not None and keep.prior is None:   # a bad file fails before any work
            labels = class_labels(labels, None, "calibration sample")
        # onnxruntime has no RandomNormalLike kernel from opset 22 on, and 2-bit DequantizeLinear would
        # raise the opset to 25: 2-bit Conv weights take the bayesq affine format instead
        recipe = replace(recipe, conv_bits=tuple(b for b in recipe.conv_bits if b != 2),
                         bayesq_bits=tuple(sorted({*recipe.bayesq_bits, 2})))
        self.an = an = Analysis(model, recipe, calib=calib, _check_paths=_check_paths)
        if recipe.target == "ort-cpu" and opset(an.model) > MAX_OPSET:
            raise BayesQError(f"--keep-posterior: the model has opset {opset(an.model)}; onnxruntime draws "
                              f"weights (RandomNormalLike) up to opset {MAX_OPSET} only (--target portable writes "
                              "the model for other runtimes)")
        self.sites = [s for s in an.sites if not s.kind.looked_up]
        if not self.sites:
            raise BayesQError("--keep-posterior: no MatMul or Conv weight to keep a posterior for")
        self.output = an.probe.outputs[0]
        self.mu = {s.name: s.to_view(np.array(an.probe.weights[s.name], np.float32)) for s in self.sites}
        curvature = an.curvature()
        self.h = {s.name: compact(curvature.diagonal(s), s.rows, s.L) for s in self.sites}
        if keep.prior is not None:
            self.prior, self.prior_table = keep.prior, ()
        else:
            held = an.held
            if labels is None or not n_samples(held):
                raise BayesQError("--keep-posterior tunes the prior precision on held-back labelled calibration "
                                  "samples: give --labels (one class per calibration sample) or --prior-precision")
            y = class_labels(labels, an.n_calib, "calibration sample")[n_samples(an.fit):]
            scale = mean_curvature(list(self.h.values()), [s.size for s in self.sites])
            with Progress("prior precision", len(PRIOR_GRID)) as p:
                def scored(lam):
                    v = self._held_nll(lam, held, y)
                    p.step()
                    return v
                choice = tune_prior(scored, scale)
            self.prior, self.prior_table = choice.prior, choice.table
        self.sigma = {s.name: laplace_sigma(self.h[s.name], self.prior) for s in self.sites}

    def _held_nll(self, lam: float, held, y) -> float:
        """NLL of the fp32 Bayesian model's predictive (``tune_samples`` draws) on the held-back data."""
        an = self.an
        rng = np.random.default_rng(self.keep.seed)
        probs = 0.0
        for _ in range(self.keep.tune_samples):
            over = {s.name: s.from_view(draw(self.mu[s.name], laplace_sigma(self.h[s.name], lam), rng))
                    for s in self.sites}
            logits = np.concatenate([o[self.output] for o in an.probe.run(held, an.batch, [self.output], over)])
            if logits.ndim != 2 or logits.shape[-1] < 2:
                raise BayesQError(f"--keep-posterior scores a classifier: output {self.output!r} has shape "
                                  f"{logits.shape[1:]} per sample, not one score per class")
            if y.max() >= logits.shape[-1]:
                raise BayesQError(f"--labels go up to {y.max()}; output {self.output!r} has {logits.shape[-1]} classes")
            probs = probs + softmax(logits)
        return nll(probs / self.keep.tune_samples, y)

    # ------------------------------------------------------------------ budget

    def _cost(self, fmt, s) -> int:
        """Bits stored for site ``s`` beyond (vpq, jq) or instead of (spq) its mean in ``fmt``."""
        f = affine_like(fmt, s.L)
        if self.keep.mode == "spq":
            return self.keep.sets * (32 * s.size if isinstance(f, Float32) else f.stored_bits(s.rows, s.L))
        return std_stored_bits(f, self.h[s.name].shape[0], s.L)

    def _formats(self, report: dict) -> dict:
        by_name = {l["name"]: l["format"] for l in report["layers"]}
        return {s.name: next(f for f in self.an.candidates[s.name] if f.name == by_name[s.name]) for s in self.an.sites}

    def _codes(self, fmt, s) -> int:
        """Code bits (no scales, zero points, offsets) stored for site ``s`` beyond or instead of its mean."""
        f = affine_like(fmt, s.L)    # float32 values count as codes, as Format.code_bits has it
        rows = s.rows if self.keep.mode == "spq" else self.h[s.name].shape[0]
        return (self.keep.sets if self.keep.mode == "spq" else 1) * f.code_bits(rows, s.L)

    def _total(self, res: Result) -> tuple[int, int, int]:
        """(mean bits, posterior bits, total bits) of a compress result in this mode."""
        fmts = self._formats(res.report)
        mean = sum(l["stored_bits"] for l in res.report["layers"])
        post = sum(self._cost(fmts[s.name], s) for s in self.sites)
        if self.keep.mode == "spq":   # the sets replace the posterior weights' means
            mean -= sum(l["stored_bits"] for l in res.report["layers"] if l["name"] in self.mu)
        return mean, post, mean + post

    def compress(self, bits: float, *, output=None, report=None) -> Result:
        """Means and standard deviations (or SPQ's sets) within ``bits`` stored bits per weight: the
        means' budget is the largest (by bisection) whose total fits."""
        an, n = self.an, self.an.n_weights
        budget = bits * n

        def at(b):
            try:
                return an.compress(b)
            except BayesQError:
                return None
        best = at(bits)
        if best is None or self._total(best)[2] > budget:
            # scale the means' budget down by the overshoot until the total fits, then bisect the last step
            hi_b, r = bits, best
            for _ in range(MAX_STEPS_DOWN):
                ratio = budget / self._total(r)[2] if r is not None else 1.0
                lo_b = min(hi_b * ratio, hi_b - MIN_STEP)
                r = at(lo_b) if lo_b > 0 else None
                if r is None:
                    raise BayesQError(f"budget {bits:g} bits/weight cannot hold the means and the "
                                      f"{'sample sets' if self.keep.mode == 'spq' else 'standard deviations'}")
                if self._total(r)[2] <= budget:
                    break
                hi_b = lo_b
            else:
                raise BayesQError(f"no budget for the means found within {bits:g} bits/weight in total")
            best = r
            for _ in range(SEARCH_STEPS):
                mid = (lo_b + hi_b) / 2
                r = at(mid)
                if r is not None and self._total(r)[2] <= budget:
                    lo_b, best = mid, r
                else:
                    hi_b = mid
        model = self.build(best)
        rep = self._report(best, bits)
        if output is not None:
            try:
                path = save_model_atomic(model, output)
            except OSError as e:
                raise BayesQError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
            rep["output"], rep["output_bytes"] = str(path), path.stat().st_size
        if report is not None:
            try:
                save_json_atomic(rep, report)
            except BaseException:
                if output is not None:
                    for p in (Path(output), Path(output).with_name(Path(output).name + ".data")):
                        p.unlink(missing_ok=True)
                raise
        return Result(model, rep, None if output is None else Path(output))

    # ------------------------------------------------------------------ models

    def build(self, res: Result, mode: str | None = None) -> onnx.ModelProto:
        """The sampling model (``mode``, default the recipe's) on the means of ``res``."""
        mode = mode or self.keep.mode
        portable = self.an.recipe.target == "portable"
        fmts = self._formats(res.report)
        model, made = unfuse_matmuls(res.model)
        weights = []
        rng = np.random.default_rng(self.keep.seed)
        for s in self.sites:
            fmt = fmts[s.name]
            if isinstance(fmt, Float32) or s.kind.convolved or portable:
                tensor, layout = s.name, Layout(s.shape, s.perm[-1], s.flat)
            else:   # a fused bayesq MatMul, now reading W (K, N) from its Dequantize op
                tensor, layout = made[f"{_prefix(s.name)}_B"], Layout((s.L, s.rows), 0)
            weights.append(self._weight(s, fmt, tensor, layout, mode, rng))
        return add_sampling(model, weights, mode, self.keep.seed, portable)

    def fp32_model(self, mode: str = "vpq") -> onnx.ModelProto:
        """The uncompressed Bayesian model: fp32 means and standard deviations, drawn in the graph."""
        rng = np.random.default_rng(self.keep.seed)
        weights = [self._weight(s, Float32(), s.name, Layout(s.shape, s.perm[-1], s.flat), mode, rng)
                   for s in self.sites]
        base = onnx.ModelProto()
        base.CopyFrom(self.an.model)   # the analysis's copy keeps its weights on disk (model_io.open_model)
        return add_sampling(self.an.files.materialize(base), weights, mode, self.keep.seed)

    def _weight(self, s, fmt, tensor, layout, mode, rng) -> PosteriorWeight:
        f = affine_like(fmt, s.L)
        sigma = self.sigma[s.name]
        pre = "bq_post_" + _prefix(s.name)[3:]
        if mode == "spq":
            views = [draw(self.mu[s.name], sigma, rng) for _ in range(self.keep.sets)]
            sets = SampleSets(values=np.stack(views)) if isinstance(f, Float32) else \
                SampleSets(fmt=f, packed=tuple(f.pack(quantize_sample(v, f)) for v in views))
            return PosteriorWeight(tensor, layout, pre, sets=sets)
        if isinstance(f, Float32):
            store = SigmaStore(rows=sigma.shape[0], values=sigma)
        else:
            lc = log_quantize(sigma, f)
            store = SigmaStore(rows=sigma.shape[0], fmt=f, packed=f.pack(lc.codes), offset=lc.offset)
        return PosteriorWeight(tensor, layout, pre, sigma=store, bits=0 if isinstance(fmt, Float32) else fmt.bits)

    # ------------------------------------------------------------------ report

    def _report(self, res: Result, bits: float) -> dict:
        an, n = self.an, self.an.n_weights
        mean, post, total = self._total(res)
        fmts = self._formats(res.report)
        rep = dict(res.report)
        rep["layers"] = [dict(l) for l in rep["layers"]]
        for l in rep["layers"]:
            if l["name"] in self.mu:
                s = next(x for x in self.sites if x.name == l["name"])
                f = affine_like(fmts[s.name], s.L)
                l["posterior"] = {"store": f.name, "sigma_rows": int(self.h[s.name].shape[0]),
                                  "stored_bits": self._cost(fmts[s.name], s),
                                  "sigma_median": float(np.median(self.sigma[s.name]))}
        codes = res.report["code_bits_per_weight"] * n + sum(self._codes(fmts[s.name], s) for s in self.sites)
        if self.keep.mode == "spq":
            codes -= sum(fmts[s.name].code_bits(s.rows, s.L) for s in self.sites)
        rep.update({
            "budget": bits, "bits_per_weight": total / n, "code_bits_per_weight": codes / n,
            "bits_per_weight_all": (total + an.other_bits) / (n + an.other_weights),
            "posterior": {
                "mode": self.keep.mode, "sets": self.keep.sets if self.keep.mode == "spq" else None,
                "seed": self.keep.seed, "curvature": an.curvature_name, "evidence": an.recipe.evidence,
                "prior_precision": self.prior,
                "prior_tuning": [{"prior_precision": p, "held_nll": v} for p, v in self.prior_table],
                "means_budget": res.report["budget"], "mean_bits_per_weight": mean / n,
                "posterior_bits_per_weight": post / n,
                "weights": [s.name for s in self.sites],
                "deterministic": [s.name for s in an.sites if s.name not in self.mu],
            },
        })
        return rep


def _prefix(name: str) -> str:
    """The packed tensors' name prefix that the ort-cpu lowering gives a weight (lower/ort_cpu.py)."""
    return "bq_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def compress_bayesian(model, recipe: Recipe, keep: KeepPosterior, *, calib=None, labels=None, output=None,
                      report=None) -> Result:
    """``compress`` with ``--keep-posterior``: ``recipe.bits`` budgets means and posterior together."""
    ba = BayesianAnalysis(model, recipe, keep, calib=calib, labels=labels, _check_paths=(output, report))
    return ba.compress(recipe.bits, output=output, report=report)

