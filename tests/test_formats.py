"""Stored formats: pack/unpack, exact byte counts, and agreement with onnxruntime's CPU kernels and
with our numpy reference ops (runtime/reference_ops.py)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bayesq_onnx.formats import (BlockedDequantize, Float32, GatherBlockQuantized, MatMulNBits,
                                 UniformCodes, n_groups, pack_bits, unpack_bits)
from bayesq_onnx.lower.nodes import dequantize_node, gather_block_quantized_node, matmulnbits_node
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS

EPS32 = np.finfo(np.float32).eps


def rand_codes(rows, L, bits, block, seed, exact=False):
    """Random codes/zero points over the full range.  ``exact``: scales are powers of two 2^-4..1, so
    every product (q - zp) * s * x with small integer x is exact in fp32, as is every partial sum."""
    rng = np.random.default_rng(seed)
    g = n_groups(L, block)
    if exact:
        scale = np.ldexp(1.0, -rng.integers(0, 5, (rows, g))).astype(np.float32)
    else:
        scale = rng.uniform(0.01, 0.2, (rows, g)).astype(np.float32)
    return UniformCodes(codes=rng.integers(0, 1 << bits, (rows, L), dtype=np.uint8), scale=scale,
                        zero_point=rng.integers(0, 1 << bits, (rows, g), dtype=np.uint8),
                        bits=bits, block=block)


def assert_codes_equal(a: UniformCodes, b: UniformCodes):
    for f in ("codes", "scale", "zero_point"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y), f
    assert (a.bits, a.block) == (b.bits, b.block)


def model(nodes, inits, inputs, outputs, opset=21):
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=opsets,
                             ir_version=helper.find_min_ir_version_for(opsets[:1]))


def run_ort(m, feeds, config=None):
    so = ort.SessionOptions()
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def run_ref(m, feeds):
    return ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, feeds)[0]


def test_pack_bits_lsb_first():
    # Hand-checked bytes: 2 bits [1,2,3,0,3] -> 0b00111001, 0b00000011; 4 bits [1,2,15] -> 0x21, 0x0f.
    assert pack_bits(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [0b00111001, 0b11]
    assert pack_bits(np.array([1, 2, 15], np.uint8), 4).tolist() == [0x21, 0x0F]
    c = np.random.default_rng(0).integers(0, 4, (3, 13), dtype=np.uint8)
    assert np.array_equal(unpack_bits(pack_bits(c, 2), 2, 13), c)


# ----------------------------------------------------------------------------- MatMulNBits

MNB_SHAPES = [(16, 1), (40, 3), (10, 5), (100, 7), (256, 33)]   # (K, N): K % block != 0, K < block, N odd


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("K,N", MNB_SHAPES)
def test_matmulnbits(bits, block, K, N):
    fmt = MatMulNBits(bits, block)
    assert fmt.name == f"matmulnbits-b{bits}-g{block}"
    for exact in (True, False):
        q = rand_codes(N, K, bits, block, seed=K * N + bits + block + exact, exact=exact)
        p = fmt.pack(q)
        nb = n_groups(K, block)
        assert p["B"].shape == (N, nb, block * bits // 8) and p["B"].dtype == np.uint8
        assert p["scales"].shape == (N, nb) and p["scales"].dtype == np.float32
        assert p["zero_points"].shape == (N, -(-nb * bits // 8)) and p["zero_points"].dtype == np.uint8
        assert fmt.stored_bits(N, K) == 8 * sum(a.nbytes for a in p.values())
        assert_codes_equal(fmt.unpack(p, N, K), q)

        node, inits = matmulnbits_node("A", "Y", "w", fmt, p, K, N, accuracy_level=0)
        m = model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])])
        rng = np.random.default_rng(K + N)
        w = q.dequantize()                                    # (N, K) = W^T
        if exact:
            x = rng.integers(-3, 4, (3, K)).astype(np.float32)
        else:
            x = rng.standard_normal((3, K)).astype(np.float32)
        want = x @ w.T
        y, y_ref = run_ort(m, {"A": x}), run_ref(m, {"A": x})
        if exact:
            # All products and partial sums are multiples of 2^-4 below 2^18 (< 2^24 ulps): exact in
            # any summation order, so any packing/layout error shows up as a mismatch.
            assert np.array_equal(y, want) and np.array_equal(y_ref, want)
        else:
            # fp32 dot products in different summation orders: |err| <= K * eps * sum|x_k w_k| (gamma_K).
            tol = K * EPS32 * (np.abs(x) @ np.abs(w).T) + 1e-30
            assert np.all(np.abs(y - want) <= tol) and np.all(np.abs(y_ref - y) <= tol)


def test_matmulnbits_3d_input_and_bias():
    K, N, fmt = 70, 9, MatMulNBits(4, 32)
    q = rand_codes(N, K, 4, 32, seed=1, exact=True)
    node, inits = matmulnbits_node("A", "Y", "w", fmt, fmt.pack(q), K, N, bias="bias")
    bias = np.arange(N, dtype=np.float32)
    inits.append(helper.make_tensor("bias", TensorProto.FLOAT, [N], bias))
    m = model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3, K])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, N])])
    x = np.random.default_rng(2).integers(-3, 4, (2, 3, K)).astype(np.float32)
    want = x @ q.dequantize().T + bias                       # exact: see test_matmulnbits
    assert np.array_equal(run_ort(m, {"A": x}), want) and np.array_equal(run_ref(m, {"A": x}), want)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmulnbits_accuracy_level4_runs(bits):
    # Level 4 quantizes A to int8 per block (fast kernels for every width); ORT must accept it.
    K, N, fmt = 96, 11, MatMulNBits(bits, 32)
    q = rand_codes(N, K, bits, 32, seed=bits)
    node, inits = matmulnbits_node("A", "Y", "w", fmt, fmt.pack(q), K, N, accuracy_level=4)
    m = model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [4, K])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, N])])
    x = np.random.default_rng(0).standard_normal((4, K)).astype(np.float32)
    want = x @ q.dequantize().T
    # int8 activations: per-element error <= scale/2 = max|x_block|/254, i.e. <~0.4% of |x|; summed
    # over K the output error stays well under 2% of the output's magnitude.
    err = np.linalg.norm(run_ort(m, {"A": x}) - want) / np.linalg.norm(want)
    assert err < 0.02
    # The reference ignores the level and computes in fp32: gamma_K bound as in test_matmulnbits.
    assert np.all(np.abs(run_ref(m, {"A": x}) - want) <= K * EPS32 * (np.abs(x) @ np.abs(q.dequantize()).T))


def test_matmulnbits_invalid():
    with pytest.raises(ValueError):
        MatMulNBits(3, 32)
    with pytest.raises(ValueError):
        MatMulNBits(4, 24)
    # ORT itself rejects 3 bits (so the format's restriction is real, not ours).
    fmt, K, N = MatMulNBits(4, 16), 16, 2
    node, inits = matmulnbits_node("A", "Y", "w", fmt, fmt.pack(rand_codes(N, K, 4, 16, 0)), K, N)
    node.attribute[[a.name for a in node.attribute].index("bits")].i = 3
    node.input[1:] = [t.name for t in inits]
    m = model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])])
    with pytest.raises(Exception):
        run_ort(m, {"A": np.zeros((1, K), np.float32)})


# ----------------------------------------------------------------------------- DequantizeLinear


def _dq_case(fmt, native, axis, seed):
    """View from a native-layout weight, per the documented rule moveaxis(W, axis, -1).reshape(-1, L)."""
    L = native[axis]
    rows = int(np.prod(native)) // L
    q = rand_codes(rows, L, fmt.bits, fmt.block, seed)
    p = fmt.pack(q)
    node, inits = dequantize_node("W", "dq", fmt, p, native, axis)
    m = model([node], inits, [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, list(native))],
              opset=fmt.min_opset())
    assert m.ir_version == fmt.min_ir_version()
    return q, p, inits, m


# (native shape, axis): MatMul B (K, N) axis 0; Conv OIHW axis 1; a plain (rows, L) axis 1; 1x1 conv.
DQ_LAYOUTS = [((37, 5), 0), ((4, 19, 3, 2), 1), ((1, 8), 1), ((3, 40, 1, 1), 1)]


@pytest.mark.parametrize("bits,signed", [(2, False), (2, True), (4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("block", [1, 3, 16, 32])
@pytest.mark.parametrize("native,axis", DQ_LAYOUTS)
def test_blocked_dequantize(bits, signed, block, native, axis):
    fmt = BlockedDequantize(bits, block, signed)
    assert fmt.name == f"dq-{'' if signed else 'u'}int{bits}-g{block}"
    assert fmt.min_opset() == (25 if bits == 2 else 21)
    q, p, inits, m = _dq_case(fmt, native, axis, seed=bits * 100 + block)
    rows, L = q.codes.shape
    assert p["x"].dtype == p["x_zero_point"].dtype == (np.int8 if signed else np.uint8)
    lo = -(1 << (bits - 1)) if signed else 0
    assert p["x"].min() >= lo and p["x"].max() < lo + (1 << bits)
    assert_codes_equal(fmt.unpack(p, rows, L), q)
    # Sub-byte tensors really stored packed: file bytes == what stored_bits counts.
    assert all(t.raw_data and not t.int32_data for t in inits)
    assert fmt.stored_bits(rows, L) == 8 * sum(len(t.raw_data) for t in inits)
    assert len(inits[0].raw_data) == -(-rows * L * bits // 8)

    # Expected weight in native layout, built by hand (not via lower.nodes.to_native).
    w = q.dequantize()
    if axis == 0:
        want = w.T
    else:
        O, I, *hw = native
        want = w.reshape(O, *hw, I).transpose(0, len(native) - 1, *range(1, len(native) - 1))
    y = run_ort(m, {})
    assert y.shape == tuple(native)
    assert np.array_equal(y, want)              # DequantizeLinear is one int subtract and one fp32 multiply
    assert np.array_equal(run_ref(m, {}), want)


def test_dequantize_into_conv_and_matmul():
    # DQ feeding a real Conv: ORT accepts the layout and computes the conv of the dequantized weight.
    fmt = BlockedDequantize(4, 16, signed=True)
    q = rand_codes(6 * 3 * 3, 20, 4, 16, seed=5)
    node, inits = dequantize_node("W", "dq", fmt, fmt.pack(q), (6, 20, 3, 3), 1)
    conv = helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])
    m = model([node, conv], inits, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 20, 5, 5])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    x = np.random.default_rng(0).standard_normal((1, 20, 5, 5)).astype(np.float32)
    y, y_ref = run_ort(m, {"X": x}), run_ref(m, {"X": x})
    # 180-term fp32 dot products summed in different orders: |err| <= 2 * 180 * eps * sum|x w|, and
    # sum|x w| <= max|x| * max_o sum|W[o]| (view rows of one output channel are consecutive).
    bound = np.abs(x).max() * np.abs(q.dequantize()).reshape(6, -1).sum(1).max()
    assert y.shape == (1, 6, 5, 5) and np.max(np.abs(y - y_ref)) <= 2 * 180 * EPS32 * bound

    # DQ -> MatMul: with the session entry at "0" ORT's MatMulNBits fusion keeps fp32 activations, so
    # with exact inputs (see test_matmulnbits) the result is exact.
    K, N = 64, 5
    fmt = BlockedDequantize(4, 32, signed=False)
    q = rand_codes(N, K, 4, 32, seed=3, exact=True)
    node, inits = dequantize_node("W", "dq", fmt, fmt.pack(q), (K, N), 0)
    mm = helper.make_node("MatMul", ["X", "W"], ["Y"])
    m = model([node, mm], inits, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, K])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, N])])
    x = np.random.default_rng(1).integers(-3, 4, (2, K)).astype(np.float32)
    y = run_ort(m, {"X": x}, {"session.qdq_matmulnbits_accuracy_level": "0"})
    assert np.array_equal(y, x @ q.dequantize().T)


# ----------------------------------------------------------------------------- GatherBlockQuantized

GBQ_SHAPES = [(1, 16), (7, 40), (11, 100), (5, 8), (3, 20), (9, 256)]   # (V, D): V odd, D < block, D % block


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("V,D", GBQ_SHAPES)
@pytest.mark.parametrize("itype", [TensorProto.INT64, TensorProto.INT32])
def test_gather_block_quantized(bits, block, V, D, itype):
    fmt = GatherBlockQuantized(bits, block)
    assert fmt.name == f"gbq-b{bits}-g{block}" and fmt.supports(V, D)
    q = rand_codes(V, D, bits, block, seed=V * D + bits + block)
    p = fmt.pack(q)
    g = n_groups(D, block)
    assert p["data"].shape == (V, D * bits // 8) and p["data"].dtype == np.uint8
    assert p["scales"].shape == (V, g) and p["zero_points"].shape == (V, -(-g * bits // 8))
    assert fmt.stored_bits(V, D) == 8 * sum(a.nbytes for a in p.values())
    assert_codes_equal(fmt.unpack(p, V, D), q)

    node, inits = gather_block_quantized_node("ids", "E", "emb", fmt, p)
    m = model([node], inits, [helper.make_tensor_value_info("ids", itype, [2, None])],
              [helper.make_tensor_value_info("E", TensorProto.FLOAT, [2, None, D])])
    npdt = np.int64 if itype == TensorProto.INT64 else np.int32
    ids = np.array([[0, V - 1, -1, 0], [V // 2, -V, V, -V - 1]], npdt)   # repeats, negatives, out of range
    w = q.dequantize()
    want = np.where(((ids >= -V) & (ids < V))[..., None], w[np.clip(ids, -V, V - 1)], 0)
    # Gather + one fp32 multiply per element: exact.
    assert np.array_equal(run_ort(m, {"ids": ids}), want)
    assert np.array_equal(run_ref(m, {"ids": ids}), want)


def test_gather_block_quantized_limits():
    assert not GatherBlockQuantized(2, 16).supports(4, 18)     # D must fill whole bytes
    assert not GatherBlockQuantized(4, 16).supports(4, 17)
    assert GatherBlockQuantized(8, 16).supports(4, 17)
    with pytest.raises(ValueError):
        GatherBlockQuantized(4, 16).pack(rand_codes(2, 17, 4, 16, 0))
    with pytest.raises(ValueError):
        GatherBlockQuantized(4, 8)                              # ORT: power of two >= 16


# ----------------------------------------------------------------------------- Float32 / misc


def test_float32():
    fmt = Float32()
    q = rand_codes(5, 7, 4, 4, 0)
    p = fmt.pack(q)
    assert fmt.name == "float32" and fmt.bits == 32
    assert np.array_equal(p["W"], q.dequantize()) and fmt.stored_bits(5, 7) == 8 * p["W"].nbytes == 32 * 35


def test_formats_hashable_and_distinct():
    fs = [MatMulNBits(4, 32), MatMulNBits(4, 32), BlockedDequantize(4, 32, True), BlockedDequantize(4, 32),
          GatherBlockQuantized(4, 32), Float32()]
    assert len(set(fs)) == 5 and len({f.name for f in fs}) == 5
