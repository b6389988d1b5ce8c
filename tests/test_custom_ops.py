"""The bayesq custom-op library (custom_ops/) in onnxruntime against the numpy reference ops, on every
kernel set this CPU runs (BAYESQ_ISA=scalar|avx2|avx512|neon): dequantization bit for bit, matmul within
a stated fp32 summation bound, fp16 activations, float16 scales / LUT levels (identical to the same
values in float32), bias, threads, errors, embedding lookups (GatherAffine / GatherLut, bit for bit,
a table shared with a tied head), and a whole small graph through make_session.  Skipped, with the reason, only when the library was not built."""
from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bayesq_onnx.formats import BayesqLut
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.lower.bayesq_nodes import BAYESQ_OPSET, bayesq_dequantize_node, bayesq_gather_node, bayesq_matmul_node
from bayesq_onnx.runtime import custom_ops
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS
from bayesq_onnx.runtime.session import make_session as _make_session, session_options
from packed_weights import weight

pytestmark = pytest.mark.skipif(not custom_ops.available(), reason=str(custom_ops.unavailable_reason()))

EPS32 = float(np.finfo(np.float32).eps)


def make_session(model, **kw):
    """Sessions that run the bayesq kernels under test: never unpacked to fp32 MatMuls at load."""
    return _make_session(model, unpack="never", **kw)


def _isas() -> list[str]:
    if not custom_ops.available():
        return ["scalar"]
    out = []
    old = os.environ.get("BAYESQ_ISA")
    for isa in ("scalar", "avx2", "avx512", "neon"):
        os.environ["BAYESQ_ISA"] = isa
        try:
            if custom_ops.kernel_isa() == isa:   # an ISA this CPU lacks reports "invalid BAYESQ_ISA"
                out.append(isa)
        finally:
            if old is None:
                del os.environ["BAYESQ_ISA"]
            else:
                os.environ["BAYESQ_ISA"] = old
    return out


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("BAYESQ_ISA", request.param)   # read when a session creates its kernels
    return request.param


def as_float32(fmt, packed):
    """The same weight with its float16 scales / LUT widened to float32: what the ops must equal."""
    role = "lut" if isinstance(fmt, BayesqLut) else "scales"
    f32 = type(fmt)(fmt.bits, fmt.block)
    return f32, {**packed, role: packed[role].astype(np.float32)}


def matmul_model(fmt, packed, K, N, M=None, bias=None, fp16=False):
    T = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    node, inits = bayesq_matmul_node("A", "Y", "w", fmt, packed, K, N, bias="bias" if bias is not None else None)
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", T, [M, K])],
                          [helper.make_tensor_value_info("Y", T, [M, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])


def reference(m, feeds):
    return ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, feeds)[0]


def sum_bound(A, V, zs):
    """Rounding bound for any summation order of y = sum_k a_k w_k in fp32 (Higham's gamma_K, for the
    kernel and for numpy's BLAS each): K * eps * sum_k |a_k| (|w_k| + |zp_k * s_k|).  The affine GEMV
    sums a*q per group and subtracts zp * s * sum(a) apart, hence the |zp * s| term."""
    K = A.shape[-1]
    return 2 * K * EPS32 * (np.abs(A) @ (np.abs(V) + zs).T) + 1e-30


# shapes: (K, N, block) with full chunks, partial-lane chunks of 8 / 9 / 15 lanes (the latter two
# straddle groups of 16), a K % 8 tail, K < 8, odd N, and one codebook per row (block 0)
CASES = [(203, 13, 16), (576, 9, 32), (255, 5, 64), (136, 4, 0), (5, 3, 16), (1000, 7, 128)]


@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_dequantize_bit_exact(isa, kind, bits):
    for K, N, block in CASES:
        if kind == "affine" and block == 0:
            block = 16
        fmt, p, V, _ = weight(kind, bits, K, N, block, seed=K * bits)
        for shape, axis in (((K, N), 0), ((N, K, 1, 1), 1)):
            node, inits = bayesq_dequantize_node("W", "w", fmt, p, shape, axis)
            g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, list(shape))],
                                  inits)
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])
            W = make_session(m).run(None, {})[0]
            assert W.tobytes() == reference(m, {}).tobytes(), (K, N, block, shape)


@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_matmul_within_summation_bound(isa, kind, bits):
    rng = np.random.default_rng(bits)
    for K, N, block in CASES:
        if kind == "affine" and block == 0:
            block = 16
        fmt, p, V, zs = weight(kind, bits, K, N, block, seed=K + bits)
        m = matmul_model(fmt, p, K, N)
        sess = make_session(m)
        for M in (1, 3, 64):      # fused GEMV (row pairs + a single row) and the GEMM path
            A = rng.standard_normal((M, K)).astype(np.float32)
            y, ref = sess.run(None, {"A": A})[0], reference(m, {"A": A})
            assert np.all(np.abs(y - ref) <= sum_bound(A, V, zs)), (K, N, block, M, np.abs(y - ref).max())


@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_float16_scales_equal_float32_scales(isa, kind, bits):
    """float16 scales / LUT levels are widened once, then the fp32 kernels run: dequantization is bit
    for bit that of the float32 cast (and the reference's), matmuls give identical bytes, for fp32 and
    fp16 activations, on the GEMV and GEMM paths."""
    rng = np.random.default_rng(100 + bits)
    for K, N, block in CASES[:4]:
        if kind == "affine" and block == 0:
            block = 16
        f16, p16, V, _ = weight(kind, bits, K, N, block, seed=K * bits, scale_dtype="float16")
        assert p16["lut" if kind == "lut" else "scales"].dtype == np.float16
        f32, p32 = as_float32(f16, p16)
        models = []
        for fmt, p in ((f16, p16), (f32, p32)):
            node, inits = bayesq_dequantize_node("W", "w", fmt, p, (K, N), axis=0)
            g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, [K, N])],
                                  inits)
            models.append(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET]))
        W16, W32 = (make_session(m).run(None, {})[0] for m in models)
        assert W16.tobytes() == W32.tobytes() == reference(models[0], {}).tobytes() == V.T.tobytes(), (K, N, block)
        for fp16 in (False, True):
            s16 = make_session(matmul_model(f16, p16, K, N, fp16=fp16))
            s32 = make_session(matmul_model(f32, p32, K, N, fp16=fp16))
            for M in (1, 3, 64):  # fused GEMV (row pairs + a single row) and the GEMM path
                A = rng.standard_normal((M, K)).astype(np.float16 if fp16 else np.float32)
                y16, y32 = s16.run(None, {"A": A})[0], s32.run(None, {"A": A})[0]
                assert y16.dtype == A.dtype and y16.tobytes() == y32.tobytes(), (K, N, block, M, fp16)


def test_float16_scales_checked():
    fmt, p, _, _ = weight("affine", 3, 64, 4, 16, seed=0, scale_dtype="float16")
    with pytest.raises(BayesQError, match="needs float16 scales, got float32"):
        bayesq_matmul_node("A", "Y", "w", fmt, {**p, "scales": p["scales"].astype(np.float32)}, 64, 4)
    m = matmul_model(fmt, p, 64, 4)
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(p["scales"].astype(np.float64), "w_scales"))
    with pytest.raises(Exception, match="w_scales|tensor\\(double\\)"):  # no kernel takes double scales
        make_session(m)


def test_bias_fp16_and_batched_input(isa):
    K, N = 576, 9
    rng = np.random.default_rng(0)
    for kind in ("lut", "affine"):
        fmt, p, V, zs = weight(kind, 3, K, N, 32, seed=1)
        bias = rng.standard_normal(N).astype(np.float32)
        A = rng.standard_normal((2, 3, K)).astype(np.float32)          # (..., K): leading axes kept
        m = matmul_model(fmt, p, K, N, bias=bias)
        g = m.graph
        g.input[0].CopyFrom(helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3, K]))
        g.output[0].CopyFrom(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, N]))
        y = make_session(m).run(None, {"A": A})[0]
        assert y.shape == (2, 3, N)
        # the bias adds one rounding on top of the summation bound
        tol = sum_bound(A, V, zs) + EPS32 * np.abs(A @ V.T + bias)
        assert np.all(np.abs(y - (A @ V.T + bias)) <= tol)
        # fp16 activations, bias and output: computed in fp32 from the fp16 inputs, rounded once
        m16 = matmul_model(fmt, p, K, N, M=4, bias=bias.astype(np.float16), fp16=True)
        A16 = rng.standard_normal((4, K)).astype(np.float16)
        y16 = make_session(m16).run(None, {"A": A16})[0]
        exact = A16.astype(np.float32) @ V.T + bias.astype(np.float16).astype(np.float32)
        assert y16.dtype == np.float16
        # one fp16 rounding (half an ulp: 2^-11 relative) plus the fp32 summation bound
        assert np.all(np.abs(y16.astype(np.float32) - exact) <= 2.0 ** -11 * np.abs(exact)
                      + sum_bound(A16.astype(np.float32), V, zs) + 6e-8)


def test_threads_and_runs_give_identical_bytes(isa):
    # columns are split across threads, never the sum over K: every thread count gives the same bytes
    K, N = 1000, 70
    fmt, p, _, _ = weight("affine", 3, K, N, 32, seed=3)
    m = matmul_model(fmt, p, K, N)
    for M in (2, 40):                            # fused GEMV and the GEMM path (every ISA)
        A = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
        outs = []
        for threads in (1, 2, 3):
            so = session_options()
            so.intra_op_num_threads = threads
            sess = make_session(m, sess_options=so)
            outs += [sess.run(None, {"A": A})[0].tobytes() for _ in range(2)]
        assert len(set(outs)) == 1, M


@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_gemm_blocking_within_summation_bound_and_thread_invariant(isa, kind, bits):
    """The GEMM path's blocking: K beyond one slice (512 codes with one row block, 2048 with
    several), rows beyond one row block (M=300), the smallest GEMM row counts (4, 7), K % 4 tails,
    more columns than one task; every thread count gives the same bytes."""
    rng = np.random.default_rng(bits)
    for K, N, block in [(2100, 100, 64), (1030, 40, 32), (131, 19, 0), (600, 200, 16)]:
        if kind == "affine" and block == 0:
            block = 16
        fmt, p, V, zs = weight(kind, bits, K, N, block, seed=K + bits)
        m = matmul_model(fmt, p, K, N)
        sessions = []
        for threads in (1, 3):
            so = session_options()
            so.intra_op_num_threads = threads
            sessions.append(make_session(m, sess_options=so))
        for M in (4, 7, 64, 300):
            A = rng.standard_normal((M, K)).astype(np.float32)
            y1, y3 = (s.run(None, {"A": A})[0] for s in sessions)
            exact = A.astype(np.float64) @ V.T.astype(np.float64)
            assert np.all(np.abs(y1 - exact) <= sum_bound(A, V, zs)), (K, N, block, M)
            assert y1.tobytes() == y3.tobytes(), (K, N, block, M)


@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", [3, 4])
def test_every_row_count_around_the_switch_and_the_tiles(isa, kind, bits):
    """Through onnxruntime, so the GEMV/GEMM switch (per ISA and code width) is on the path: every M of
    the GEMV's 4-row blocks and their remainders (1..9), GEMM tiles of 6 rows and row blocks (63-65,
    150); K and N not multiples of a chunk (128), a GEMV K slice (1024) or a GEMM panel (4 / 16)."""
    rng = np.random.default_rng(bits)
    for K, N, block in [(1100, 6, 32), (203, 13, 16)]:
        fmt, p, V, zs = weight(kind, bits, K, N, block, seed=K + bits)
        sess = make_session(matmul_model(fmt, p, K, N))
        for M in [*range(1, 10), 63, 64, 65, 150]:
            A = rng.standard_normal((M, K)).astype(np.float32)
            y = sess.run(None, {"A": A})[0]
            exact = A.astype(np.float64) @ V.T.astype(np.float64)
            assert np.all(np.abs(y - exact) <= sum_bound(A, V, zs)), (K, N, block, M)


def test_bad_inputs_fail_with_clear_messages(monkeypatch):
    K, N = 64, 4
    fmt, p, _, _ = weight("lut", 3, K, N, 0, seed=0)
    m = matmul_model(fmt, p, K, N)
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None]))
    m.graph.node[0].attribute[0].i = 65          # K attribute no longer matches B
    sess = make_session(m)
    with pytest.raises(Exception, match="B has 96 elements, expected 100"):
        sess.run(None, {"A": np.zeros((1, 65), np.float32)})
    m.graph.node[0].attribute[0].i = 64
    with pytest.raises(Exception, match="last dimension must be K=64"):
        make_session(m).run(None, {"A": np.zeros((1, 65), np.float32)})
    bad = matmul_model(fmt, p, K, N)
    bad.graph.node[0].attribute[2].i = 9         # bits
    with pytest.raises(Exception, match="bits must be 1..8"):
        make_session(bad)
    monkeypatch.setenv("BAYESQ_ISA", "sse9")
    with pytest.raises(Exception, match="BAYESQ_ISA=sse9"):
        make_session(matmul_model(fmt, p, K, N))


def test_small_graph_through_make_session(isa):
    """x -> bayesq MatMul (LUT, bias) -> Relu -> bayesq MatMul (affine) -> + Conv of a bayesq-dequantized
    weight on a reshaped input: the library's outputs against the reference evaluator."""
    rng = np.random.default_rng(5)
    K1, N1, N2 = 96, 48, 32
    f1, p1, V1, _ = weight("lut", 3, K1, N1, 0, seed=1)
    f2, p2, V2, _ = weight("affine", 5, N1, N2, 16, seed=2)
    f3, p3, _, _ = weight("affine", 4, N1, 8 * 1 * 1, 16, seed=3)      # Conv (8, N1, 1, 1) along I
    b1 = rng.standard_normal(N1).astype(np.float32)
    n1, i1 = bayesq_matmul_node("x", "h", "l1", f1, p1, K1, N1, bias="b1")
    n2, i2 = bayesq_matmul_node("hr", "y2", "l2", f2, p2, N1, N2)
    n3, i3 = bayesq_dequantize_node("Wc", "c3", f3, p3, (8, N1, 1, 1), axis=1)
    nodes = [n1, helper.make_node("Relu", ["h"], ["hr"]), n2, n3,
             helper.make_node("Reshape", ["hr", "shape4"], ["h4"]),
             helper.make_node("Conv", ["h4", "Wc"], ["yc"])]
    inits = i1 + i2 + i3 + [numpy_helper.from_array(b1, "b1"),
                            numpy_helper.from_array(np.array([-1, N1, 1, 1], np.int64), "shape4")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K1])],
                          [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, N2]),
                           helper.make_tensor_value_info("yc", TensorProto.FLOAT, [None, 8, 1, 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])
    x = rng.standard_normal((3, K1)).astype(np.float32)
    got = make_session(m).run(None, {"x": x})
    want = ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, {"x": x})
    for a, b in zip(got, want):
        # two chained fp32 layers of width <= 96: relative 1e-5 is ~100 eps, far above their rounding
        # (the per-layer bound is tested above) and far below any layout error (O(1) relative)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def gather_model(fmt, packed, V, D, itype=TensorProto.INT64):
    node, inits = bayesq_gather_node("ids", "E", "t", fmt, packed, V, D)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", itype, [None, None])],
                          [helper.make_tensor_value_info("E", TensorProto.FLOAT, [None, None, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])


@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gather_bit_exact(isa, kind, bits):
    """Rows of a (V, D) table stored as a MatMul view (D = K, the row length; V = N rows): the kernels'
    row decode against the reference, bit for bit; int64 and int32 indices, negative ones (from the
    end, as ONNX Gather), repeats; float16 tables equal to the same values in float32."""
    for D, V, block in CASES:
        if kind == "affine" and block == 0:
            block = 16
        fmt, p, table, _ = weight(kind, bits, D, V, block, seed=D * bits + 1, scale_dtype="float16")
        ids = np.random.default_rng(bits).integers(-V, V, (3, 70))     # > 64: several tasks
        for itype, dt in ((TensorProto.INT64, np.int64), (TensorProto.INT32, np.int32)):
            m = gather_model(fmt, p, V, D, itype)
            got = make_session(m).run(None, {"ids": ids.astype(dt)})[0]
            assert got.shape == (3, 70, D) and got.tobytes() == reference(m, {"ids": ids}).tobytes(), (D, V, block)
            assert np.array_equal(got, table[ids])
        f32, p32 = as_float32(fmt, p)
        assert make_session(gather_model(f32, p32, V, D)).run(None, {"ids": ids})[0].tobytes() == got.tobytes()


def test_gather_index_out_of_range_is_an_error():
    fmt, p, _, _ = weight("affine", 3, 64, 10, 32, seed=0)
    sess = make_session(gather_model(fmt, p, 10, 64))
    assert sess.run(None, {"ids": np.array([[-10, 9]], np.int64)})[0].shape == (1, 2, 64)
    for bad in (10, -11):
        with pytest.raises(Exception, match=rf"index {bad} is out of range \[-10, 10\)"):
            sess.run(None, {"ids": np.array([[0, bad]], np.int64)})


def test_tied_table_read_by_gather_and_head(isa):
    """One set of packed tensors (a 3-bit table, which GatherBlockQuantized cannot store) read by the
    embedding's GatherAffine and, as W = table^T, by the head's MatMulAffine."""
    V, D = 300, 64
    fmt, p, table, zs = weight("affine", 3, D, V, 32, seed=4, scale_dtype="float16")
    g_node, inits = bayesq_gather_node("ids", "e", "t", fmt, p, V, D)
    h_node, h_inits = bayesq_matmul_node("e", "logits", "t", fmt, p, K=D, N=V)
    assert [t.name for t in h_inits] == [t.name for t in inits] and list(h_node.input[1:]) == list(g_node.input[1:])
    h_node.name = "head"
    g = helper.make_graph([g_node, h_node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, V])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])
    ids = np.array([0, 5, 299, -1, 42])
    got = make_session(m).run(None, {"ids": ids})[0]
    e = table[ids]
    assert np.all(np.abs(got - e @ table.T) <= sum_bound(e, table, zs))
