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
from .curvature.trace import check_trace_source, file_traces, fisher_traces
from .errors import BayesQError, first_line
from .formats import Float32
from .graph.model_io import bfloat16_hint, check_writable, load_model, prepare_model, save_json_atomic, save_model_atomic, to_array
from .graph.sites import find_sites, float_initializer_bits, statistics_note
from .lower.ort_cpu import lower_ort_cpu, lower_portable
from .plan.candidates import candidate_formats
from .plan.check import Contender, check_plans, grid_of
from .plan.planner import check_budget, knapsack_plan, uniform_plans
from .plan.proxy import OutputDistortion
from .plan.tables import MEASURED, ClosedFormTables, Grids, HawqTables, Tables
from .posterior.laplace import DiagonalLaplace
from .parallel import parallel_map
from .progress import Progress
from .quantize.backend import backend
from .quantize.site import SharedFactor, SiteQuantizer
from .runtime.probe import Probe
from .runtime import custom_ops
from .runtime.session import make_session

__all__ = ["compress", "Analysis", "make_session", "Result", "Recipe"]

log = logging.getLogger(__name__)
REPORT_VERSION = 1


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
        gptq_backend = backend(recipe.device)     # before reading the model: --device cuda without a GPU
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
        # every other float initializer, as stored (skipped weights, biases, norms): the all-weights figure
        self.other_weights, self.other_bits = float_initializer_bits(m, {s.name for s in sites})
        if _check_bits is not None:
            check_budget(sites, self.candidates, _check_bits)
        if recipe.table_source == "hawq":
            check_trace_source(recipe.method, recipe.curvature)
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
        factors = {}   # one GPTQ factor per distinct X^T X (sites reading one input share it)
        self.quantizers = {s.name: _site_quantizer(s, weights[s.name], self.curvature, stats[s.name].xtx, recipe,
                                                   factors, gptq_backend) for s in sites}
        self.tables_pass = None     # the knapsack's loss-table pass (made on first use)
        self._tables: Tables | None = None
        self._reference = None
        self.grids: Grids = {}      # grid kinds chosen by measurement: grow as budgets ask for formats
        self.seconds = time.perf_counter() - t0

    @property
    def losses(self) -> dict[str, np.ndarray]:
        """The knapsack's loss tables (computed on first use)."""
        if self._tables is None:
            source = self.recipe.table_source
            if source == "hawq":    # the mean Hessian trace per site, from the curvature file or the Fisher
                traces = file_traces(self.sites, self.curvature) if self.recipe.curvature else \
                    fisher_traces(self.model, self.sites, self.fit, self.recipe.seed)
                self.tables_pass = HawqTables(traces)
            elif source == "closed_form":
                self.tables_pass = ClosedFormTables()
            else:
                self.tables_pass = MEASURED[source](self._table_distortion)
            self._tables = self.tables_pass(self.sites, self.candidates, self.quantizers)
            self.grids.update(self._tables.grids)
        return self._tables.losses

    @property
    def _table_distortion(self) -> OutputDistortion:
        """The output distortion the tables are measured with (``proxy_samples``, or ``scale_samples``
        for kron) of the fitting data."""
        r = self.recipe
        n = r.scale_samples if r.table_source == "kron" else r.proxy_samples
        return OutputDistortion(self.probe, take(self.fit, -(-n // self.batch) * self.batch), self.batch)

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
        check, losses = None, None
        if self.uniform:
            if not uniforms:
                raise BayesQError(f"no uniform format fits a budget of {bits:g} bits/weight for --method "
                                  f"{recipe.method}")
            chosen = Contender(uniforms[0], self.quantizers, {})
        else:
            losses = self.losses
            knapsack = knapsack_plan(sites, self.candidates, losses, budget_bits)
            self.grids.update(self.tables_pass.grids_for(knapsack, sites, self.quantizers, self.grids))
            ours = [Contender(p, self.quantizers, self.grids)
                    for p in [knapsack, *uniforms[:self.tables_pass.uniform_checked]]]
            reference = [Contender(replace(u, label=f"gptq {u.label}"), self.reference_quantizers, {})
                         for u in uniforms[:1]]
            chosen, check = check_plans(ours + reference, sites, self.probe, self.held, self.batch)
        out_model = _lower(self.model, sites, chosen, recipe, forget=_single_use)
        rep = _report(recipe, sites, self.skipped, self.candidates, chosen, losses, check,
                      self.n_weights, self.calib_source, self.n_calib, n_samples(self.fit),
                      n_samples(self.held), self.curvature.name, (self.other_weights, self.other_bits))
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
            except BaseException as e:
                if output is not None:   # all or nothing: no model without the report asked for
                    for p in (Path(output), Path(output).with_name(Path(output).name + ".data")):
                        p.unlink(missing_ok=True)
                if isinstance(e, OSError):
                    raise BayesQError(f"cannot write {report}: {e.strerror or first_line(e)}") from None
                raise
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
    # float16 / bfloat16 weights are analysed in float32 (exact); formats store the model's type
    weights = {s.name: to_array(inits[s.name]).astype(np.float32) for s in sites}
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
        raise BayesQError(f"onnxruntime cannot run the model: {first_line(e)}{bfloat16_hint(m)}") from None


def _site_quantizer(site, weight, curvature, xtx, recipe: Recipe, factors: dict, gptq_backend) -> SiteQuantizer:
    view = site.to_view(weight)
    h = curvature.diagonal(site)
    if not np.any(h > 0):  # never reached by the data: no information, weigh all alike
        h = np.ones_like(h)
    # a convolution's grid is decided end to end: its layer output error misjudges clipping
    factor = None if xtx is None else \
        factors.setdefault(id(xtx), SharedFactor(xtx, recipe.gptq_damp, recipe.act_order, gptq_backend))
    return SiteQuantizer(view, DiagonalLaplace.fit(view, h, recipe.damping), xtx, recipe.method_spec,
                         recipe.gptq_damp, recipe.act_order, measure_grids=site.kind == "conv", factor=factor,
                         backend=gptq_backend)


def _lower(m: onnx.ModelProto, sites, chosen: Contender, recipe: Recipe, forget: bool) -> onnx.ModelProto:
    plan, quantizers = chosen.plan, chosen.quantizers

    def pack(s):
        fmt = plan.choice[s.name]
        out = None if isinstance(fmt, Float32) else fmt.pack(quantizers[s.name].codes(fmt, grid_of(chosen, s)))
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
    full = _passes_full_check(m)
    try:  # the full check (with shape inference) whenever the input model passes it too
        onnx.checker.check_model(out, full_check=full)
    except Exception as e:  # a bug of ours, not the user's: say so plainly
        # an input the checker refused (and onnxruntime runs: model_io.prepare_model) may keep its fault
        if full or first_line(e) != _checker_error(m):
            raise RuntimeError(f"internal error: the lowered model fails onnx.checker: {first_line(e)}") from e
    return out


def _report(recipe, sites, skipped, candidates, chosen: Contender, losses, check, n_weights,
            calib_source, n_all, n_fit, n_held, curvature_name, others) -> dict:
    plan, quantizers = chosen.plan, chosen.quantizers
    layers = []
    for s in sites:
        f = plan.choice[s.name]
        j = candidates[s.name].index(f)
        layers.append({
            "name": s.name, "op_type": s.op_type, "shape": list(s.shape), "format": f.name,
            "bits": f.bits, "block_size": f.block, "grid": grid_of(chosen, s),
            "stored_bits": f.stored_bits(s.rows, s.L),
            "bits_per_weight": f.stored_bits(s.rows, s.L) / s.size,
            "expected_loss": quantizers[s.name].expected_loss(f, grid_of(chosen, s)),
            # None: no table (uniform planner) or a candidate the pre-screen dropped (never chosen by greedy)
            "table_loss": None if losses is None or not np.isfinite(losses[s.name][j]) else float(losses[s.name][j]),
            **statistics_note(s),   # read inside a subgraph: what its statistics come from
        })
    stored = sum(l["stored_bits"] for l in layers)
    codes = sum(plan.choice[s.name].code_bits(s.rows, s.L) for s in sites)
    return {
        "version": REPORT_VERSION, "tool": "bayesq-onnx", "method": recipe.method, "target": recipe.target,
        "budget": recipe.bits, "bits_per_weight": stored / n_weights, "code_bits_per_weight": codes / n_weights,
        "n_weights": n_weights,
        # the whole model: quantized weights as stored, every other float initializer in its own type
        "bits_per_weight_all": (stored + others[1]) / (n_weights + others[0]), "n_weights_all": n_weights + others[0],
        "plan": plan.label, "plan_check": check,
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


def _checker_error(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model)
        return None
    except Exception as e:
        return first_line(e)


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:
        return False
