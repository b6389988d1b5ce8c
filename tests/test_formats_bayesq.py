"""The bayesq formats (formats/bayesq_uniform.py, bayesq_lut.py): the packed layout of layout.h checked
by hand-worked bytes, pack/unpack round trips, exact byte counts, float16 scales / LUT levels, and the
numpy reference ops and the portable (standard-ops) lowering against plain numpy dequantization.  No
custom-op library needed."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bayesq_onnx.errors import BayesQError
from bayesq_onnx.formats import BayesqLut, BayesqUniform, LutCodes, UniformCodes
from bayesq_onnx.formats.bayesq_uniform import (code_positions, col_bytes, groups, pack_codes, pack_stream,
                                                unpack_codes, unpack_stream)
from bayesq_onnx.lower.bayesq_nodes import BAYESQ_OPSET, bayesq_dequantize_node, bayesq_gather_node, bayesq_matmul_node
from bayesq_onnx.lower.portable import portable_gather_nodes, portable_weight_nodes
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS, _bq_codes

# K with every kind of chunk: whole 128-code chunks, a partial-lane chunk (8, 9 or 15 lanes: one that
# divides 16, two that do not) and a K % 8 tail; K < 8 (only the tail).
KS = [5, 128, 136, 203, 255, 576 + 3]


def uniform(rows, L, bits, block, seed) -> UniformCodes:
    rng = np.random.default_rng(seed)
    g = groups(L, block)
    return UniformCodes(codes=rng.integers(0, 1 << bits, (rows, L), dtype=np.uint8),
                        scale=rng.uniform(0.01, 0.2, (rows, g)).astype(np.float32),
                        zero_point=rng.integers(0, 1 << bits, (rows, g), dtype=np.uint8), bits=bits, block=block)


def lut_codes(rows, L, bits, block, seed) -> LutCodes:
    rng = np.random.default_rng(seed)
    return LutCodes(codes=rng.integers(0, 1 << bits, (rows, L), dtype=np.uint8),
                    lut=rng.standard_normal((rows, groups(L, block), 1 << bits)).astype(np.float32),
                    bits=bits, block=block)


def test_layout_by_hand():
    # 3 bits, K = 136 = 128 + 8: one full chunk (16 lanes x 8 steps), then a 1-lane chunk of 8 steps.
    # Lane l of the full chunk holds k = 16*i + l; its 24-bit word is stored as a uint16 plane
    # (bytes 0-1 of all 16 lanes) then a uint8 plane (byte 2).
    codes = np.zeros((1, 136), np.uint8)
    codes[0, 16 * 2 + 5] = 7     # lane 5, step 2: bits 6..8 of lane 5's word
    codes[0, 130] = 5            # the 1-lane chunk: plain stream, code 2 at bits 6..8
    p = pack_codes(codes, 3)
    assert p.shape == (1, 51)    # 136 * 3 / 8
    expect = np.zeros(51, np.uint8)
    expect[2 * 5] = 0b11000000   # lane 5 byte 0 (uint16 plane, little endian): bits 6, 7
    expect[2 * 5 + 1] = 0b1      # lane 5 byte 1: bit 8
    expect[48] = 0b01000000      # 5 = 0b101 at bits 6..8: bit 6 set, bit 7 clear
    expect[49] = 0b1             # bit 8
    assert p[0].tolist() == expect.tolist()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_and_reference_decoder(bits):
    rng = np.random.default_rng(bits)
    for K in KS:
        c = rng.integers(0, 1 << bits, (3, K), dtype=np.uint8)
        p = pack_codes(c, bits)
        assert p.shape == (3, col_bytes(K, bits)) and p.dtype == np.uint8
        assert np.array_equal(unpack_codes(p, K, bits), c)
        assert np.array_equal(_bq_codes(p, K, bits), c)          # the reference op's bit-by-bit reader
        lo, hi, sh = code_positions(K, bits)                     # the portable lowering's positions
        q = ((p[:, lo].astype(np.uint32) | p[:, hi].astype(np.uint32) << 8) >> sh.astype(np.uint32)) & ((1 << bits) - 1)
        assert np.array_equal(q, c)
        z = rng.integers(0, 1 << bits, (3, 7), dtype=np.uint8)
        assert np.array_equal(unpack_stream(pack_stream(z, bits), bits, 7), z)


def test_pack_is_deterministic_and_checks_input():
    c = np.random.default_rng(0).integers(0, 8, (4, 203), dtype=np.uint8)
    assert pack_codes(c, 3).tobytes() == pack_codes(c.copy(), 3).tobytes()
    with pytest.raises(ValueError, match="exceed 3 bits"):
        pack_codes(c + 8, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        BayesqUniform(3, 24)
    with pytest.raises(ValueError, match="1..8"):
        BayesqLut(9, 0)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", [1, 3, 5, 6, 8])
def test_uniform_format(bits, scale_dtype):
    fmt = BayesqUniform(bits, 32, scale_dtype)
    assert fmt.name == f"bq-u{bits}-g32" + ("-f16" if scale_dtype == "float16" else "")
    for K in (200, 576):
        q = uniform(5, K, bits, 32, seed=K + bits)
        p = fmt.pack(q)
        assert p["scales"].dtype == np.dtype(scale_dtype)
        assert fmt.stored_bits(5, K) == 8 * sum(a.nbytes for a in p.values())
        back = fmt.unpack(p, 5, K)
        assert back.scale.dtype == np.float32
        # the stored scales: q's own in float32, nearest-even fp16 values (widened) in float16
        assert np.array_equal(back.scale, q.scale.astype(scale_dtype).astype(np.float32))
        assert np.array_equal(back.scale, fmt.round_scales(q.scale))
        for f in ("codes", "zero_point"):
            assert np.array_equal(getattr(back, f), getattr(q, f)), f
        assert np.array_equal(back.dequantize(), fmt.stored_codes(q).dequantize())
    # dense: 3 bits per weight plus one fp32 (fp16) scale and one 3-bit zero point per group of 32
    assert BayesqUniform(3, 32).stored_bits(1, 4096) == 4096 * 3 + 128 * 32 + 128 * 3
    assert BayesqUniform(3, 32, "float16").stored_bits(1, 4096) == 4096 * 3 + 128 * 16 + 128 * 3


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits,block", [(2, 0), (3, 0), (3, 64), (4, 16), (6, 128)])
def test_lut_format(bits, block, scale_dtype):
    fmt = BayesqLut(bits, block, scale_dtype)
    assert fmt.name == f"bq-lut{bits}-g{block or 'row'}" + ("-f16" if scale_dtype == "float16" else "")
    q = lut_codes(6, 203, bits, block, seed=bits)
    p = fmt.pack(q)
    assert p["lut"].dtype == np.dtype(scale_dtype)
    assert fmt.stored_bits(6, 203) == 8 * sum(a.nbytes for a in p.values())
    # one 16- or 32-bit level per code value per group on top of the dense codes
    lbits = 16 if scale_dtype == "float16" else 32
    assert fmt.stored_bits(6, 203) == 8 * 6 * col_bytes(203, bits) + 6 * groups(203, block) * (1 << bits) * lbits
    back = fmt.unpack(p, 6, 203)
    stored = q.lut.astype(scale_dtype).astype(np.float32)
    assert np.array_equal(back.codes, q.codes) and np.array_equal(back.lut, stored)
    assert np.array_equal(fmt.round_scales(q.lut), stored)
    assert np.array_equal(back.dequantize(), fmt.stored_codes(q).dequantize())
    if scale_dtype == "float32":
        assert np.array_equal(back.dequantize(), q.dequantize())


def test_scale_dtype_defaults_and_errors():
    # the default stays float32 (existing two-argument constructions and names unchanged)
    assert BayesqUniform(3, 64).scale_dtype == BayesqLut(3, 0).scale_dtype == "float32"
    assert BayesqUniform(3, 64) == BayesqUniform(3, 64, "float32") != BayesqUniform(3, 64, "float16")
    assert BayesqUniform(3, 64).name == "bq-u3-g64" and BayesqLut(3, 0, "float16").name == "bq-lut3-grow-f16"
    # fp32 at 3 bits, group 64: scales cost 0.5 bits/weight; fp16 halves that
    per_w = [(f.stored_bits(1, 6400) - 6400 * 3 - 8 * 38) / 6400 for f in     # 100 3-bit zps: 38 bytes
             (BayesqUniform(3, 64), BayesqUniform(3, 64, "float16"))]
    assert per_w == [0.5, 0.25]
    with pytest.raises(ValueError, match="scale_dtype"):
        BayesqUniform(3, 64, "bfloat16")
    with pytest.raises(ValueError, match="scale_dtype"):
        BayesqLut(3, 0, "float64")
    # fp16 rounding is nearest-even from the fp32 value; beyond fp16's range is the user's error
    fmt = BayesqUniform(3, 16, "float16")
    s = np.array([[1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65504.0]], np.float32)   # two ties, fp16 max
    assert fmt.round_scales(s).tolist() == [[1.0, 1 + 2 * 2.0 ** -10, 65504.0]]
    assert fmt.round_scales(s).dtype == np.float32
    q = uniform(1, 48, 3, 16, seed=0)
    big = UniformCodes(codes=q.codes, scale=np.full((1, 3), 7e4, np.float32), zero_point=q.zero_point, bits=3, block=16)
    with pytest.raises(BayesQError, match="exceeds the float16 range"):
        fmt.pack(big)
    with pytest.raises(BayesQError, match="exceeds the float16 range"):
        BayesqLut(3, 16, "float16").round_scales(np.full((1, 3, 8), -1e5, np.float32))
    assert BayesqUniform(3, 16).pack(big)["scales"].dtype == np.float32     # fine in float32
    # a positive scale below fp16's least subnormal keeps the least positive step, never 0 (a grid
    # with no step: its closed-form loss divides by it); LUT levels may be 0
    tiny = np.array([[1e-9, 2.0 ** -25, 2.0 ** -24]], np.float32)
    assert fmt.round_scales(tiny).tolist() == [[2.0 ** -24] * 3]
    assert BayesqLut(1, 0, "float16").round_scales(np.array([[[1e-9, 0.0]]], np.float32)).tolist() == [[[0.0, 0.0]]]


def test_lut_from_uniform_dequantizes_identically():
    q = uniform(4, 300, 3, 64, seed=1)
    assert np.array_equal(LutCodes.from_uniform(q).dequantize(), q.dequantize())


# ------------------------------------------------------------------ reference ops and portable lowering

def weight_case(kind, bits, K, N, block, seed, scale_dtype="float32"):
    if kind == "lut":
        fmt, q = BayesqLut(bits, block, scale_dtype), lut_codes(N, K, bits, block, seed)
    else:
        fmt, q = BayesqUniform(bits, block, scale_dtype), uniform(N, K, bits, block, seed)
    # dequantize() of the stored scales / levels: the plain-numpy view (N, K)
    return fmt, fmt.pack(q), fmt.stored_codes(q).dequantize()


def one_node_model(nodes, inits, inputs, out, out_shape, opsets=(BAYESQ_OPSET,)):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), *opsets])


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 6, 8])
def test_reference_ops(kind, bits, scale_dtype):
    K, N, block = 203, 5, 16
    fmt, p, V = weight_case(kind, bits, K, N, block, seed=bits, scale_dtype=scale_dtype)
    node, inits = bayesq_dequantize_node("W", "w", fmt, p, (K, N), axis=0)
    W = ReferenceEvaluator(one_node_model([node], inits, [], "W", [K, N]), new_ops=REFERENCE_OPS).run(None, {})[0]
    assert np.array_equal(W, V.T)
    # a Conv weight (O, I, kh, kw) quantized along I: view rows are (o, y, x)
    O, I, kh, kw = 3, K, 1, 2
    _, pc, Vc = weight_case(kind, bits, I, O * kh * kw, block, 7, scale_dtype)
    node, inits = bayesq_dequantize_node("W", "w", fmt, pc, (O, I, kh, kw), axis=1)
    W = ReferenceEvaluator(one_node_model([node], inits, [], "W", [O, I, kh, kw]), new_ops=REFERENCE_OPS).run(None, {})[0]
    assert np.array_equal(W, np.moveaxis(Vc.reshape(O, kh, kw, I), -1, 1))
    A = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)
    node, inits = bayesq_matmul_node("A", "Y", "w", fmt, p, K, N)
    m = one_node_model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, K])], "Y", [2, N])
    Y = ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, {"A": A})[0]
    assert np.array_equal(Y, A @ V.T)            # the reference is this very numpy product
    # an embedding lookup: rows of the view, ONNX Gather's index rule
    node, inits = bayesq_gather_node("ids", "E", "w", fmt, p, V=N, D=K)
    m = one_node_model([node], inits, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])], "E", [2, 3, K])
    ids = np.array([[0, 4, -1], [2, 2, -5]])
    assert np.array_equal(ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, {"ids": ids})[0], V[ids])
    with pytest.raises(IndexError, match=r"outside \[-5, 5\)"):
        ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, {"ids": np.array([[0, 1, 5], [0, 0, 0]])})


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("K,block", [(203, 16), (576, 32), (5, 0)])
def test_portable_lowering_runs_on_plain_onnxruntime(kind, bits, K, block, scale_dtype):
    if kind == "affine" and block == 0:
        block = 16
    N = 7
    fmt, p, V = weight_case(kind, bits, K, N, block, seed=K + bits, scale_dtype=scale_dtype)
    nodes, inits = portable_weight_nodes("W", "w", fmt, p, (K, N), axis=0)
    # float16 stays float16 in the file (the packed size), widened by a Cast after the Gather
    stored = [t for t in inits if t.name in ("w_lut", "w_scales")]
    assert len(stored) == 1 and stored[0].data_type == (TensorProto.FLOAT16 if scale_dtype == "float16"
                                                         else TensorProto.FLOAT)
    m = one_node_model(nodes, inits, [], "W", [K, N], opsets=())
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # no library
    assert np.array_equal(sess.run(None, {})[0], V.T)
    # Conv layout through the same nodes
    nodes, inits = portable_weight_nodes("W", "w", fmt, p, (N, K, 1, 1), axis=1)
    W = ort.InferenceSession(one_node_model(nodes, inits, [], "W", [N, K, 1, 1], opsets=()).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(W, V.reshape(N, K, 1, 1))


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["lut", "affine"])
@pytest.mark.parametrize("bits", [1, 3, 4, 6])
def test_portable_gather_unpacks_only_the_rows_it_reads(kind, bits, scale_dtype):
    """--target portable's embedding lookup: the packed rows are gathered by index, then unpacked with
    standard ops; bit for bit the rows of the dequantized table, for any index shape and type.  No
    initializer-only subgraph is left (onnxruntime could fold it into an fp32 table)."""
    D, V = 203, 9
    fmt, p, table = weight_case(kind, bits, D, V, 16 if kind == "affine" else 0, seed=bits, scale_dtype=scale_dtype)
    nodes, inits = portable_gather_nodes("ids", "E", "t", fmt, p, V=V, D=D)
    computed = {"ids"} | {o for n in nodes for o in n.output}
    first = {n.name for n in nodes if not any(i in computed for i in n.input)}
    assert not first, first      # every node depends on the indices
    for shape, itype, dt in (([2, 5], TensorProto.INT64, np.int64), ([7], TensorProto.INT32, np.int32)):
        m = one_node_model(nodes, inits, [helper.make_tensor_value_info("ids", itype, shape)], "E", shape + [D],
                           opsets=())
        ids = np.random.default_rng(bits).integers(-V, V, shape).astype(dt)
        got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        assert np.array_equal(got, table[ids])
