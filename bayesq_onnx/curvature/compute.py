"""``compute_curvature``: the diagonal curvature of an ONNX model's weights from calibration data, in
the ``CURV.npz`` contract that ``compress --curvature`` reads (keys = initializer names, values =
diagonal curvature in the initializer's shape, float32, finite, >= 0).

Sources:
- ``fisher``: diagonal Fisher ``E[g^2]`` of per-sample gradients (``fisher.py``), labels from the
  model's predictive (exact expectation when affordable, else ``probes`` sampled labels per input,
  default 1) or given.  Written for every float initializer of rank >= 1.
- ``hutchinson``: Hessian diagonal by Rademacher probes (``hutchinson.py``) of the NLL of given
  labels, or of the KL from the model's own predictive (whose Hessian is the Fisher).  Negative
  estimates (probe noise, or an indefinite NLL Hessian) are clipped to 0 and each tensor rescaled
  to its unclipped total (``hutchinson.nonnegative``); the count is reported.
- ``activation``: the forward-only curvature compress uses by default (``activation.py``),
  ``2 diag(X^T X)`` per calibration row, broadcast to every weight; written for the quantizable
  weights (``graph.sites``) only.

Scale: every source is per calibration sample (or row), i.e. the curvature of the *mean* loss,
times ``evidence`` (default 1).  Gradients come from the ONNX graph itself (``onnx_torch``): no torch
source is needed and nothing has to be mapped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calib.readers import check_calibration, fixed_batch, input_specs, load_calibration, n_samples
from ..errors import BayesQError, first_line, require
from ..graph.model_io import save_npz_atomic

SOURCES = ("fisher", "hutchinson", "activation")
LIKELIHOODS = ("categorical", "gaussian")   # fisher.LIKELIHOODS (kept here: torch loads only when needed)
DEFAULT_PROBES = 32   # Hutchinson probes; the reported spread says whether that is enough


@dataclass(frozen=True)
class CurvatureOptions:
    source: str = "fisher"
    probes: int | None = None         # hutchinson: probes (default DEFAULT_PROBES); fisher: labels drawn per input
    likelihood: str = "categorical"
    output: str | None = None         # model output (or any tensor) the likelihood is over; default the first
    seed: int = 0
    evidence: float = 1.0             # multiplies the written curvature (training rows / samples)
    batch_size: int = 8               # samples per forward for hutchinson and activation
    threads: int | None = None        # torch threads while computing (None: torch's default)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise BayesQError(f"unknown curvature source {self.source!r}; choose from {', '.join(SOURCES)}")
        if self.likelihood not in LIKELIHOODS:
            raise BayesQError(f"unknown likelihood {self.likelihood!r}; choose from {', '.join(LIKELIHOODS)}")
        if self.probes is not None and self.probes < 1:
            raise BayesQError(f"--probes must be >= 1, got {self.probes}")
        if not (self.evidence > 0 and np.isfinite(self.evidence)):
            raise BayesQError(f"evidence must be a positive number, got {self.evidence}")
        if self.batch_size < 1:
            raise BayesQError(f"batch size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise BayesQError(f"--threads must be >= 1, got {self.threads}")


class CurvatureResult(dict):
    """``{initializer name: curvature}`` plus ``info`` (source, settings, timing, estimator spread)."""

    def __init__(self, arrays: dict[str, np.ndarray], info: dict):
        super().__init__(arrays)
        self.info = info


def compute_curvature(model, calib, source: str = "fisher", probes: int | None = None,
                      likelihood: str = "categorical", labels=None, output: str | None = None, seed: int = 0, *,
                      evidence: float = 1.0, batch_size: int = 8, threads: int | None = None,
                      path: str | os.PathLike | None = None, kfac_path: str | os.PathLike | None = None
                      ) -> CurvatureResult:
    """Curvature of ``model`` (path or ``onnx.ModelProto``) on ``calib`` (``.npz`` path, directory,
    or dict of arrays).  ``labels``: array or ``.npy`` path, one entry per sample (categorical:
    integer class per position, negative = ignored; gaussian: float array of the output's shape).
    ``path``: write ``CURV.npz`` there (atomically); ``kfac_path``: K-FAC factors (fisher only;
    ``kfac.py``: keys ``A/<weight>``, ``G/<weight>``, float64, per row / per sample, not scaled by
    ``evidence``).
    ``threads``: torch threads for the gradient sources, restored afterwards (on a busy machine one
    thread was 3-10x faster than two: idle threads spin while they wait for a core)."""
    opts = CurvatureOptions(source, probes, likelihood, output, seed, evidence, batch_size, threads)
    if kfac_path is not None and opts.source != "fisher":
        raise BayesQError("K-FAC factors come with --source fisher only")
    if opts.source == "activation" and (labels is not None or probes is not None or output is not None):
        raise BayesQError("activation curvature takes no labels, probes or output (it is forward-only)")
    if path is not None:
        _check_path(path)
    if kfac_path is not None:
        _check_path(kfac_path)
    m = _read_model(model)
    data, fixed = _read_data(m, calib)
    t0 = time.perf_counter()
    if opts.source == "activation":
        arrays, info = _activation(m, data, opts, fixed)
        factors = None
    else:
        arrays, info, factors = _gradient(m, data, opts, labels, fixed, kfac_path is not None)
    info.update(source=opts.source, samples=n_samples(data), evidence=opts.evidence, seed=opts.seed,
                seconds=round(time.perf_counter() - t0, 3), tensors=len(arrays),
                weights=int(sum(a.size for a in arrays.values())))
    arrays = {k: (v * opts.evidence).astype(np.float32) for k, v in arrays.items()}
    for k, v in arrays.items():
        if not np.isfinite(v).all():
            raise BayesQError(f"curvature of {k!r} is not finite (overflow in the model's gradients?)")
    if path is not None:
        save_npz_atomic(arrays, path)
    if factors is not None:
        save_npz_atomic(factors, kfac_path)
    return CurvatureResult(arrays, info)


# ----------------------------------------------------------------------------- inputs


def _check_path(path) -> None:
    from ..graph.model_io import check_writable
    check_writable(path)


def _read_model(model):
    import onnx

    from ..graph.model_io import load_model, prepare_model
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return prepare_model(m)
    return load_model(model)


def _read_data(m, calib) -> tuple[dict[str, np.ndarray], int | None]:
    specs = input_specs(m)
    if calib is None:
        raise BayesQError("gradient and activation curvature need calibration data (--calib)")
    data = check_calibration(calib, specs, "calibration data") if isinstance(calib, dict) \
        else load_calibration(calib, specs)
    fixed = fixed_batch(specs)
    if fixed and n_samples(data) % fixed:
        raise BayesQError(f"the model runs in fixed batches of {fixed}, which do not divide the "
                          f"{n_samples(data)} calibration samples")
    return data, fixed


def _read_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        p = Path(labels)
        if not p.is_file():
            raise BayesQError(f"labels file not found: {p}")
        try:
            labels = np.load(p, allow_pickle=False)
        except Exception as e:
            raise BayesQError(f"cannot read labels file {p}: {first_line(e)}") from None
        if not isinstance(labels, np.ndarray):
            raise BayesQError(f"labels file {p} is not a single .npy array")
    labels = np.asarray(labels)
    if labels.ndim == 0 or len(labels) != n:
        raise BayesQError(f"labels have {labels.shape[0] if labels.ndim else 0} entries for {n} calibration samples")
    return labels


# ----------------------------------------------------------------------------- sources


def _gradient(m, data, opts: CurvatureOptions, labels, fixed, want_kfac: bool):
    torch = require("torch", "pip install torch==2.13.0", "gradient curvature")
    from .onnx_torch import OnnxTorch, plain_graph
    graph = plain_graph(m)
    interp = OnnxTorch(graph)
    out_name = opts.output or graph.outputs[0]
    produced = {o for nd in graph.nodes for o in nd.outputs} | set(graph.inputs)
    if out_name not in produced:
        raise BayesQError(f"the model has no output or tensor {out_name!r}; its outputs are "
                          f"{', '.join(graph.outputs)}")
    params = dict(interp.params)
    before = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _gradient_run(torch, graph, interp, params, data, opts, labels, fixed, out_name, want_kfac)
    finally:
        torch.set_num_threads(before)


def _gradient_run(torch, graph, interp, params, data, opts, labels, fixed, out_name, want_kfac):
    from .fisher import fisher_diagonal, fisher_plan, get_likelihood
    from .hutchinson import hutchinson_diagonal, nonnegative
    lik = get_likelihood(opts.likelihood)
    n = n_samples(data)
    unit = fixed or 1
    if not params:
        raise BayesQError("the model has no float weights to compute curvature for")

    def forward(p, batch):
        return interp.run(batch, p, outputs=[out_name])[out_name]

    with torch.no_grad():
        first = forward(params, {k: v[:unit] for k, v in data.items()})
    if not first.is_floating_point() or first.dim() < 1:
        raise BayesQError(f"output {out_name!r} is not a float tensor with a sample axis")
    if lik.name == "categorical" and first.dim() < 2:
        raise BayesQError(f"categorical likelihood needs classes on the last axis of {out_name!r}, "
                          f"which has shape {tuple(first.shape)}")
    labels = _read_labels(labels, n)
    if labels is not None:
        labels = lik.check_labels(labels, tuple(first.shape[1:]), n)
    info = {"likelihood": lik.name, "output": out_name, "labels": "given" if labels is not None else "model",
            "threads": torch.get_num_threads()}
    if opts.source == "fisher":
        plan = fisher_plan(first[0].numel(), sum(p.numel() for p in params.values()), labels, opts.probes)
        info["fisher"] = {"mode": plan.mode, "draws": plan.draws if plan.mode == "sampled" else None}
        factors = None
        if want_kfac:
            from .kfac import fisher_and_kfac, linear_sites
            sites = linear_sites(graph, params)
            if not sites:
                raise BayesQError("the model has no MatMul/Gemm weight for K-FAC factors")

            def run(p, batch, keep):
                r = interp.run(batch, p, outputs=[out_name], keep=keep)
                return r[out_name], r
            arrays, factors = fisher_and_kfac(run, params, data, lik, plan, labels, opts.seed, unit, sites)
            info["kfac_sites"] = len(sites)
        else:
            arrays = fisher_diagonal(forward, params, data, lik, labels=labels, seed=opts.seed, unit=unit,
                                     plan=plan)
        return arrays, info, factors
    res = hutchinson_diagonal(forward, params, data, lik, labels=labels, probes=opts.probes or DEFAULT_PROBES,
                              seed=opts.seed, batch_size=fixed or opts.batch_size)
    arrays = {}
    negative = 0
    for k, v in res.diagonal.items():
        arrays[k], neg = nonnegative(v)
        negative += neg
    total = sum(v.size for v in arrays.values())
    info["hutchinson"] = {"probes": res.probes, "clipped_negative": negative,
                          "clipped_share": negative / max(total, 1),
                          "rel_stderr": res.rel_stderr, "trace_rel_stderr": res.trace_rel_stderr,
                          "rel_stderr_summary": spread_summary(res.rel_stderr, res.trace_rel_stderr, arrays)}
    return arrays, info, None


def spread_summary(rse: dict[str, float], trace_rse: dict[str, float], arrays: dict[str, np.ndarray]) -> dict:
    """Median and worst per-tensor relative standard error (elementwise, over tensors of >= 2
    elements), and the median relative standard error of the tensors' totals."""
    vals = {k: v for k, v in rse.items() if not np.isnan(v) and arrays[k].size >= 2}
    totals = [v for v in trace_rse.values() if not np.isnan(v)]
    if not vals:
        return {"median": None, "max": None, "worst": None, "totals_median": None}
    worst = max(vals, key=vals.get)
    return {"median": float(np.median(list(vals.values()))), "max": vals[worst], "worst": worst,
            "totals_median": float(np.median(totals)) if totals else None}


def _activation(m, data, opts: CurvatureOptions, fixed):
    from ..calib.capture import capture_stats
    from ..config import Recipe
    from ..graph.sites import find_sites
    from ..runtime.probe import Probe
    from .activation import ActivationCurvature
    sites, _ = find_sites(m, Recipe(bits=1.0).min_elements)
    if not sites:
        raise BayesQError("no quantizable weights found for activation curvature")
    try:
        probe = Probe(m, [s.name for s in sites], [a for s in sites for a in s.activations])
        stats = capture_stats(probe, sites, data, fixed or opts.batch_size)
    except BayesQError:
        raise
    except Exception as e:
        raise BayesQError(f"onnxruntime failed on the calibration data: {first_line(e)}") from None
    curv = ActivationCurvature(stats, evidence=1.0)
    arrays = {}
    for s in sites:
        h = np.broadcast_to(curv.diagonal(s), (s.rows, s.L))
        arrays[s.name] = s.from_view(h)
    return arrays, {"sites": len(sites)}
