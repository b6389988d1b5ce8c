"""``bayesq-onnx crosscheck``: one model run by several runtimes on the same inputs, through
polygraphy's Comparator, every runtime's outputs compared with the first one's.

Runtimes are onnxruntime sessions (``runtime.session.make_session``, so the bayesq ops are
registered) with different providers or kernel paths:

    cpu-packed     CPU, the bayesq MatMuls' packed kernels (unpack="never")
    cpu-unpacked   CPU, every bayesq MatMul as an fp32 MatMul on its weight decoded at load
    cuda           onnxruntime's CUDA execution provider (onnxruntime-gpu and the bayesq CUDA kernels)
    tensorrt       onnxruntime's TensorRT execution provider

The default is every one this onnxruntime offers.  Tolerances follow polygraphy's simple comparison:
an element passes when its absolute difference is within ``atol`` or its relative one within ``rtol``.
The defaults (1e-3 both) allow a GPU's fp16 tensor-core GEMMs (A and the weights rounded to fp16,
2^-11 relative each) against the CPU's fp32 kernels; two CPU paths differ by summation order only
(about K * 6e-8 relative), so a mismatch there past 1e-5 would be a bug.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BayesQError, require

log = logging.getLogger(__name__)

RUNTIMES: dict[str, tuple[tuple[str, ...], str]] = {
    "cpu-packed": (("CPUExecutionProvider",), "never"),
    "cpu-unpacked": (("CPUExecutionProvider",), "always"),
    "cuda": (("CUDAExecutionProvider", "CPUExecutionProvider"), "never"),
    "tensorrt": (("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), "never"),
}


def available_runtimes() -> list[str]:
    """The runtimes whose first provider this onnxruntime build has, in RUNTIMES order."""
    import onnxruntime as ort
    have = set(ort.get_available_providers())
    return [name for name, (providers, _) in RUNTIMES.items() if providers[0] in have]


def _runtimes(names: list[str] | None) -> list[str]:
    have = available_runtimes()
    if names is None:
        names = have
    if len(names) < 2:
        raise BayesQError(f"a cross-check needs at least two runtimes, got {', '.join(names) or 'none'} "
                          f"(this onnxruntime offers {', '.join(have)})")
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise BayesQError(f"unknown runtime(s) {', '.join(unknown)}: choose from {', '.join(RUNTIMES)}")
    missing = [n for n in names if n not in have]
    if missing:
        raise BayesQError(f"runtime(s) {', '.join(missing)} not available in this onnxruntime "
                          f"(available: {', '.join(have)})")
    return names


def crosscheck(model_path: str | Path, data: dict[str, np.ndarray], runtimes: list[str] | None = None,
               rtol: float = 1e-3, atol: float = 1e-3, batch_size: int = 16) -> dict[str, Any]:
    """Run ``model_path`` on ``data`` (input name -> samples on axis 0) with each runtime and compare
    each with the first.  Returns ``runtimes``, ``passed`` and per compared pair its outputs' largest
    absolute and relative differences and whether each passed."""
    require("polygraphy", "pip install 'bayesq-onnx[check]'", "cross-runtime check")
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from ..runtime.session import make_session

    names = _runtimes(runtimes)
    if batch_size < 1:
        raise BayesQError(f"batch_size must be >= 1 (got {batch_size})")
    n = {v.shape[0] for v in data.values()}
    if len(n) != 1 or 0 in n:
        raise BayesQError(f"the inputs need the same number of samples, at least one: {sorted(n)}")
    n = n.pop()
    feeds = [{k: v[a:a + batch_size] for k, v in data.items()} for a in range(0, n, batch_size)]

    def session(name):
        providers, unpack = RUNTIMES[name]
        return lambda: make_session(str(model_path), providers=list(providers), unpack=unpack)

    runners = [OnnxrtRunner(session(name), name=name) for name in names]
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR      # polygraphy's per-run logs; our own progress says enough
    try:
        log.info("crosscheck: %d batch(es) on %s", len(feeds), ", ".join(names))
        results = Comparator.run(runners, data_loader=feeds)
        compared = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=rtol, atol=atol),
                                               comparisons=[(0, i) for i in range(1, len(names))])
    finally:
        G_LOGGER.module_severity = severity
    pairs = []
    for (a, b), iterations in compared[0].items():     # one compare function: its result per pair
        outputs: dict[str, dict[str, Any]] = {}
        for it in iterations:
            for out, r in it.items():
                o = outputs.setdefault(out, {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "passed": True})
                o["max_abs_diff"] = max(o["max_abs_diff"], float(r.max_absdiff))
                o["max_rel_diff"] = max(o["max_rel_diff"], float(r.max_reldiff))
                o["passed"] = o["passed"] and bool(r)
        pairs.append({"runtimes": [a, b], "passed": all(o["passed"] for o in outputs.values()), "outputs": outputs})
    return {"model": str(model_path), "runtimes": names, "reference": names[0], "rtol": rtol, "atol": atol,
            "n_samples": int(n), "pairs": pairs, "passed": all(p["passed"] for p in pairs)}


def crosscheck_files(model_path: str | Path, data_path: str | Path, runtimes: list[str] | None = None,
                     rtol: float = 1e-3, atol: float = 1e-3) -> dict[str, Any]:
    """``bayesq-onnx crosscheck``: files in, comparison out; every bad input is a BayesQError."""
    from ..calib.readers import input_specs, load_calibration
    from ..graph.model_io import load_model

    data = load_calibration(data_path, input_specs(load_model(model_path)))
    return crosscheck(model_path, data, runtimes, rtol, atol)
