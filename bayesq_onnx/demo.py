"""The main job on a real model, with nothing to find by hand: all-MiniLM-L6-v2 (from its PyPI
wheel) calibrated and evaluated on disjoint Debian ``fortunes`` text.  A baseline (GPTQ by
default) takes the uniform format with the most stored bits within the budget; BayesQ is then
run at exactly the bits the baseline achieved (the matched comparison) and at the full budget,
from one analysis; every model is scored with onnxruntime on the held-out text."""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from .api import Analysis, compress
from .config import Recipe
from .validate.compare import compare_models

log = logging.getLogger(__name__)


def run_demo(bits: float = 3.0, baseline: str = "gptq", cache: str | os.PathLike | None = None) -> list[dict]:
    # the benchmark assets (and through them torch and transformers) stay out of the compressor's
    # import path: only the demo, an entry point beside the CLI, reaches for them
    from .assets import default_cache, load_npz, prepare_minilm

    cache = Path(cache) if cache else default_cache()
    asset = prepare_minilm(cache, progress=log.info)
    out_dir = cache / "demo"
    calib, eval_data = load_npz(asset.calib), load_npz(asset.eval_data)
    rows = []

    def row(label: str, rep: dict, out: Path, seconds: float) -> None:
        cmp = compare_models(asset.model, out, eval_data)["outputs"]["embedding"]
        rows.append({"method": label, "bits_per_weight": rep["bits_per_weight"], "plan": rep["plan"],
                     "mb": rep["output_bytes"] / 1e6, "cosine": cmp["cosine"], "cosine_min": cmp["cosine_min"],
                     "seconds": seconds, "output": str(out)})

    log.info("compressing %s with %s at %g bits/weight", asset.model.name, baseline, bits)
    out = out_dir / f"minilm.{baseline}.{bits:g}.onnx"
    rep = compress(asset.model, Recipe(bits=bits, method=baseline), calib=calib, output=out,
                   report=out.with_suffix(".json")).report
    row(baseline, rep, out, rep["seconds"])
    matched = math.floor(rep["bits_per_weight"] * 1e4) / 1e4      # never above the baseline's bits

    log.info("compressing %s with bayesq at %g and %g bits/weight", asset.model.name, matched, bits)
    t0 = time.perf_counter()
    analysis = Analysis(asset.model, Recipe(bits=bits), calib=calib)
    for b in dict.fromkeys([matched, bits]):
        out = out_dir / f"minilm.bayesq.{b:g}.onnx"
        rep = analysis.compress(b, output=out, report=out.with_suffix(".json")).report
        row("bayesq", rep, out, time.perf_counter() - t0)   # the analysis is counted with the first model

    fp32_mb = asset.model.stat().st_size / 1e6
    print(f"all-MiniLM-L6-v2 ({fp32_mb:.1f} MB fp32), {len(next(iter(eval_data.values())))} held-out fortunes, "
          f"budget {bits:g} bits/weight; cosine of sentence embeddings to fp32:")
    print(f"{'method':<8} {'bits/weight':>11} {'MB':>7} {'cosine':>8} {'worst':>8} {'seconds':>8}  plan")
    for r in rows:
        print(f"{r['method']:<8} {r['bits_per_weight']:>11.3f} {r['mb']:>7.2f} {r['cosine']:>8.4f} "
              f"{r['cosine_min']:>8.4f} {r['seconds']:>8.1f}  {r['plan']}")
    print(f"(worst: the lowest cosine over the texts; seconds: compression wall time, bayesq's analysis "
          f"counted once)\nmodels and reports in {out_dir}")
    return rows
