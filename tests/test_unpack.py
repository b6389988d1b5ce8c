"""make_session's load-time unpack policy (runtime/session.py): ``always`` turns bayesq MatMuls into fp32
MatMuls on the weight dequantized bit-exactly (outputs checked against numpy on the reference
dequantization), ``never`` hands onnxruntime the graph unchanged, ``auto`` follows packed_below: packed,
unpacked, or switched on the rows per call (a SwitchingSession where the rows follow a graph input,
else an If per MatMul) so that each call runs exactly one or the other."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.errors import BayesQError
from bayesq_onnx.lower.bayesq_nodes import BAYESQ_OPSET, bayesq_matmul_node
from bayesq_onnx.runtime import custom_ops, session, tune
from bayesq_onnx.runtime.reference_ops import _bq_affine, _bq_lut
from bayesq_onnx.graph.shapes import rows_follow
from bayesq_onnx.runtime.session import SwitchingSession, make_session, packed_below, session_options

from test_custom_ops import EPS32, weight

pytestmark = pytest.mark.skipif(not custom_ops.available(), reason=str(custom_ops.unavailable_reason()))

K1, N1, N2 = 200, 48, 24    # K1 % 8 != 0: the K tail is unpacked too


@pytest.fixture(autouse=True)
def small_models_too(monkeypatch):
    """These models are far below SMALL_MODEL, which auto unpacks whatever the table says."""
    monkeypatch.setattr(session, "SMALL_MODEL", 0)


def two_layer(fp16=False):
    """x -> MatMulLut (3 bits, bias) -> Relu -> MatMulAffine (5 bits, zero points); and the weights
    W (K, N) as numpy's reference dequantization gives them, straight from the packed tensors."""
    T = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    f1, p1, _, _ = weight("lut", 3, K1, N1, 0, seed=1)
    f2, p2, _, _ = weight("affine", 5, N1, N2, 16, seed=2)
    b1 = np.random.default_rng(3).standard_normal(N1).astype(np.float16 if fp16 else np.float32)
    n1, i1 = bayesq_matmul_node("x", "h", "l1", f1, p1, K1, N1, bias="b1")
    n2, i2 = bayesq_matmul_node("hr", "y", "l2", f2, p2, N1, N2)
    g = helper.make_graph([n1, helper.make_node("Relu", ["h"], ["hr"]), n2], "g",
                          [helper.make_tensor_value_info("x", T, [None, K1])],
                          [helper.make_tensor_value_info("y", T, [None, N2]),
                           helper.make_tensor_value_info("h", T, [None, N1])],
                          i1 + i2 + [numpy_helper.from_array(b1, "b1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])
    W1 = _bq_lut(p1["B"], p1["lut"], K1, N1, 3, 0).T
    W2 = _bq_affine(p2["B"], p2["scales"], p2["zero_points"], N1, N2, 5, 16).T
    return m, W1, W2, b1


def rewritten(m, unpack, fold=True):
    return session._rewrite(m, session_options(), session.DEFAULT_PROVIDERS, fold, unpack)


def if_session(m):
    """``auto``'s If graph in a plain session (what make_session runs where rows follow no input)."""
    return ort.InferenceSession(rewritten(m, "auto").SerializeToString(), sess_options=session_options())


def bound(A, W):
    """fp32 summation-order bound (onnxruntime's MatMul and numpy each: Higham's gamma_K)."""
    return 2 * A.shape[-1] * EPS32 * (np.abs(A) @ np.abs(W)) + 1e-30


def test_always_unpacks_to_the_reference_dequantization():
    m, W1, W2, b1 = two_layer()
    out = rewritten(m, "always")
    assert not [n for n in out.graph.node if n.domain == custom_ops.DOMAIN]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]   # float32: no casts
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits["h__bq_unpacked_W"].tobytes() == W1.astype(np.float32).tobytes()     # bit-exact
    assert inits["y__bq_unpacked_W"].tobytes() == W2.astype(np.float32).tobytes()
    assert not any(k.startswith(("l1_", "l2_")) for k in inits)                           # packed ones gone

    x = np.random.default_rng(0).standard_normal((5, K1)).astype(np.float32)
    y, h = make_session(m, unpack="always").run(None, {"x": x})
    h_ref = x @ W1 + b1
    # the bias adds one rounding to the summation bound
    assert np.all(np.abs(h - h_ref) <= bound(x, W1) + EPS32 * np.abs(h_ref))
    hr = np.maximum(h, 0)                    # layer 2 checked on the session's own layer-1 output
    assert np.all(np.abs(y - hr @ W2) <= bound(hr, W2))


def test_always_with_float16_activations_computes_in_fp32_and_rounds_once():
    m, W1, W2, b1 = two_layer(fp16=True)
    out = rewritten(m, "always")
    assert not [n for n in out.graph.node if n.domain == custom_ops.DOMAIN]
    x = np.random.default_rng(1).standard_normal((4, K1)).astype(np.float16)
    y, h = make_session(m, unpack="always").run(None, {"x": x})
    assert h.dtype == y.dtype == np.float16
    exact = x.astype(np.float32) @ W1 + b1.astype(np.float32)
    # one fp16 rounding (half an ulp: 2^-11 relative, 6e-8 absolute below fp16's normal range) plus
    # the fp32 summation bound
    assert np.all(np.abs(h.astype(np.float32) - exact) <= 2.0 ** -11 * np.abs(exact) + bound(x.astype(np.float32), W1)
                  + 6e-8)


def test_never_hands_onnxruntime_the_graph_unchanged(monkeypatch):
    m, *_ = two_layer()
    assert rewritten(m, "never") is None     # nothing to fold or unpack: the model is passed as given
    seen = []
    real = session.ort.InferenceSession
    monkeypatch.setattr(session.ort, "InferenceSession", lambda model, **kw: seen.append(model) or real(model, **kw))
    x = np.random.default_rng(0).standard_normal((2, K1)).astype(np.float32)
    packed = make_session(m, unpack="never").run(None, {"x": x})
    assert seen == [m.SerializeToString()]
    unpacked = make_session(m, unpack="always").run(None, {"x": x})
    g = onnx.load_from_string(seen[-1]).graph
    assert not [n for n in g.node if n.domain == custom_ops.DOMAIN]
    # the same function either way (summation orders differ: a relative 1e-5, ~100 eps, is far above
    # that and far below any decoding error)
    for a, b in zip(packed, unpacked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_packed_below_by_set_and_format(monkeypatch):
    monkeypatch.setattr(session, "PACKED_BELOW", {"x": (6, 8, 4, 5)})
    assert [packed_below(b, False, "x") for b in (2, 3, 4, 6)] == [6, 6, 4, 4]   # 5-8 bits take 4 bits'
    assert [packed_below(b, True, "x") for b in (2, 3, 4, 6)] == [8, 8, 5, 5]    # codebooks
    assert packed_below(3, False, "neon") == 1                                  # no measurement: unpack


def test_auto_follows_the_rule_per_weight(monkeypatch):
    m, *_ = two_layer()
    isa = custom_ops.kernel_isa()
    # layer 1 (3-bit codebook) switched at 4 rows, layer 2 (5-bit affine) unpacked
    monkeypatch.setattr(session, "PACKED_BELOW", {isa: (9, 4, 1, 9)})
    assert [n.op_type for n in rewritten(m, "auto").graph.node if n.op_type in ("If", "MatMul")] == ["If", "MatMul"]
    # a model this small (K1 * N1 + N1 * N2 weights) is unpacked whatever the table says
    monkeypatch.setattr(session, "SMALL_MODEL", K1 * N1 + N1 * N2 + 1)
    assert [n.op_type for n in rewritten(m, "auto").graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    x = np.random.default_rng(0).standard_normal((3, K1)).astype(np.float32)
    assert make_session(m).run(None, {"x": x})[0].shape == (3, N2)        # auto is the default


@pytest.mark.parametrize("fp16", [False, True])
def test_auto_switches_on_the_rows_per_call(monkeypatch, fp16):
    """Both forms held behind an If: below the switch the outputs are the packed op's, bit for bit,
    from it on the unpacked graph's; both layers switch at 4 rows, so one If holds them and the Relu
    between.  In float16 too: the branch holds what the unpacked main graph holds, so onnxruntime
    treats its casts alike (it runs the Relu in float32 on layer 1's unrounded output in both)."""
    m, *_ = two_layer(fp16)
    isa = custom_ops.kernel_isa()
    monkeypatch.setattr(session, "PACKED_BELOW", {isa: (4, 4, 4, 4)})
    out = rewritten(m, "auto")
    assert [n.op_type for n in out.graph.node if n.op_type in ("If", "GreaterOrEqual")] == ["GreaterOrEqual", "If"]
    packed, unpacked = (make_session(m, unpack=u) for u in ("never", "always"))
    for auto in (if_session(m), make_session(m)):
        for M in (1, 3, 4, 9):
            x = np.random.default_rng(M).standard_normal((M, K1)).astype(np.float16 if fp16 else np.float32)
            got, want = auto.run(None, {"x": x}), (packed if M < 4 else unpacked).run(None, {"x": x})
            assert [a.tobytes() for a in got] == [b.tobytes() for b in want], M


def test_each_weight_keeps_its_own_switch(monkeypatch):
    """Three MatMuls on x, two switching at 4 rows and one at 7: an If for the two (one condition)
    and one for the third; each output is the packed op's below its own switch and the unpacked
    MatMul's from it on, bit for bit."""
    f1, p1, _, _ = weight("lut", 3, K1, N1, 0, seed=1)
    f2, p2, _, _ = weight("affine", 2, K1, N2, 32, seed=3)
    f3, p3, _, _ = weight("affine", 5, K1, N2, 16, seed=2)
    nodes, inits = zip(*(bayesq_matmul_node("x", y, w, f, p, K1, n) for y, w, f, p, n in
                         (("y1", "w1", f1, p1, N1), ("y2", "w2", f2, p2, N2), ("y3", "w3", f3, p3, N2))))
    g = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K1])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, n])
                           for y, n in (("y1", N1), ("y2", N2), ("y3", N2))], [t for i in inits for t in i])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])
    isa = custom_ops.kernel_isa()
    # y1 (3-bit codebook) and y2 (2-bit affine) switch at 4 rows, y3 (5-bit affine) at 7
    monkeypatch.setattr(session, "PACKED_BELOW", {isa: (4, 4, 7, 7)})
    ifs = [n for n in rewritten(m, "auto").graph.node if n.op_type == "If"]
    assert [list(n.output) for n in ifs] == [["y1", "y2"], ["y3"]]
    auto = if_session(m)
    packed, unpacked = (make_session(m, unpack=u) for u in ("never", "always"))
    for M in (3, 4, 6, 7):
        x = np.random.default_rng(M).standard_normal((M, K1)).astype(np.float32)
        got, low, high = (s.run(None, {"x": x}) for s in (auto, packed, unpacked))
        for y, switch, p, u in zip(got, (4, 4, 7), low, high):
            assert y.tobytes() == (p if M < switch else u).tobytes(), (M, switch)


def test_one_switch_for_a_model_whose_rows_follow_an_input(monkeypatch):
    """x's rows are every MatMul's rows (one per K1 elements of x), so auto is a SwitchingSession:
    the packed graph below one switch, the fp32 twin from it on, with no If in either.  The switch
    is the weight-weighted median of the MatMuls': layer 1 (3-bit codebook, K1 x N1 weights) at 6
    rows outweighs layer 2 (5-bit affine, N1 x N2) at 3; tuned, the tuned one."""
    m, *_ = two_layer()
    assert rows_follow(m, ["x", "hr"]) == ("x", K1)
    isa = custom_ops.kernel_isa()
    monkeypatch.setattr(session, "PACKED_BELOW", {isa: (9, 6, 3, 9)})
    auto = make_session(m)
    assert isinstance(auto, SwitchingSession) and (auto.rows_input, auto.ratio, auto.switch) == ("x", K1, 6)
    packed, unpacked = (make_session(m, unpack=u) for u in ("never", "always"))
    for M in (1, 5, 6, 9):
        x = np.random.default_rng(M).standard_normal((M, K1)).astype(np.float32)
        got, want = auto.run(None, {"x": x}), (packed if M < 6 else unpacked).run(None, {"x": x})
        assert [a.tobytes() for a in got] == [b.tobytes() for b in want], M
    x = np.zeros((6, K1), np.float32)
    assert auto.session_for({"x": x}) is auto.fp32 and auto.session_for({"x": x[:5]}) is auto
    tuned = make_session(m, tuning=tune.Tuning(machine={}, packed_below=2, ratios={}))
    assert tuned.switch == 2


def test_rows_told_apart_get_ifs_of_their_own(monkeypatch):
    """A mean over the tokens between the layers: layer 1 multiplies batch x seq rows, layer 2 batch,
    which shape inference tells apart, so each layer has its own If on its own input's size."""
    m, *_ = two_layer()
    g = m.graph
    layer2 = g.node[2]
    layer2.input[0] = "pooled"
    nodes = list(g.node[:2]) + [helper.make_node("ReduceMean", ["hr"], ["pooled"], axes=[1], keepdims=0), layer2]
    del g.node[:]
    g.node.extend(nodes)
    g.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K1]))
    g.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N2]))
    g.output[1].CopyFrom(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", N1]))
    isa = custom_ops.kernel_isa()
    monkeypatch.setattr(session, "PACKED_BELOW", {isa: (4, 4, 4, 4)})
    out = rewritten(m, "auto")
    assert [n.op_type for n in out.graph.node if n.op_type in ("If", "ReduceMean")] == ["If", "ReduceMean", "If"]
    auto, packed, unpacked = (make_session(m, unpack=u) for u in ("auto", "never", "always"))
    assert not isinstance(auto, SwitchingSession)      # the rows follow no one input: the If graph
    # (batch, seq): layer 1's rows, layer 2's
    for shape, (r1, r2) in (((1, 3), (packed, packed)), ((1, 4), (unpacked, packed)), ((4, 2), (unpacked, unpacked))):
        x = np.random.default_rng(shape[1]).standard_normal((*shape, K1)).astype(np.float32)
        y, h = auto.run(None, {"x": x})
        assert h.tobytes() == r1.run(None, {"x": x})[1].tobytes()
        if r1 is r2:   # layer 2's input is then the reference's own
            assert y.tobytes() == r2.run(None, {"x": x})[0].tobytes()


def test_rows_count_every_leading_dimension(monkeypatch):
    """M is the product of A's leading dimensions: (2, 3, K) is 6 rows."""
    m, *_ = two_layer()
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K1]))
    for o, n in zip(m.graph.output, (N2, N1)):
        o.CopyFrom(helper.make_tensor_value_info(o.name, TensorProto.FLOAT, [None, None, n]))
    isa = custom_ops.kernel_isa()
    monkeypatch.setattr(session, "PACKED_BELOW", {isa: (5, 5, 5, 5)})
    auto, packed, unpacked = (make_session(m, unpack=u) for u in ("auto", "never", "always"))
    for shape, ref in (((2, 2, K1), packed), ((2, 3, K1), unpacked)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for a, b in zip(auto.run(None, {"x": x}), ref.run(None, {"x": x})):
            assert a.tobytes() == b.tobytes()


def test_bad_policy_and_bad_isa(monkeypatch):
    m, *_ = two_layer()
    with pytest.raises(BayesQError, match="unpack='sometimes'"):
        make_session(m, unpack="sometimes")
    monkeypatch.setenv("BAYESQ_ISA", "sse9")   # auto keeps the ops, whose kernels then say why
    with pytest.raises(Exception, match="BAYESQ_ISA=sse9"):
        make_session(m)
