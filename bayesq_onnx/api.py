"""The public entry points: ``compress(model, recipe) -> Result`` and ``make_session``.

Data flow: WeightSite -> SiteStats -> Curvature -> Posterior -> loss tables -> Plan -> codes ->
lowered model -> report.  Each stage lives in its own package; this module only wires them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .calib.capture import capture_stats
from .calib.readers import (check_calibration, fixed_batch, input_specs, load_calibration, n_samples, split,
                            synthetic_calibration, take)
from .config import Recipe
from .curvature.activation import ActivationCurvature
from .curvature.from_file import FileCurvature
from .errors import BayesQError, first_line
from .formats import BayesqLut, Float32
from .graph.model_io import check_writable, load_model, prepare_model, save_json_atomic, save_model_atomic, to_array
from .graph.sites import find_sites
from .lower.ort_cpu import lower_ort_cpu, lower_portable
from .plan.candidates import candidate_formats
from .plan.greedy import lower_hull
from .plan.planner import Plan, check_budget, knapsack_plan, uniform_plans
from .plan.proxy import OutputDistortion
from .posterior.laplace import DiagonalLaplace
from .parallel import parallel_map
from .progress import Progress
from .quantize.site import SiteQuantizer
from .runtime.probe import Probe
from .runtime import custom_ops
from .runtime.session import make_session

__all__ = ["compress", "Analysis", "make_session", "Result", "Recipe"]

log = logging.getLogger(__name__)
REPORT_VERSION = 1
# uniform plans with our grids that the plan check measures beside the knapsack and the reference GPTQ's
# (the most-bits ones within budget); each costs a rounding of every site, so the fast tables skip them:
# on MiniLM at 3 bits they left 3.2-3.8x the knapsack plan's distortion, the reference 6.3x
N_UNIFORM_CHECKED = {"proxy": 3, "closed_form": 3, "kron": 0}


@dataclass
class Result:
    model: onnx.ModelProto
    report: dict
    output: Path | None = None


def compress(model: str | os.PathLike | onnx.ModelProto, recipe: Recipe | None = None, *,
             calib: str | os.PathLike | dict | None = None, output: str | os.PathLike | None = None,
             report: str | os.PathLike | None = None, **recipe_fields) -> Result:
    """Compress ``model`` to ``recipe.bits`` stored bits per weight.  ``recipe_fields`` build or
    amend the recipe (``compress("m.onnx", bits=3.0)``).  The input model is never modified."""
    t0 = time.perf_counter()
    recipe = replace(recipe, **recipe_fields) if recipe else Recipe(**recipe_fields)
    analysis = Analysis(model, recipe, calib=calib, _check_bits=recipe.bits, _check_paths=(output, report))
    return analysis.compress(recipe.bits, output=output, report=report, _t0=t0, _single_use=True)


class Analysis:
    """Everything that does not depend on the budget -- sites, calibration statistics, posteriors,
    grids, codes and loss tables -- computed once, then :meth:`compress` for any number of budgets
    (``Analysis(m, recipe, calib=c).compress(3.0)`` is ``compress(m, recipe, calib=c)`` at 3.0 bits).
    ``recipe.bits`` is ignored here."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, recipe: Recipe, *,
                 calib: str | os.PathLike | dict | None = None, _check_bits: float | None = None,
                 _check_paths=()):
        t0 = time.perf_counter()
        self.recipe, self._input = recipe, model
        m = self.model = _read_model(model)
        sites, skipped = find_sites(m, recipe.min_elements, recipe.exclude, recipe.include,
                                    [p for p, _ in recipe.pins])
        if not sites:
            why = f" ({skipped[0].name}: {skipped[0].reason})" if skipped else ""
            raise BayesQError(f"no quantizable weights found{why}")
        self.sites, self.skipped = sites, skipped
        weights = _read_weights(m, sites)
        self.candidates = {s.name: candidate_formats(s, recipe, _bayesq_ops(recipe)) for s in sites}
        self.n_weights = sum(s.size for s in sites)
        if _check_bits is not None:
            check_budget(sites, self.candidates, _check_bits)
        # every check of the user's input is done before the first progress line
        for path in _check_paths:
            if path is not None:
                check_writable(path)
        file_curvature = FileCurvature(recipe.curvature, sites, recipe.evidence) if recipe.curvature else None
        data, self.calib_source, fixed = _read_calibration(m, calib, recipe)
        self.batch = fixed or recipe.batch_size
        self.uniform = recipe.method_spec.planner == "uniform"
        # only the knapsack's plan check needs held-back data; the uniform baselines calibrate on all of it
        self.fit, self.held = (data, take(data, 0)) if self.uniform else split(data, recipe.holdout, fixed or 1)
        self.n_calib = n_samples(data)
        self.probe = _probe(m, sites)
        if calib is None:
            log.warning("no calibration data given (--calib): using %d synthetic samples built from the input "
                        "types; quality will suffer on real data", recipe.synthetic_samples)
        try:
            stats = capture_stats(self.probe, sites, self.fit, self.batch)
        except Exception as e:
            raise BayesQError(f"onnxruntime failed on the calibration data: {first_line(e)}") from None
        self.curvature = file_curvature or ActivationCurvature(stats, recipe.evidence)
        self.quantizers = {s.name: _site_quantizer(s, weights[s.name], self.curvature, stats[s.name].xtx, recipe)
                           for s in sites}
        self._losses, self._reference, self._distortion = None, None, None
        self.seconds = time.perf_counter() - t0

    @property
    def losses(self) -> dict[str, np.ndarray]:
        """The knapsack's loss tables (computed on first use)."""
        if self._losses is None:
            measured = self.recipe.table_source != "closed_form"
            self._losses = _tables(self.recipe, self.sites, self.candidates, self.quantizers,
                                   self._table_distortion if measured else None)
        return self._losses

    @property
    def _table_distortion(self) -> OutputDistortion:
        """The output distortion the tables are measured with (``proxy_samples``, or ``scale_samples``
        for kron) of the fitting data."""
        if self._distortion is None:
            r = self.recipe
            n = r.scale_samples if r.table_source == "kron" else r.proxy_samples
            self._distortion = OutputDistortion(self.probe, take(self.fit, -(-n // self.batch) * self.batch), self.batch)
        return self._distortion

    @property
    def reference_quantizers(self) -> dict[str, SiteQuantizer]:
        """The same sites quantized as ``--method gptq`` does, for the plan check (made on first use)."""
        if self._reference is None:
            self._reference = {s.name: self.quantizers[s.name].reference() for s in self.sites}
        return self._reference

    def compress(self, bits: float, *, output: str | os.PathLike | None = None,
                 report: str | os.PathLike | None = None, _t0: float | None = None,
                 _single_use: bool = False) -> Result:
        t0 = time.perf_counter() if _t0 is None else _t0
        recipe, sites = replace(self.recipe, bits=bits), self.sites
        check_budget(sites, self.candidates, bits)
        budget_bits = bits * self.n_weights
        uniforms = uniform_plans(sites, self.candidates, budget_bits)
        check, losses, quantizers = None, None, self.quantizers
        if self.uniform:
            if not uniforms:
                raise BayesQError(f"no uniform format fits a budget of {bits:g} bits/weight for --method "
                                  f"{recipe.method}")
            plan = uniforms[0]
        else:
            losses = self.losses
            knapsack = knapsack_plan(sites, self.candidates, losses, budget_bits)
            if recipe.table_source == "kron":
                _choose_grids(knapsack, sites, self.quantizers, self._table_distortion)
            ours = [(p, self.quantizers) for p in [knapsack, *uniforms[:N_UNIFORM_CHECKED[recipe.table_source]]]]
            reference = [(replace(u, label=f"gptq {u.label}"), self.reference_quantizers) for u in uniforms[:1]]
            (plan, quantizers), check = _plan_check(ours + reference, sites, self.probe, self.held, self.batch)
        out_model = _lower(self.model, sites, plan, quantizers, recipe, forget=_single_use)
        rep = _report(recipe, sites, self.skipped, self.candidates, plan, quantizers, losses, check,
                      self.n_weights, self.calib_source, self.n_calib, n_samples(self.fit),
                      n_samples(self.held), self.curvature.name)
        # a reused analysis is paid once: each budget's report counts its own work plus the analysis
        rep["seconds"] = round(time.perf_counter() - t0 + (0 if _single_use else self.seconds), 3)
        if isinstance(self._input, (str, os.PathLike)):
            rep["input"] = str(self._input)
        if output is not None:
            try:
                path = save_model_atomic(out_model, output)
            except OSError as e:
                raise BayesQError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
            rep["output"] = str(path)
            rep["output_bytes"] = path.stat().st_size
        if report is not None:
            try:
                save_json_atomic(rep, report)
            except OSError as e:
                raise BayesQError(f"cannot write {report}: {e.strerror or first_line(e)}") from None
        return Result(out_model, rep, Path(output) if output is not None else None)


def _bayesq_ops(recipe: Recipe) -> bool:
    """Whether formats only the bayesq ops execute may be chosen (unless the recipe says no): always for the portable target;
    for ort-cpu when the custom-op library was built (else a warning, and native formats only)."""
    if not recipe.custom_ops:
        return False
    if recipe.target == "portable" or custom_ops.available():
        return True
    log.warning("the bayesq custom-op library is not available (%s): using onnxruntime's native formats "
                "only; --target portable runs the others with standard ops", custom_ops.unavailable_reason())
    return False


def _read_model(model) -> onnx.ModelProto:
    """Our own checked, normalized copy (the caller's file or proto is never touched)."""
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return prepare_model(m)
    return load_model(model)


def _read_weights(m: onnx.ModelProto, sites) -> dict[str, np.ndarray]:
    inits = {t.name: t for t in m.graph.initializer}
    weights = {s.name: to_array(inits[s.name]) for s in sites}
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise BayesQError(f"weight {name!r} contains NaN or Inf")
    return weights


def _read_calibration(m: onnx.ModelProto, calib, recipe: Recipe) -> tuple[dict, str, int | None]:
    """The calibration samples, where they came from, and the graph's fixed batch size if any."""
    specs = input_specs(m)
    if calib is None:
        data, source = synthetic_calibration(m, specs, recipe.synthetic_samples, recipe.seed), "synthetic"
    elif isinstance(calib, dict):
        data, source = check_calibration(calib, specs, "calibration data"), "dict"
    else:
        data, source = load_calibration(calib, specs), str(calib)
    fixed = fixed_batch(specs)
    if fixed and n_samples(data) % fixed:
        raise BayesQError(f"the model runs in fixed batches of {fixed}, which do not divide the "
                          f"{n_samples(data)} calibration samples")
    return data, source, fixed


def _probe(m: onnx.ModelProto, sites) -> Probe:
    try:
        return Probe(m, [s.name for s in sites], [a for s in sites for a in s.activations])
    except Exception as e:  # unknown ops, bad graphs: onnxruntime says why
        raise BayesQError(f"onnxruntime cannot run the model: {first_line(e)}") from None


def _site_quantizer(site, weight, curvature, xtx, recipe: Recipe) -> SiteQuantizer:
    view = site.to_view(weight)
    h = curvature.diagonal(site)
    if not np.any(h > 0):  # never reached by the data: no information, weigh all alike
        h = np.ones_like(h)
    return SiteQuantizer(view, DiagonalLaplace.fit(view, h, recipe.damping), xtx, recipe.method_spec,
                         recipe.gptq_damp, recipe.act_order)


def _lower(m: onnx.ModelProto, sites, plan: Plan, quantizers, recipe: Recipe, forget: bool) -> onnx.ModelProto:
    def pack(s):
        fmt = plan.choice[s.name]
        out = None if isinstance(fmt, Float32) else fmt.pack(quantizers[s.name].codes(fmt))
        if forget:  # bounded memory on big models when no other budget will ask again
            quantizers[s.name].forget()
        return out

    packed = {}
    with Progress("packing", len(sites)) as p:
        for s, arrays in zip(sites, parallel_map(pack, sites)):
            if arrays is not None:
                packed[s.name] = arrays
            p.step()
    lower = lower_portable if recipe.target == "portable" else lower_ort_cpu
    out = lower(m, sites, plan.choice, packed, recipe.accuracy_level)
    try:  # the full check (with shape inference) whenever the input model passes it too
        onnx.checker.check_model(out, full_check=_passes_full_check(m))
    except Exception as e:  # a bug of ours, not the user's: say so plainly
        raise RuntimeError(f"internal error: the lowered model fails onnx.checker: {first_line(e)}") from e
    return out


def _tables(recipe, sites, candidates, quantizers, distortion) -> dict[str, np.ndarray]:
    """Loss of every (site, candidate): the allocator's input, by ``recipe.table_source``:

    - ``kron``: the layer output error each candidate is predicted to leave
      (:meth:`SiteQuantizer.layer_loss`, no rounding), times the site's end-to-end factor: the
      model's output distortion per unit of layer output error, measured once per site with one
      candidate's real codes.  The output-side factor of a Kronecker-factored curvature, reduced
      to a scalar: on MiniLM it varies by 200x between sites and by +-15% between the formats of
      one site.  Measured from the site's segment of the model on (``OutputDistortion.segmented``),
      on ``recipe.scale_samples`` samples.
    - ``proxy``: the task-aware distortion measured for every candidate on the site's hull (a dozen
      forward passes of the site's cone each).
    - ``closed_form``: the posterior-expected loss itself (comparable across sites only with
      gradient curvature from a file).

    Within a site the candidates off the lower convex hull of (stored bits, loss) are never worth
    taking: they get +inf without being rounded or measured.  The hull comes from the layer loss
    (kron) or from the closed form at sigma -> 0 (the others)."""
    source = recipe.table_source
    # kron: one measurement per site, from the site's segment of the model on
    from_segment = distortion.segmented([s.name for s in sites]) if source == "kron" else None

    def site_table(s) -> np.ndarray:
        q, fs = quantizers[s.name], candidates[s.name]
        table, hull = _hull_table(s, fs, q.layer_loss if source == "kron" else q.screen_loss)
        if source == "kron":
            ref = _scale_reference(s, fs, hull)
            if ref is not None:
                codes = q.quick_codes(fs[ref])
                err = q.layer_error(codes)
                table[hull] *= from_segment({s.name: s.from_view(codes.dequantize())}) / err if err > 0 else 0.0
        elif source == "proxy":
            # a dozen measurements of this site, each running only the part of the model it reaches
            measure = distortion.restricted_to([s.name])
            for j in hull:
                if isinstance(fs[j], Float32):
                    table[j] = 0.0
                    continue
                # where several grids are on offer, the measurement picks (and pins) the best
                scores = []
                for kind in q.grid_kinds(fs[j]):
                    q.pin(fs[j], kind)
                    scores.append((measure({s.name: s.from_view(q.dequantized(fs[j]))}), kind))
                table[j], best = min(scores)
                q.pin(fs[j], best)
        else:
            table[hull] = [q.expected_loss(fs[j]) for j in hull]
        return table

    losses = {}
    with Progress(f"loss tables ({source})", len(sites)) as p:
        for s, table in zip(sites, parallel_map(site_table, sites)):
            losses[s.name] = table
            p.step()
    return losses


def _hull_table(site, formats, screen) -> tuple[np.ndarray, list[int]]:
    """A table that is +inf off the lower convex hull of (stored bits, ``screen``) and holds the
    screen on it, and the hull (by stored bits)."""
    costs = np.array([f.stored_bits(site.rows, site.L) for f in formats], np.float64)
    values = np.array([screen(f) for f in formats])
    hull = sorted(lower_hull(costs, values), key=lambda j: costs[j])
    table = np.full(len(formats), np.inf)
    table[hull] = values[hull]
    return table, hull


def _choose_grids(plan: Plan, sites, quantizers, distortion) -> None:
    """Where a site offers several grids for its planned format (grouped Conv and Gather: no ``X^T X`` for
    GPTQ to judge them by), measure each end to end and pin the best, as the proxy tables do for
    every candidate: the diagonal expected loss that the search minimises can favour clipping the
    model does not tolerate.  Each format is decided once, whatever budget asks again."""
    def choose(s):
        q, f = quantizers[s.name], plan.choice[s.name]
        kinds = q.grid_kinds(f)
        if len(kinds) > 1 and f not in q.measured_grids:
            scores = []
            for kind in kinds:
                q.pin(f, kind)
                scores.append((distortion({s.name: s.from_view(q.dequantized(f))}), kind))
            q.pin(f, min(scores)[1])
            q.measured_grids.add(f)

    for _ in parallel_map(choose, sites):
        pass


def _scale_reference(site, formats, hull) -> int | None:
    """The candidate whose real codes measure a site's end-to-end factor under ``kron``: an affine
    one on the hull (one rounding; codebooks need Lloyd-Max first), nearest to 4 bits per weight,
    where errors are small enough to stay linear and large enough to measure."""
    affine = [j for j in hull if not isinstance(formats[j], (Float32, BayesqLut))] or \
             [j for j in hull if not isinstance(formats[j], Float32)]
    if not affine:
        return None
    return min(affine, key=lambda j: abs(formats[j].stored_bits(site.rows, site.L) / site.size - 4.0))


def _plan_check(candidates: list[tuple[Plan, dict]], sites, probe, held, batch_size):
    """Product rule (docs/design.md, "Plan check"): measure the knapsack plan end to end on held-back data
    against the uniform plans at the same budget -- with our grids, and with the reference GPTQ's
    codes -- and ship the best.  ``candidates``: ``(plan, quantizers)``, the knapsack first."""
    distortion = OutputDistortion(probe, held, batch_size)
    with Progress("plan check", len(candidates)) as p:
        scores = []
        for plan, qs in candidates:
            views = parallel_map(lambda s: s.from_view(qs[s.name].dequantized(plan.choice[s.name])), sites)
            scores.append(distortion({s.name: v for s, v in zip(sites, views)}))
            p.step()
    i = int(np.argmin(scores))  # ties keep the knapsack (listed first)
    n_weights = sum(s.size for s in sites)
    check = {"metric": "relative output squared error on held-back calibration data",
             "candidates": [{"plan": pl.label, "bits_per_weight": pl.stored_bits / n_weights, "distortion": d}
                            for d, (pl, _) in zip(scores, candidates)],
             "chosen": candidates[i][0].label,
             "knapsack_vs_best_uniform": _ratio(scores[0], min(scores[1:])) if len(scores) > 1 else None}
    if i:
        log.warning("plan check: %s beats the knapsack plan on held-back data (%.3g vs %.3g); shipping it",
                    candidates[i][0].label, scores[i], scores[0])
    return candidates[i], check


def _ratio(knapsack: float, best_other: float) -> float | None:
    """knapsack / best other distortion; both can be 0 (outputs that carry nothing, weights too small
    to change them): equal then, and no ratio when only the other is 0."""
    if best_other > 0:
        return knapsack / best_other
    return 1.0 if knapsack == 0 else None


def _report(recipe, sites, skipped, candidates, plan, quantizers, losses, check, n_weights,
            calib_source, n_all, n_fit, n_held, curvature_name) -> dict:
    layers = []
    for s in sites:
        f = plan.choice[s.name]
        j = candidates[s.name].index(f)
        layers.append({
            "name": s.name, "op_type": s.op_type, "shape": list(s.shape), "format": f.name,
            "bits": f.bits, "block_size": f.block, "grid": quantizers[s.name].grid_kind(f),
            "stored_bits": f.stored_bits(s.rows, s.L),
            "bits_per_weight": f.stored_bits(s.rows, s.L) / s.size,
            "expected_loss": quantizers[s.name].expected_loss(f),
            # None: no table (uniform planner) or a candidate the pre-screen dropped (never chosen by greedy)
            "table_loss": None if losses is None or not np.isfinite(losses[s.name][j]) else float(losses[s.name][j]),
        })
    stored = sum(l["stored_bits"] for l in layers)
    codes = sum(plan.choice[s.name].code_bits(s.rows, s.L) for s in sites)
    return {
        "version": REPORT_VERSION, "tool": "bayesq-onnx", "method": recipe.method, "target": recipe.target,
        "budget": recipe.bits, "bits_per_weight": stored / n_weights, "code_bits_per_weight": codes / n_weights,
        "n_weights": n_weights, "plan": plan.label, "plan_check": check,
        "curvature": curvature_name, "tables": recipe.table_source if recipe.method_spec.planner == "knapsack" else None,
        "calibration": {"source": calib_source, "samples": n_all, "fit": n_fit, "held_back": n_held},
        "layers": layers, "skipped": [{"name": k.name, "reason": k.reason} for k in skipped],
        # why each weight got what it got: the greedy upgrades in the order taken
        "allocation_steps": [{"name": sites[st.block].name,
                              "from": candidates[sites[st.block].name][st.from_].name,
                              "to": candidates[sites[st.block].name][st.to].name,
                              "loss_drop_per_bit": st.ratio, "extra_bits": st.extra_bits, "loss_drop": st.loss_drop}
                             for st in plan.steps],
        "recipe": recipe.to_dict(),
    }


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:
        return False
