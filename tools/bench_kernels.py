"""Kernel timings: fp32 MatMul, MatMulNBits 4-bit (accuracy level 0 and 4) and the bayesq ops, one
single-node model each, ``Y = A (M, K) @ W (K, N)``; with ``--gather VxD``, embedding lookups
instead: fp32 Gather, GatherBlockQuantized 4-bit and the bayesq Gather ops on a ``(V, D)`` table,
``M`` random indices per run.

    python tools/bench_kernels.py [--quick] [--shapes 4096x4096,576x1536] [--ms 1,8,64] [--threads 0]
                                  [--reps 15] [--block 32] [--clock wall|cpu] [--only bq-lut3,...]
                                  [--base-lib OLD/libbayesq_ops.so] [--gather 30522x384] [--cold] [--auto]

For each shape and M all candidates are timed in alternation (one batch of runs of each, in a
rotating order, repeated ``--reps`` times) and the table gives the median time per run in ms and
the ratio to fp32 (< 1: faster).  Random weights and activations; codes are uniform random, so
the numbers say nothing about accuracy.  ``--threads 0`` lets onnxruntime choose (all cores).

``--cold``: each model holds enough copies of the product (distinct weights, the same ``A``) that its
fp32 weights pass ``COLD_BYTES``, and times are per product: the weights come from memory, as in a
whole model, instead of a cache that holds one small weight between runs (a 384 x 1536 fp32 weight is
2.4 MB).  The unpack rule (``runtime/session.py``) is measured this way.  ``--auto``: each bayesq MatMul
is timed also as ``make_session(unpack="auto")`` runs it (``NAME@auto``: the packed op or the fp32
MatMul, whichever the rule picks for that many rows); with ``--cold`` the copies read one input at
one switch, so they share one ``If`` and its few microseconds are spread over them (whole models show
that cost: tools/bench_model.py).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import onnx.compose  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bayesq_onnx.formats import (BayesqLut, BayesqSparse, BayesqUniform, GatherBlockQuantized, LutCodes,  # noqa: E402
                                 MatMulNBits, SparseCodes, UniformCodes)
from bayesq_onnx.formats.bayesq_sparse import top_mask  # noqa: E402
from bayesq_onnx.formats.bayesq_uniform import groups  # noqa: E402
from bayesq_onnx.lower.bayesq_nodes import BAYESQ_OPSET, bayesq_gather_node, bayesq_matmul_node  # noqa: E402
from bayesq_onnx.lower.nodes import gather_block_quantized_node, matmulnbits_node  # noqa: E402
from bayesq_onnx.runtime import custom_ops  # noqa: E402
from bayesq_onnx.runtime.session import SwitchingSession, make_session, session_options  # noqa: E402
from bayesq_onnx.runtime.tune import time_alternating  # noqa: E402

SHAPES = [(4096, 4096), (576, 1536), (1536, 576), (384, 1536)]
COLD_BYTES = 256 << 20   # --cold: fp32 weights per model, past the EPYC's L3 the table was measured on (not a 300 MB one)


def stacked(copies: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One model computing every copy's ``Y`` (as ``c{i}_Y``) from the shared input ``A``."""
    out = onnx.ModelProto()
    out.CopyFrom(copies[0])
    g = out.graph
    del g.node[:], g.initializer[:], g.output[:]
    for i, m in enumerate(copies):
        m = onnx.compose.add_prefix(m, f"c{i}_", rename_inputs=False)
        g.node.extend(m.graph.node)
        g.initializer.extend(m.graph.initializer)
        g.output.extend(m.graph.output)
    return out


def _model(nodes, inits, K, N, extra_opsets=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                               *extra_opsets])


def _uniform(rng, N, K, bits, block) -> UniformCodes:
    g = groups(K, block)
    return UniformCodes(codes=rng.integers(0, 1 << bits, (N, K)).astype(np.uint8),
                        scale=(rng.random((N, g)) * 0.01 + 0.001).astype(np.float32),
                        zero_point=rng.integers(0, 1 << bits, (N, g)).astype(np.uint8), bits=bits, block=block)


def candidates(K: int, N: int, block: int, rng) -> dict[str, onnx.ModelProto]:
    out = {}
    W = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    out["fp32"] = _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(W, "W")], K, N)
    nb = MatMulNBits(4, block)
    packed = nb.pack(_uniform(rng, N, K, 4, block))
    for level in (0, 4):
        node, inits = matmulnbits_node("A", "Y", "w", nb, packed, K=K, N=N, accuracy_level=level)
        out[f"nbits4-acc{level}"] = _model([node], inits, K, N)
    if custom_ops.available():
        for bits in (2, 3, 4):
            fmt = BayesqUniform(bits, block)
            node, inits = bayesq_matmul_node("A", "Y", "w", fmt, fmt.pack(_uniform(rng, N, K, bits, block)), K, N)
            out[f"bq-u{bits}-g{block}"] = _model([node], inits, K, N, [BAYESQ_OPSET])
        for bits in (2, 3, 4):
            fmt = BayesqLut(bits, 0)
            q = LutCodes(codes=rng.integers(0, 1 << bits, (N, K)).astype(np.uint8),
                         lut=(rng.standard_normal((N, 1, 1 << bits)) * 0.02).astype(np.float32), bits=bits, block=0)
            node, inits = bayesq_matmul_node("A", "Y", "w", fmt, fmt.pack(q), K, N)
            out[f"bq-lut{bits}"] = _model([node], inits, K, N, [BAYESQ_OPSET])
        # N:M sparse: 2:4 with 3- and 4-bit survivors (2.25 / 2.75 bits of codes and pattern per weight
        # against bq-u2 / bq-u3's 2 and 3), 4:8 with 3 bits; groups of `block` original weights
        for keep, of, bits in ((2, 4, 3), (2, 4, 4), (4, 8, 3)):
            if K % of or (block * keep // of) % 16:
                continue
            fmt = BayesqSparse(keep, of, bits, block)
            inner = _uniform(rng, N, K * keep // of, bits, fmt.inner_block)
            mask = top_mask(rng.random((N, K)), keep, of)
            node, inits = bayesq_matmul_node("A", "Y", "w", fmt, fmt.pack(SparseCodes(mask, inner, keep, of)), K, N)
            out[fmt.name] = _model([node], inits, K, N, [BAYESQ_OPSET])
    return out


def _gather_model(nodes, inits, D, extra_opsets=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", TensorProto.INT64, ["M"])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                               *extra_opsets])


def gather_candidates(V: int, D: int, block: int, rng) -> dict[str, onnx.ModelProto]:
    """Lookups ``Y = table[A]`` of a ``(V, D)`` table: fp32 Gather, GatherBlockQuantized 4-bit (fp32
    scales, as in a float32 model), bayesq affine 3/4-bit and a 3-bit codebook per row (fp16 scales
    and levels, as the planner offers them)."""
    out = {"fp32": _gather_model([helper.make_node("Gather", ["T", "A"], ["Y"], axis=0)],
                                 [numpy_helper.from_array((rng.standard_normal((V, D)) * 0.02).astype(np.float32), "T")], D)}
    gbq = GatherBlockQuantized(4, block)
    node, inits = gather_block_quantized_node("A", "Y", "t", gbq, gbq.pack(_uniform(rng, V, D, 4, block)))
    out[f"gbq4-g{block}"] = _gather_model([node], inits, D)
    if custom_ops.available():
        for bits in (3, 4):
            fmt = BayesqUniform(bits, block, "float16")
            node, inits = bayesq_gather_node("A", "Y", "t", fmt, fmt.pack(_uniform(rng, V, D, bits, block)), V, D)
            out[f"bq-u{bits}-g{block}"] = _gather_model([node], inits, D, [BAYESQ_OPSET])
        fmt = BayesqLut(3, 0, "float16")
        q = LutCodes(codes=rng.integers(0, 8, (V, D)).astype(np.uint8),
                     lut=(rng.standard_normal((V, 1, 8)) * 0.02).astype(np.float32), bits=3, block=0)
        node, inits = bayesq_gather_node("A", "Y", "t", fmt, fmt.pack(q), V, D)
        out["bq-lut3"] = _gather_model([node], inits, D, [BAYESQ_OPSET])
    return out


def options(threads: int, library: str | None = None) -> ort.SessionOptions:
    """Session options with ``threads`` intra-op threads and the bayesq library (``library``: another
    build of it, e.g. a baseline to compare with in the same run)."""
    if library is None:
        so = session_options()
    else:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.register_custom_ops_library(library)
    so.intra_op_num_threads = threads
    return so


def bench(models: dict[str, onnx.ModelProto], M: int, K: int, threads: int, reps: int, rng,
          clock=time.perf_counter, stat=statistics.median, libs: dict[str, str] | None = None,
          rows: int = 0, auto: frozenset[str] = frozenset()) -> dict[str, float]:
    """ms per run of each model on ``A``: M x K activations, or (``rows``: a table's row count) M
    random indices into it.  Models named in ``auto`` run as ``make_session(unpack="auto")`` makes them."""
    A = rng.integers(0, rows, M) if rows else rng.standard_normal((M, K)).astype(np.float32)
    runs = {}
    for name, m in models.items():
        so = options(threads, (libs or {}).get(name))
        sess = (make_session(m, sess_options=so, unpack="auto") if name in auto else
                ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]))
        if isinstance(sess, SwitchingSession):   # I/O binding runs one session: the one run() would choose
            sess = sess.session_for({"A": A})
        io = sess.io_binding()
        io.bind_cpu_input("A", A)
        for o in sess.get_outputs():
            io.bind_output(o.name)
        runs[name] = functools.partial(sess.run_with_iobinding, io)
    return time_alternating(runs, reps, clock, stat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,... (W is K x N)")
    ap.add_argument("--ms", default="1,8,64")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--block", type=int, default=32, help="group size of the affine formats")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, M=1 and 64, 7 reps")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="min: the least disturbed batch (on a machine shared with other jobs)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (with --threads 1, a kernel's cost on a busy machine)")
    ap.add_argument("--only", default="", help="candidates to time, comma-separated (fp32 always): e.g. bq-lut3")
    ap.add_argument("--base-lib", default="", help="another build of libbayesq_ops.so: its bq candidates "
                    "are timed too (as NAME@base), in the same alternation")
    ap.add_argument("--gather", default="", help="VxD: time embedding lookups of a V x D table instead "
                    "(M: indices per run)")
    ap.add_argument("--cold", action="store_true", help="weights from memory, not cache: copies of each "
                    "product in one model, times per product (see above)")
    ap.add_argument("--auto", action="store_true", help="time each bayesq MatMul also as unpack=\"auto\" runs it")
    args = ap.parse_args(argv)
    if args.gather and (args.auto or args.cold):
        ap.error("--cold and --auto time MatMuls; --gather lookups")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(x) for x in args.ms.split(",")]
    if args.quick:
        shapes, ms, args.reps = [(4096, 4096)], [1, 64], 7
    gather = tuple(int(x) for x in args.gather.split("x")) if args.gather else None
    if gather:
        shapes = [gather[::-1]]   # K = D (row length), N = V (rows), as the ops' attributes say
    if custom_ops.available():
        print(f"bayesq library: {custom_ops.library_path()} (kernels: {custom_ops.kernel_isa()})")
    else:
        print(f"bayesq library unavailable ({custom_ops.unavailable_reason()}): native ops only")
    print(f"onnxruntime {ort.__version__}, threads {args.threads or 'default'}, {args.stat} of {args.reps} "
          f"alternating batches, {args.clock} ms per run (ratio to fp32)")
    rng = np.random.default_rng(0)
    for K, N in shapes:
        keep = {"fp32", *args.only.split(",")} if args.only else None
        copies = -(-COLD_BYTES // (4 * K * N)) if args.cold else 1
        sets = [gather_candidates(N, K, args.block, rng) if gather else candidates(K, N, args.block, rng)
                for _ in range(copies)]
        models = {k: stacked([s[k] for s in sets]) if copies > 1 else v for k, v in sets[0].items()
                  if keep is None or k in keep}
        libs = {}
        if args.base_lib:
            for name in [k for k in models if k.startswith("bq-")]:
                models[f"{name}@base"] = models[name]
                libs[f"{name}@base"] = args.base_lib
        auto = frozenset()
        if args.auto:
            auto = frozenset(f"{k}@auto" for k in models if k.startswith(("bq-u", "bq-lut")))
            models.update({k: models[k.removesuffix("@auto")] for k in sorted(auto)})
        names = list(models)
        print(f"\nlookups in a {N} x {K} table" if gather else f"\nK={K} N={N}"
              + (f" ({copies} copies, ms per product)" if copies > 1 else ""))
        print(f"{'M':>4} " + " ".join(f"{n:>17}" for n in names))
        for M in ms:
            t = bench(models, M, K, args.threads, args.reps, rng,
                      time.perf_counter if args.clock == "wall" else time.process_time,
                      statistics.median if args.stat == "median" else min, libs, rows=N if gather else 0, auto=auto)
            t = {n: v / copies for n, v in t.items()}
            cells = [f"{t[n]:8.3f} ({t[n] / t['fp32']:5.2f})" for n in names]
            print(f"{M:>4} " + " ".join(f"{c:>17}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
