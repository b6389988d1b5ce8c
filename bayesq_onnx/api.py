"""The public entry points: ``compress(model, recipe) -> Result`` and ``make_session``.

Data flow: WeightSite -> SiteStats -> Curvature -> Posterior -> loss tables -> Plan -> codes ->
lowered model -> report.  Each stage lives in its own package; this module only wires them.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .calib.capture import StatsAccumulator, capture_stats
from .calib.readers import (check_calibration, fixed_batch, input_specs, load_calibration, n_samples, split,
                            synthetic_calibration, take)
from .config import METHODS, Recipe
from .curvature.activation import ActivationCurvature
from .curvature.from_file import FileCurvature
from .curvature.trace import check_trace_source, file_traces, fisher_traces
from .errors import BayesQError, first_line, require
from .formats import Float32
from .graph.model_io import (ArraySpill, WeightFiles, bfloat16_hint, check_writable, checkable, fits, open_model,
                             prepare_model, save_json_atomic, save_model_atomic)
from .graph.sites import find_sites, float_initializer_bits, statistics_note
from .lower.ort_cpu import lower_ort_cpu, lower_portable
from .plan.candidates import candidate_formats
from .plan.check import Contender, check_plans, held_back_distortions, quantized_weights
from .plan.planner import check_budget, dense_knapsack_plan, knapsack_plan, uniform_plans
from .plan.proxy import OutputDistortion
from .plan.tables import MEASURED, ClosedFormTables, Grids, HawqTables, Tables, factor_samples
from .posterior.laplace import DiagonalLaplace
from .parallel import Budget, Overlap, overlap_jobs, parallel_map, side_by_side
from . import memory
from .progress import Progress
from .quantize.backend import backend
from .quantize.site import SharedFactor, SiteQuantizer
from .runtime.probe import Probe
from .runtime.stream import Stream
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
    """Everything that does not depend on the budget -- sites, calibration, the loss tables and the
    grids they chose -- computed once, then :meth:`compress` for any number of budgets
    (``Analysis(m, recipe, calib=c).compress(3.0)`` is ``compress(m, recipe, calib=c)`` at 3.0 bits).
    ``recipe.bits`` is ignored here.

    Memory follows a segment of the model, not the model (docs/design.md, "Streaming"): weights stay
    on disk, memory-mapped (``model_io.open_model``); calibration data passes through the model one
    segment at a time (``runtime/stream.py``), and the sites whose inputs are complete are quantized,
    measured and released before the next segment runs -- once for the tables, and once per budget
    to round and pack the plans the check compares, then once per plan on held-back data."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, recipe: Recipe, *,
                 calib: str | os.PathLike | dict | None = None, _check_bits: float | None = None,
                 _check_paths=()):
        t0 = time.perf_counter()
        self.recipe, self._input = recipe, model
        self.gptq_backend = backend(recipe.device)   # before reading the model: --device cuda without a GPU
        m, self.files = _read_model(model)
        self.model = m
        sites, skipped = find_sites(m, recipe.min_elements, recipe.exclude, recipe.include,
                                    [p for p, _ in recipe.pins])
        if not sites:
            why = f" ({skipped[0].name}: {skipped[0].reason})" if skipped else ""
            raise BayesQError(f"no quantizable weights found{why}")
        self.sites, self.skipped = sites, skipped
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
        self.file_curvature = FileCurvature(recipe.curvature, sites, recipe.evidence) if recipe.curvature else None
        data, self.calib_source, self.fixed = _read_calibration(m, calib, recipe)   # fixed: the graph's batch
        self.batch = self.fixed or recipe.batch_size
        self.uniform = not recipe.method_spec.allocates
        # only the plan check and distillation need held-back data; the uniform baselines calibrate on all of it
        self.fit, self.held = (data, take(data, 0)) if self.uniform and not recipe.distill else \
            split(data, recipe.holdout, self.fixed or 1)
        self.data = data   # all of it: a reference GPTQ plan that wins the check is rounded again on it
        self.n_calib = n_samples(data)
        self.probe = _probe(m, sites, self.files)
        _check_finite(sites, self.probe.weights)
        # unsupported ops fail here, before any work
        self._torch_model = _torch_model(m, self.files) if recipe.distill else None
        if calib is None:
            log.warning("no calibration data given (--calib): using %d synthetic samples built from the input "
                        "types; quality will suffer on real data", recipe.synthetic_samples)
        self.stream = Stream(self.probe, [s.name for s in sites], {s.name: s.activations for s in sites})
        if recipe.rounds_sequentially and len(self.stream) == 1:
            log.warning("--sequential does nothing here: the model cannot be cut into blocks (subgraphs, or over "
                        "2 GB), so every site is calibrated on the fp32 model's activations")
        self.curvature_name = self.file_curvature.name if self.file_curvature else ActivationCurvature.name
        self.tables_pass = None     # the knapsack's loss-table pass (made on first use)
        self._tables: Tables | None = None
        self.grids: Grids = {}      # grid kinds chosen by measurement: grow as budgets ask for formats
        self._rounded = {}          # what _round packed for earlier budgets
        self._spill = ArraySpill()  # where packed tensors wait, memory-mapped, for the check and the output
        self.seconds = time.perf_counter() - t0

    def blocks(self, data: dict[str, np.ndarray] | None = None, quantized=None, room=None, unseen: int = 0):
        """The sites' quantizers, a segment's worth at a time, from one pass of ``data`` (default: the
        fitting data) through the model: a site's statistics are complete after the last segment
        that reads it.  Yields those sites and their quantizers (by name), the caller's until the
        next block is asked for.  ``quantized`` (sequential mode): called with a block's sites once
        the caller is done with them, it returns their quantized weights (by name; the others stay
        fp32), and the segment runs again on them, so that later sites are calibrated on the
        quantized model's activations (docs/design.md, "Sequential").  ``room``: called with a block's
        sites before the segment that completes their statistics runs (``Overlap.reserve``), so that a
        block waiting for its turn holds nothing yet: neither its ``X^T X`` (a 1B Llama's MLP block:
        287 MB) nor copies of its weights (138 MB).  ``unseen``: the first samples of that many add to
        no ``X^T X`` (the kron factor is measured on them: docs/design.md, "Loss tables")."""
        recipe, stream = self.recipe, self.stream
        acc = StatsAccumulator(self.sites)
        ready = self._block_sites()
        factors = {}   # one GPTQ factor per distinct X^T X (sites reading one input share it), while needed
        data = self.fit if data is None else data
        # the unseen samples in batches of their own, however many a batch holds
        states = _ort(stream.start, take(data, unseen), self.fixed or min(self.batch, unseen)) if unseen else []
        head = len(states)
        states += _ort(stream.start, {k: v[unseen:] for k, v in data.items()}, self.batch)
        for k in range(len(stream)):
            again = quantized is not None and k + 1 < len(stream)   # the last segment feeds no site
            before = [dict(st) for st in states] if again else None  # its start cut, to run it again
            if ready[k] and room is not None:
                room(ready[k])
            for j, out in enumerate(_ort(stream.advance, k, states, None, stream.capture[k])):
                acc.add(out, grams=j >= head)
            if ready[k]:
                stats = {s.name: acc.take(s) for s in ready[k]}
                curvature = self.file_curvature or ActivationCurvature(stats, recipe.evidence)
                block = {s.name: _site_quantizer(s, self.probe.weights[s.name], curvature, stats[s.name].xtx,
                                                 recipe, factors, self.gptq_backend) for s in ready[k]}
                factors = {i: f for i, f in factors.items() if acc.holds(f[0])}   # a later site shares it
                yield ready[k], block
                block.clear()   # the caller is done with them: their views go before the next block's come
                memory.release()
                if again:
                    states = before
                    _ort(stream.advance, k, states, quantized(ready[k]), [])

    def _block_sites(self) -> list[list]:
        """The sites whose statistics are complete after each segment (after its last reader)."""
        ready = [[] for _ in range(len(self.stream))]
        for s in self.sites:
            ready[self.stream.last_reader(s.name)].append(s)
        return ready

    def curvature(self):
        """The curvature of every site at once: the file's, or the activation curvature from one
        whole-model calibration pass (not streamed: for callers that need all of it, --keep-posterior)."""
        if self.file_curvature is not None:
            return self.file_curvature
        return ActivationCurvature(_ort(capture_stats, self.probe, self.sites, self.fit, self.batch),
                                   self.recipe.evidence)

    def quantizers(self, names=None, unseen: int = 0) -> dict[str, SiteQuantizer]:
        """Quantizers of the sites ``names`` (default all) held at once: for tests and small models.
        ``unseen``: as for :meth:`blocks` (the loss tables' quantizers: ``self._unseen_samples()``)."""
        want = set(names or (s.name for s in self.sites))
        return {k: q for _, qs in self.blocks(unseen=unseen) for k, q in qs.items() if k in want}

    @property
    def losses(self) -> dict[str, np.ndarray]:
        """The knapsack's loss tables (computed on first use), one segment's sites at a time."""
        if self._tables is None:
            self._measure_tables()
        return self._tables.losses

    def _measure_tables(self, budget: Budget | None = None) -> None:
        """:attr:`losses`' work.  ``budget``: the blocks in flight, shared with a pass run beside this one."""
        source = self.recipe.table_source
        if source == "hawq":    # the mean Hessian trace per site, from the curvature file or the Fisher
            traces = file_traces(self.sites, self.file_curvature) if self.recipe.curvature else \
                fisher_traces(self.files.materialize(_copy(self.model)), self.sites, self.fit, self.recipe.seed)
            self.tables_pass = HawqTables(traces)
        elif source == "closed_form":
            self.tables_pass = ClosedFormTables()
        else:
            self.tables_pass = MEASURED[source](self._table_distortion, self.sites)
        losses, grids = {}, {}
        with Progress(f"loss tables ({self.tables_pass.name})", len(self.sites)) as p, \
                self._overlap(budget=budget) as overlap:
            def record(t: Tables, n: int):
                losses.update(t.losses)
                grids.update(t.grids)
                p.step(n)

            for block, qs in self.blocks(room=lambda block: overlap.reserve(_weights(block)),
                                         unseen=self._unseen_samples()):
                overlap.submit(lambda block=block, qs=dict(qs): self.tables_pass(block, self.candidates, qs),
                               lambda t, n=len(block): record(t, n))
        self._tables = Tables({s.name: losses[s.name] for s in self.sites}, grids)
        self.grids.update(grids)

    def _unseen_samples(self) -> int:
        """How many of the fitting data's first samples the loss tables' ``X^T X`` leave out: those
        the kron factor is measured on (``tables.KronTables``), where the fitting data keep at least as
        many besides; none for the other sources."""
        if not self.tables_pass.factor_unseen:
            return 0
        n = n_samples(self.tables_pass.distortion.data)
        return n if 2 * n <= n_samples(self.fit) else 0

    @property
    def _table_distortion(self) -> OutputDistortion:
        """The output distortion the tables are measured with (``proxy_samples``, or ``scale_samples``
        for kron) of the fitting data."""
        r = self.recipe
        n = factor_samples(_positions(self.probe, self.fit, self.fixed or self.batch), r.scale_samples) \
            if r.table_source == "kron" else r.proxy_samples
        batch = self.fixed or min(self.batch, n)   # fewer samples than a batch: a smaller batch
        return OutputDistortion(self.probe, take(self.fit, -(-n // batch) * batch), batch)

    def compress(self, bits: float, *, output: str | os.PathLike | None = None,
                 report: str | os.PathLike | None = None, _t0: float | None = None,
                 _single_use: bool = False) -> Result:
        t0 = time.perf_counter() if _t0 is None else _t0
        recipe, sites = replace(self.recipe, bits=bits), self.sites
        check_budget(sites, self.candidates, bits)
        budget_bits = bits * self.n_weights
        uniforms = uniform_plans(sites, self.candidates, budget_bits)
        check, losses, done = None, None, {}
        if self.uniform:
            if not uniforms:
                raise BayesQError(f"no uniform format fits a budget of {bits:g} bits/weight for --method "
                                  f"{recipe.method}")
            contenders = [Contender(uniforms[0], uniform=True)]
        else:
            reference = [Contender(replace(u, label=f"gptq {u.label}"), reference=True, uniform=True)
                         for u in uniforms[:1]]
            early = self._tables_beside(reference, keep=not _single_use)
            losses = self.losses
            knapsack = knapsack_plan(sites, self.candidates, losses, budget_bits)
            dense = dense_knapsack_plan(sites, self.candidates, losses, budget_bits, knapsack)
            contenders = [Contender(knapsack), *([Contender(dense)] if dense else []),
                          *[Contender(u, uniform=True) for u in uniforms[:self.tables_pass.uniform_checked]],
                          *reference]
            if early is not None:
                done = {len(contenders) - 1: early}
        packed, grids, expected = self._round(contenders, None if self.uniform else contenders[0].plan,
                                              keep=not _single_use, done=done)
        if len(contenders) > 1:
            i, check = check_plans(contenders, packed, sites, self.stream, self.probe, self.held, self.batch)
        else:
            i = 0
        chosen, shipped = contenders[i], packed[i]
        del packed   # the other contenders' tensors go now (a 1B model's: about 350 MB each at 3 bits)
        if chosen.reference and self.held is not self.fit:
            # the check chose the algorithm on unseen data; its codes are then fitted on all the data,
            # so they are the bytes --method gptq ships (docs/design.md, "Plan check")
            [shipped], _, _ = self._round([chosen], data=self.data)
            check["refit_on_all_samples"] = True
        shipped, distilled = self._distill(chosen, shipped, recipe.distill) if recipe.distill else (shipped, None)
        out_model = _lower(self.model, self.files, sites, chosen, shipped, recipe)
        del shipped  # copied into the model's initializers
        rep = _report(recipe, sites, self.skipped, self.candidates, chosen, grids[i], expected[i], losses, check,
                      self.n_weights, self.calib_source, self.n_calib, n_samples(self.fit),
                      n_samples(self.held), self.curvature_name, (self.other_weights, self.other_bits))
        rep["distill"] = distilled
        # whether later blocks were calibrated on the quantized model (one segment: nothing to feed forward)
        rep["sequential"] = {"on": recipe.rounds_sequentially and len(self.stream) > 1, "segments": len(self.stream)}
        # a reused analysis is paid once: each budget's report counts its own work plus the analysis
        rep["seconds"] = round(time.perf_counter() - t0 + (0 if _single_use else self.seconds), 3)
        if isinstance(self._input, (str, os.PathLike)):
            rep["input"] = str(self._input)
        if fits(out_model, self.files):   # self-contained; a bigger one refers to its data where it is written
            self.files.materialize(out_model)
        if output is not None:
            try:
                path = save_model_atomic(out_model, output, self.files)
            except OSError as e:
                raise BayesQError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
            rep["output"] = str(path)
            rep["output_bytes"] = path.stat().st_size + sum(
                p.stat().st_size for p in [path.with_name(path.name + ".data")] if p.exists())
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

    def _tables_beside(self, reference: list[Contender], keep: bool):
        """On the first budget, the loss tables' pass and the reference GPTQ contender's own pass
        (where it has one), which needs no table, side by side, their blocks in flight within one
        budget: the reference pass alone keeps about one core of two busy, and the tables' pass
        leaves cores idle during its forward passes (docs/design.md, "Streaming").  Only beside
        measured tables: closed-form ones cost next to nothing, and hawq's Fisher holds the whole
        model.  The reference contender's ``[packed, grids, expected]``, or None where nothing ran early."""
        _, apart = self._rounds_apart()
        if self._tables is not None or not reference or self.recipe.table_source not in MEASURED or apart is None:
            return None
        budget = Budget(self._largest_block)
        _, (packed, grids, expected) = side_by_side(
            lambda run: run(), [lambda: self._measure_tables(budget),
                                lambda: self._round_pass(reference, None, keep, apart, budget)],
            cancel=budget.cancel)
        return [packed[0], grids[0], expected[0]]

    def _rounds_apart(self) -> tuple[bool, bool | None]:
        """Whether the knapsack's pass runs sequentially, and whether the reference GPTQ contender's
        own pass does (None: it has no pass of its own but shares the knapsack's, whose activations
        are the fp32 model's as its are).  Sequential only where the model has blocks: one segment
        has nothing to feed forward."""
        cut = len(self.stream) > 1
        ours, gptq = self.recipe.rounds_sequentially and cut, METHODS["gptq"].sequential and cut
        return ours, (gptq if ours or gptq else None)

    def _round(self, contenders: list[Contender], knapsack=None, keep: bool = False, data=None, done=None):
        """Every contender's packed tensors, grid kinds and expected losses per site, rounded a
        segment's sites at a time.  ``knapsack``: the plan whose formats get their grids measured
        where several are on offer.  ``keep``: remember the packed results for later budgets (an
        analysis used more than once): a format a site takes again is not rounded again (packed
        tensors are small).  ``data``: calibrate on these samples instead of the fitting ones (nothing
        reused or kept: what is kept was fitted on those).  ``done``: results already rounded, by
        contender index (:meth:`_tables_beside`).
        Sequential (``recipe.rounds_sequentially``): each block is calibrated on the model quantized as the
        first contender ships it up to there, and every contender of the budget is rounded on those
        same activations (docs/design.md, "Sequential").  The reference GPTQ contender is calibrated as
        ``--method gptq`` is: where that is sequential and the model has blocks, on its own codes, in a
        pass of its own, run beside the others' (``parallel.side_by_side``: alone it keeps about one core
        busy), the blocks of both in flight within one budget; else in the others' pass, sharing GPTQ's
        work (docs/design.md, "Plan check")."""
        ref, done = [c.reference for c in contenders], done or {}
        ours, gptq = self._rounds_apart()
        passes = [(range(len(contenders)), ours, knapsack)]
        if any(ref) and gptq is not None:   # the contenders' activations differ
            passes = [([i for i, r in enumerate(ref) if not r], ours, knapsack),
                      ([i for i, r in enumerate(ref) if r], gptq, None)]
        passes = [([i for i in idx if i not in done], sequential, plan) for idx, sequential, plan in passes]
        passes = [p for p in passes if p[0]]
        budget = Budget(self._largest_block)   # the passes' blocks in flight together, as one pass's

        def run(p):
            idx, sequential, plan = p
            return idx, self._round_pass([contenders[i] for i in idx], plan, keep, sequential, budget, data)

        out = [done.get(i) for i in range(len(contenders))]
        for idx, results in side_by_side(run, passes, cancel=budget.cancel):
            for i, *r in zip(idx, *results):
                out[i] = r
        packed, grids, expected = (list(x) for x in zip(*out))
        return packed, grids, expected

    def _round_pass(self, contenders: list[Contender], knapsack, keep: bool, sequential: bool, budget: Budget,
                    data=None):
        """:meth:`_round`'s work for contenders rounded on the same activations: those of the model
        quantized as ``contenders[0]`` ships it (``sequential``), else of the fp32 model."""
        sites, n = self.sites, len(contenders)
        cache, keep = (self._rounded, keep) if data is None else ({}, False)
        packed, grids, expected = [{} for _ in range(n)], [{} for _ in range(n)], [{} for _ in range(n)]
        feed = quantized_weights(contenders[0], packed[0]) if sequential else None
        ours = not all(c.reference for c in contenders)   # else the reference GPTQ's own pass
        what = "rounding and packing" + ("" if ours else " gptq's plan") + (", sequentially" if sequential else "")
        # a site's rounding costs about its weights' worth (a 30522-word embedding's codebook is most of MiniLM's)
        with Progress(what, len(sites), work=sum(s.size for s in sites)) as p, \
                self._overlap(sequential=feed is not None, budget=budget) as overlap:
            for j, (block, qs) in enumerate(self.blocks(data, quantized=feed,
                                                        room=lambda block: overlap.reserve(_weights(block)))):
                # sequential: a site's codes and measured grids depend on the plan of the sites before it,
                # so only the first block, which no quantized weight reaches, shares them across budgets.
                # Measured grids are the knapsack's pass's alone: the reference GPTQ contender takes its
                # own (and its pass may run beside the knapsack's, which adds to self.grids)
                known = (self.grids if feed is None or j == 0 else dict(self.grids)) if ours else {}
                reuse = cache if feed is None or j == 0 else {}

                def record(done, block=block, reuse=reuse, known=known):
                    measured, results = done
                    known.update(measured)
                    for s, res in zip(block, results):
                        for i, (key, (arrays, loss)) in enumerate(res):
                            if arrays is not None:   # to disk, on this machine (a Ray worker's result arrives here)
                                arrays = self._spill.put(arrays)
                            if keep:
                                reuse[key] = arrays, loss
                            if arrays is not None:
                                packed[i][s.name] = arrays
                            grids[i][s.name], expected[i][s.name] = key[2], loss
                        p.step(work=s.size)

                overlap.submit(lambda block=block, qs=dict(qs), reuse=reuse, known=known:
                               self._pack_block(block, qs, contenders, knapsack, reuse, known), record)
        return packed, grids, expected

    def _pack_block(self, block, qs, contenders: list[Contender], knapsack, reuse: dict, known: Grids):
        """One block's share of :meth:`_round`, free of side effects (it may run beside the next
        block's forward pass): the grids measured for the knapsack's formats, and per site, per
        contender, ``(key, (packed arrays, expected loss))``, from ``reuse`` where it holds the key."""
        refs = {k: q.reference() for k, q in qs.items()} if any(c.reference for c in contenders) else {}
        # the grids the knapsack's formats are rounded on, measured where on offer
        measured = self.tables_pass.grids_for(knapsack, block, qs, known) if knapsack is not None else {}

        def pack(s):
            res, mine = [], {}   # this site's results by key: contenders of one format share them
            for c in contenders:
                q, fmt = (refs if c.reference else qs)[s.name], c.plan.choice[s.name]
                kind = q.grid_kind(fmt, None if c.reference else measured.get((s.name, fmt), known.get((s.name, fmt))))
                key = (s.name, fmt, kind, c.reference)
                if key in mine or key in reuse:
                    arrays, loss = mine.get(key) or reuse[key]
                else:
                    arrays, loss = None if isinstance(fmt, Float32) else fmt.pack(q.codes(fmt, kind)), None
                # a uniform plan (--method gptq's, or one the check rates) was chosen by no expected
                # loss, and its closed form would cost about a fifth of a gptq run (docs/design.md,
                # "Plan check"): only the knapsack's plans get one
                if loss is None and not c.uniform:
                    loss = q.expected_loss(fmt, kind)
                mine[key] = arrays, loss
                res.append((key, (arrays, None if c.uniform else loss)))
            return res

        return measured, list(parallel_map(pack, block))

    @property
    def _largest_block(self) -> int:
        return max(_weights(b) for b in self._block_sites())

    def _overlap(self, sequential: bool = False, budget: Budget | None = None) -> Overlap:
        """How a pass over the blocks overlaps one block's work with the next block's forward pass:
        never in sequential mode (the next block runs on this one's codes); else with blocks in flight
        up to the largest block's weights (``budget``, shared by passes that run at once), so memory
        holds about two of the largest blocks."""
        return Overlap(budget or Budget(self._largest_block), 0 if sequential else overlap_jobs())

    def _distill(self, chosen: Contender, packed: dict, steps: int) -> tuple[dict, dict]:
        """The chosen plan's packed tensors with its scales and levels tuned toward the fp32 outputs on
        the fitting data (quantize/distill.py), if that lowers the distortion on the held-back data;
        the report's ``distill`` entry (docs/design.md, "Distillation")."""
        from .curvature.trace import likelihood_for
        from .quantize.distill import distill
        quantized = [s for s in self.sites if s.name in packed]
        fmts = {s.name: chosen.plan.choice[s.name] for s in quantized}
        outputs = OutputDistortion(self.probe, take(self.held, self.batch), self.batch).outputs
        model = self._torch_model
        d = distill(lambda w, batch: model.run(batch, w, outputs=outputs), model.params, quantized,
                    {s.name: (fmts[s.name], fmts[s.name].unpack(packed[s.name], s.rows, s.L)) for s in quantized},
                    self.fit, outputs, {o for o in outputs if likelihood_for(o) == "categorical"},
                    steps, self.batch, self.recipe.seed)
        tuned = {k: fmts[k].pack(q) for k, q in d.codes.items()}
        before, after = held_back_distortions([chosen, chosen], [packed, tuned], self.sites, self.stream,
                                              self.probe, self.held, self.batch, "distillation check")
        if after >= before:
            log.warning("distillation: the tuned model does not lower the held-back distortion (%.4g vs %.4g); "
                        "shipping the untuned one", after, before)
        return (tuned if after < before else packed), {
            "steps": steps, "calibration_loss": [d.loss_before, d.loss_after],
            "held_back_distortion": [before, after], "shipped": bool(after < before)}


def _weights(sites) -> int:
    """What a block's work is bounded by (``parallel.Budget``): its sites' weights."""
    return sum(s.size for s in sites)


def _torch_model(m: onnx.ModelProto, files):
    """The model run by torch ops (curvature/onnx_torch.py), its weights replaceable by name: unlike the
    rest of the analysis it holds every weight in memory."""
    require("torch", "pip install torch==2.13.0", "distillation (--distill)")
    from .curvature.onnx_torch import OnnxTorch, plain_graph
    full = onnx.ModelProto()
    full.CopyFrom(m)
    try:
        return OnnxTorch(plain_graph(files.materialize(full)))
    except BayesQError as e:
        raise BayesQError(f"--distill: {e}") from None


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


def _read_model(model) -> tuple[onnx.ModelProto, WeightFiles]:
    """Our own checked, normalized copy (the caller's file or proto is never touched): from a file,
    with its weights left on disk (model_io.open_model)."""
    if isinstance(model, onnx.ModelProto):
        return prepare_model(_copy(model)), WeightFiles(None)
    return open_model(model)


def _ort(run, *args):
    """``run(*args)``, where an onnxruntime failure on the user's calibration data is a one-line error."""
    try:
        return run(*args)
    except (BayesQError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:
        raise BayesQError(f"onnxruntime failed on the calibration data: {first_line(e)}") from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _check_finite(sites, weights: dict[str, np.ndarray]) -> None:
    for s in sites:   # one weight at a time: a mapped weight is read, not held
        if not np.isfinite(weights[s.name]).all():
            raise BayesQError(f"weight {s.name!r} contains NaN or Inf")


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


def _probe(m: onnx.ModelProto, sites, files: WeightFiles) -> Probe:
    try:
        return Probe(m, [s.name for s in sites], [a for s in sites for a in s.activations], files)
    except Exception as e:  # unknown ops, bad graphs: onnxruntime says why
        raise BayesQError(f"onnxruntime cannot run the model: {first_line(e)}{bfloat16_hint(m)}") from None


def _positions(probe: Probe, data: dict, batch: int) -> int:
    """Output positions per sample, the fewest over the float outputs, from one batch's run: a
    language model's tokens, 1 for a pooled embedding or a class (each output's dimensions between
    the batch and the last).  A batch as the other runs take, not one sample, so that it reuses their
    side-tensor session (one per batch shape: runtime/stream.py); a batch of one once ran the whole
    model there, before ``graph.shapes.fold_shapes`` could fold an exported transformer's shapes at
    that size (the float16 1B Llama: every weight widened at once, 4.2 GB)."""
    out = next(probe.run(take(data, batch), batch))
    return min((math.prod(v.shape[1:-1]) for v in out.values() if np.issubdtype(v.dtype, np.floating) and v.ndim),
               default=1)


def _site_quantizer(site, weight, curvature, xtx, recipe: Recipe, factors: dict, gptq_backend) -> SiteQuantizer:
    view = site.to_view(weight)
    h = curvature.diagonal(site)
    if not np.any(h > 0):  # never reached by the data: no information, weigh all alike
        h = np.ones_like(h)
    factor = None if xtx is None else \
        factors.setdefault(id(xtx), (xtx, SharedFactor(xtx, recipe.gptq_damp, recipe.act_order, gptq_backend)))[1]
    # a convolution's grid is decided end to end: its layer output error misjudges clipping.  A
    # looked-up table's codebooks fit its trained rows, not their posterior: a row the calibration data
    # never looks up has the prior's width, and unseen text looks it up (docs/design.md, "Codebooks");
    # a tied table's rows are all measured by the head's X^T X
    return SiteQuantizer(view, DiagonalLaplace.fit(view, h, recipe.damping), xtx, recipe.method_spec,
                         recipe.gptq_damp, recipe.act_order, measure_grids=site.kind.convolved, factor=factor,
                         backend=gptq_backend, levels_on_means=site.kind.only_looked_up)


def _lower(m: onnx.ModelProto, files: WeightFiles, sites, chosen: Contender, packed, recipe: Recipe) -> onnx.ModelProto:
    lower = lower_portable if recipe.target == "portable" else lower_ort_cpu
    out = lower(m, sites, chosen.plan.choice, packed, recipe.accuracy_level)
    full = _passes_full_check(m)
    try:  # the full check (with shape inference) whenever the input model passes it too
        onnx.checker.check_model(checkable(out), full_check=full)
    except Exception as e:  # a bug of ours, not the user's: say so plainly
        # an input the checker refused (and onnxruntime runs: model_io.prepare_model) may keep its fault
        if full or first_line(e) != _checker_error(m):
            raise RuntimeError(f"internal error: the lowered model fails onnx.checker: {first_line(e)}") from e
    return out


def _report(recipe, sites, skipped, candidates, chosen: Contender, grids, expected, losses, check, n_weights,
            calib_source, n_all, n_fit, n_held, curvature_name, others) -> dict:
    plan = chosen.plan
    layers = []
    for s in sites:
        f = plan.choice[s.name]
        j = candidates[s.name].index(f)
        layers.append({
            "name": s.name, "op_type": s.op_type, "shape": list(s.shape), "format": f.name,
            "bits": f.bits, "block_size": f.block, "sparsity": f.sparsity, "grid": grids[s.name],
            "stored_bits": f.stored_bits(s.rows, s.L),
            "bits_per_weight": f.stored_bits(s.rows, s.L) / s.size,
            "expected_loss": expected[s.name],
            # None: no table (uniform planner) or a candidate the pre-screen dropped (never chosen by greedy)
            "table_loss": None if losses is None or not np.isfinite(losses[s.name][j]) else float(losses[s.name][j]),
            **statistics_note(s),   # read inside a subgraph: what its statistics come from
        })
    stored = sum(l["stored_bits"] for l in layers)
    codes = sum(plan.choice[s.name].code_bits(s.rows, s.L) for s in sites)
    return {
        "version": REPORT_VERSION, "tool": "bayesq-onnx", "method": recipe.method, "target": recipe.target,
        "budget": recipe.bits, "bits_per_weight": stored / n_weights, "code_bits_per_weight": codes / n_weights,
        "sparsity": sum(l["sparsity"] * s.size for l, s in zip(layers, sites)) / n_weights,
        "n_weights": n_weights,
        # the whole model: quantized weights as stored, every other float initializer in its own type
        "bits_per_weight_all": (stored + others[1]) / (n_weights + others[0]), "n_weights_all": n_weights + others[0],
        "plan": plan.label, "plan_check": check,
        "curvature": curvature_name, "tables": recipe.table_source if recipe.method_spec.allocates else None,
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
        onnx.checker.check_model(checkable(model))
        return None
    except Exception as e:
        return first_line(e)


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(checkable(model), full_check=True)
        return True
    except Exception:
        return False
