"""fp16 against fp32 at the same budget: MiniLM (the asset) cast to float16, compressed, and scored
against the fp32 original exactly as the fp32 model compressed at the same bits.

    python tools/bench_fp16.py [--bits 3.0] [--method bayesq] [--cache DIR] [--out DIR]

The float16 model is ``bayesq_onnx.graph.float16.to_half(model, "float16", keep_io_types=True)``:
every weight and activation float16, the int64 inputs and the float32 output as they were.  Both
models are calibrated on the asset's calibration texts; each row's cosine is the mean over the
asset's 256 evaluation texts of the embedding's cosine to the fp32 original's, with its standard
error; ``fp16 - fp32`` is the paired difference of the compressed rows, with its standard error
(the noise the comparison is judged against).  Prints a markdown table.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx import Recipe, compress  # noqa: E402
from bayesq_onnx.assets import default_cache, load_npz, prepare_minilm  # noqa: E402
from bayesq_onnx.graph.float16 import to_half  # noqa: E402
from bayesq_onnx.runtime.session import make_session  # noqa: E402


def _embed(path: Path, data: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    sess = make_session(path)
    n = len(next(iter(data.values())))
    return np.concatenate([sess.run(["embedding"], {k: v[i:i + batch] for k, v in data.items()})[0]
                           for i in range(0, n, batch)]).astype(np.float64)


def _cosines(emb: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))


def _se(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--bits", type=float, default=3.0, help="the budget, stored bits per weight (default 3.0)")
    ap.add_argument("--method", default="bayesq", help="compress --method (default bayesq)")
    ap.add_argument("--cache", type=Path, default=None, help="asset cache (default $BAYESQ_CACHE or ~/.cache/bayesq-onnx)")
    ap.add_argument("--out", type=Path, default=None, help="keep the models here (default: a temporary directory)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    a = prepare_minilm(args.cache or default_cache(), n_calib=64, n_eval=256)
    calib, data = load_npz(a.calib), load_npz(a.eval_data)
    with tempfile.TemporaryDirectory(prefix="bench-fp16-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        half = out / "minilm.fp16.onnx"
        onnx.save(to_half(onnx.load(str(a.model)), "float16", keep_io_types=True), str(half))
        ref = _embed(a.model, data)
        rows, cos = [], {}
        for name, src in (("fp32", a.model), ("fp16", half)):
            cos[name] = _cosines(_embed(src, data), ref)
            rows.append((f"{name} (uncompressed)", None, src.stat().st_size, None, cos[name]))
        for name, src in (("fp32", a.model), ("fp16", half)):
            t0 = time.perf_counter()
            dst = out / f"minilm.{name}.{args.method}.{args.bits:g}.onnx"
            rep = compress(src, Recipe(bits=args.bits, method=args.method), calib=calib, output=dst).report
            cos[f"{name} q"] = _cosines(_embed(dst, data), ref)
            rows.append((f"{name} {args.method} @ {args.bits:g}", rep["bits_per_weight"], dst.stat().st_size,
                         time.perf_counter() - t0, cos[f"{name} q"]))
    print(f"MiniLM, {len(ref)} evaluation texts; cosine of the embeddings to the fp32 original's\n")
    print("| model | bits/weight | file MB | compress s | cosine (mean +- SE) |")
    print("|---|---|---|---|---|")
    for label, bits, size, secs, c in rows:
        print(f"| {label} | {'-' if bits is None else f'{bits:.3f}'} | {size / 1e6:.2f} | "
              f"{'-' if secs is None else f'{secs:.0f}'} | {c.mean():.4f} +- {_se(c):.4f} |")
    d = cos["fp16 q"] - cos["fp32 q"]
    print(f"\nfp16 - fp32 (compressed, paired): {d.mean():+.4f} +- {_se(d):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
