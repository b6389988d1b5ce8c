"""Whole-model speed: an fp32 ONNX model against its compressed version, both under onnxruntime.

    python tools/bench_model.py [FP32.onnx COMPRESSED.onnx] [--shapes 1x64,4x64,16x64] [--threads 0]
                                [--clock wall|cpu] [--reps 15]

Without paths: all-MiniLM-L6-v2 as ``bayesq-onnx demo`` leaves it in the cache (``$BAYESQ_CACHE``,
else ~/.cache/bayesq-onnx): ``minilm-*/model.onnx`` against ``demo/minilm.bayesq.3.onnx``; run
``bayesq-onnx demo`` once to write both.  Inputs are ``batch x seq`` (integer inputs: token ids below
1000, ones for a mask, zeros otherwise; float inputs: normal noise), or ``batch`` alone for inputs
whose other dimensions are fixed (images); a shape the graph's fixed dimensions refuse is skipped.  Both models are timed in alternation as in bench_kernels.py (batches
of ~20 ms, rotating order, median); the table gives ms per run and compressed / fp32 (< 1: faster).
``--threads 1 --clock cpu`` measures the work on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
from bench_kernels import options, time_alternating  # noqa: E402

from bayesq_onnx.assets import default_cache  # noqa: E402
from bayesq_onnx.runtime import custom_ops  # noqa: E402
from bayesq_onnx.runtime.session import make_session  # noqa: E402

ONNX_INT = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


def default_models() -> tuple[Path, Path]:
    """The demo's compressed MiniLM and the fp32 model its report names (else the newest cached one)."""
    cache = default_cache()
    compressed = cache / "demo" / "minilm.bayesq.3.onnx"
    report = compressed.with_suffix(".json")
    fp32 = [Path(json.loads(report.read_text()).get("input", ""))] if report.is_file() else []
    fp32 = [p for p in fp32 if p.is_file()] or sorted(cache.glob("minilm-*/model.onnx"),
                                                       key=lambda p: p.stat().st_mtime)
    if not fp32 or not compressed.is_file():
        sys.exit(f"no MiniLM models in {cache}: run `bayesq-onnx demo` (it writes both), or pass two paths")
    return fp32[-1], compressed


def feeds(model: onnx.ModelProto, batch: int, seq: int | None, rng) -> dict[str, np.ndarray] | None:
    """Inputs with ``batch`` first and ``seq`` in every other free dimension (fixed ones as the graph
    says), or None when the graph refuses it (a fixed batch, or a free dimension and no ``seq``)."""
    out = {}
    for vi in model.graph.input:
        t = vi.type.tensor_type
        dims = [d.dim_value or None for d in t.shape.dim]
        shape = [batch] + [d or seq for d in dims[1:]]
        if (dims and dims[0] not in (None, batch)) or None in shape:
            return None
        if t.elem_type in ONNX_INT:
            dtype = ONNX_INT[t.elem_type]
            if "mask" in vi.name:
                out[vi.name] = np.ones(shape, dtype)
            elif "ids" in vi.name and "type" not in vi.name:
                out[vi.name] = rng.integers(0, 1000, shape).astype(dtype)
            else:
                out[vi.name] = np.zeros(shape, dtype)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="FP32.onnx COMPRESSED.onnx (default: the demo's MiniLM)")
    ap.add_argument("--shapes", default="1x64,4x64,16x64",
                    help="BATCHxSEQ (SEQ fills the free dimensions after the batch) or BATCH (fixed-size "
                    "inputs, e.g. images), comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (with --threads 1, the work on a busy machine)")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    if len(args.models) not in (0, 2):
        ap.error("give both models or neither")
    paths = [Path(p) for p in args.models] if args.models else list(default_models())
    protos = [onnx.load(str(p), load_external_data=False) for p in paths]
    ops = collections.Counter(n.op_type for n in protos[1].graph.node if n.domain == custom_ops.DOMAIN)
    sessions = [make_session(p, sess_options=options(args.threads)) for p in paths]

    isa = custom_ops.kernel_isa() if custom_ops.available() else "library not built"
    print(f"fp32:       {paths[0]}\ncompressed: {paths[1]}")
    print(f"bayesq ops: {', '.join(f'{k} {v}' for k, v in sorted(ops.items())) or 'none'} (kernels: {isa})")
    print(f"threads {args.threads or 'default'}, median of {args.reps} alternating batches, {args.clock} ms per run")
    print(f"{'shape':>8} {'fp32':>9} {'compressed':>11} {'ratio':>6}")
    rng = np.random.default_rng(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x")) if "x" in shape else (int(shape), None)
        f = feeds(protos[0], batch, seq, rng)
        if f is None or feeds(protos[1], batch, seq, rng) is None:
            print(f"{shape:>8}  skipped: the graph's fixed input dimensions refuse it")
            continue
        runs = {name: (lambda s=s: s.run(None, f)) for name, s in zip(("fp32", "compressed"), sessions)}
        t = time_alternating(runs, args.reps, clock, statistics.median)
        print(f"{shape:>8} {t['fp32']:9.2f} {t['compressed']:11.2f} {t['compressed'] / t['fp32']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
