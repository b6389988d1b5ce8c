"""The main job on a real model, with nothing to find by hand: all-MiniLM-L6-v2 (from its PyPI
wheel) calibrated and evaluated on disjoint Debian ``fortunes`` text; BayesQ against RTN at the
same budget, both measured with onnxruntime on the held-out text."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .api import compress
from .assets import default_cache, load_npz, prepare_minilm
from .config import Recipe
from .validate.compare import compare_models

log = logging.getLogger(__name__)


def run_demo(bits: float = 3.0, method: str = "bayesq", cache: str | os.PathLike | None = None) -> list[dict]:
    cache = Path(cache) if cache else default_cache()
    asset = prepare_minilm(cache, progress=log.info)
    out_dir = cache / "demo"
    eval_data = load_npz(asset.eval_data)
    rows = []
    for m in dict.fromkeys([method, "rtn"]):
        out = out_dir / f"minilm.{m}.{bits:g}.onnx"
        log.info("compressing %s with %s at %g bits/weight", asset.model.name, m, bits)
        rep = compress(asset.model, Recipe(bits=bits, method=m), calib=load_npz(asset.calib), output=out,
                       report=out.with_suffix(".json")).report
        cmp = compare_models(asset.model, out, eval_data)["outputs"]["embedding"]
        rows.append({"method": m, "bits_per_weight": rep["bits_per_weight"], "plan": rep["plan"],
                     "mb": rep["output_bytes"] / 1e6, "cosine": cmp["cosine"], "cosine_min": cmp["cosine_min"],
                     "seconds": rep["seconds"], "output": str(out)})
    fp32_mb = asset.model.stat().st_size / 1e6
    print(f"all-MiniLM-L6-v2 ({fp32_mb:.1f} MB fp32), {len(next(iter(eval_data.values())))} held-out fortunes, "
          f"budget {bits:g} bits/weight; cosine of sentence embeddings to fp32:")
    print(f"{'method':<8} {'bits/weight':>11} {'MB':>7} {'cosine':>8} {'min':>8} {'seconds':>8}  plan")
    for r in rows:
        print(f"{r['method']:<8} {r['bits_per_weight']:>11.3f} {r['mb']:>7.2f} {r['cosine']:>8.4f} "
              f"{r['cosine_min']:>8.4f} {r['seconds']:>8.1f}  {r['plan']}")
    print(f"models and reports in {out_dir}")
    return rows
