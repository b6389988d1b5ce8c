"""Per-site mean Hessian trace of one global loss, for the HAWQ baseline (``--method hawq``,
docs/design.md "HAWQ baseline").  HAWQ-V2/V3 weigh a layer's squared quantization error by
``Tr(H_i) / n_i``, the average Hessian trace of the task loss over the layer's weights.

Without labels the global loss is the KL divergence from the model's own predictive at the trained
weights (``hutchinson.py``): its Hessian there is the Fisher, and the trace of a Fisher block is the
sum of its diagonal.  HAWQ estimates that trace with Hutchinson probes; here it is the sum of the
diagonal Fisher of ``fisher.py`` (exact over labels where the output is small, one sampled label per
position otherwise), the same trace without probe noise.  With ``--curvature CURV.npz`` the file's
diagonal is used instead (e.g. ``bayesq-onnx curvature --source hutchinson``: HAWQ's own estimator).

torch is imported only when the trace is computed (``compute.py``), never by the compressor itself.
"""
from __future__ import annotations

import importlib.util
import logging

import numpy as np

from ..errors import BayesQError
from .base import CurvatureSource

log = logging.getLogger(__name__)
INSTALL = "pip install torch==2.13.0"


def check_trace_source(method: str, curvature_file: str | None) -> None:
    """Fail in one line, before any work, when the trace would need torch and torch is missing."""
    if curvature_file is None and importlib.util.find_spec("torch") is None:
        raise BayesQError(f"--method {method} needs torch for the Hessian trace of the model's loss "
                          f"({INSTALL}), or a curvature file from 'bayesq-onnx curvature' (--curvature)")


def likelihood_for(output: str) -> str:
    """Categorical over the last axis for logits (the name test ``eval`` uses), else a unit-variance
    Gaussian on the raw output (embeddings, regression heads)."""
    return "categorical" if "logit" in output.lower() else "gaussian"


def file_traces(sites, curvature: CurvatureSource) -> dict[str, float]:
    """The mean of a curvature file's diagonal over each site's weights (its ``evidence`` factor is
    the same for every site, so it changes no comparison)."""
    return {s.name: float(np.mean(curvature.diagonal(s), dtype=np.float64)) for s in sites}


def fisher_traces(model, sites, data: dict[str, np.ndarray], seed: int = 0) -> dict[str, float]:
    """``Tr(F_i) / n_i`` per site from the diagonal Fisher of the model's first output on ``data``.
    One torch thread: the sums then do not depend on the machine's thread count, so neither do
    the tables and the written bytes."""
    from .compute import compute_curvature
    output = model.graph.output[0].name
    likelihood = likelihood_for(output)
    log.info("hawq: Hessian trace from the diagonal Fisher (%s likelihood on %r)", likelihood, output)
    try:
        res = compute_curvature(model, data, source="fisher", likelihood=likelihood, output=output, seed=seed,
                                threads=1)
    except BayesQError as e:   # e.g. an op the interpreter lacks: say which method needed it
        raise BayesQError(f"--method hawq (Hessian trace): {e}") from None
    missing = [s.name for s in sites if s.name not in res]
    if missing:  # every float initializer gets a gradient; a site without one is a bug of ours
        raise RuntimeError(f"internal error: no Fisher diagonal for {missing[0]!r}")
    return {s.name: float(np.mean(res[s.name], dtype=np.float64)) for s in sites}
