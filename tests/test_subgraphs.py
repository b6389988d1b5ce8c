"""Weights read inside If / Loop subgraphs: found, quantized, stored packed, and executed by the
rewritten node inside the subgraph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import models
from bayesq_onnx import Recipe, compress, make_session
from bayesq_onnx.graph.cone import all_nodes, subgraphs
from bayesq_onnx.graph.inspect import inspect_model
from bayesq_onnx.graph.sites import find_sites
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS
from bayesq_onnx.runtime.session import _constants, _producers

BAYESQ_ONLY = {"matmul_bits": (), "bayesq_bits": (3, 5)}   # MatMul weights in formats only bayesq ops run
TARGETS = {"native": {"custom_ops": False},            # com.microsoft MatMulNBits / GatherBlockQuantized
           "bayesq": BAYESQ_ONLY,                       # bayesq MatMulAffine inside the subgraph
           "portable": {"target": "portable", **BAYESQ_ONLY}}   # standard ops rebuild the weight in the main graph


def _numpy_branches(w, x, ids):
    """models.branches in numpy, one run (one condition for the whole batch)."""
    hid = x @ w["W1"] + w["E"][ids] if x.mean() > 0 else x @ w["W2"].T
    return np.maximum(hid, 0) @ w["W3"]


def _numpy_loop(w, x):
    h = x
    for _ in range(3):
        h = np.tanh(h @ w["W"])
    return h @ w["W3"]


def _dequantized(q: onnx.ModelProto, name: str, shape) -> np.ndarray:
    """The weight ``name`` as the lowered model computes with it: its packed reader (wherever it
    sits) run alone by the numpy reference ops on an identity (MatMul) or on every row index
    (Gather); for --target portable, the main-graph nodes that rebuild it."""
    inits = list(q.graph.initializer)
    packed = {f"bq_{name}_B", f"bq_{name}_data"}
    node = next((n for n in all_nodes(q.graph) if n.domain and set(n.input) & packed), None)
    picks = [n for n in all_nodes(q.graph) if n.op_type == "Gather" and n.input[0] == f"bq_{name}_B"
             and n.input[1].endswith("_rows")]
    if node is None and picks:   # portable lookup: the nodes that gather and unpack rows, on every row index
        start = next(n for n in all_nodes(q.graph) if n.output[0] == picks[0].input[1])
        tag = start.name[:-len("_u0")]
        nodes = [n for n in all_nodes(q.graph) if n.name.startswith(tag + "_u")]
        g = helper.make_graph(nodes, "w", [helper.make_tensor_value_info(start.input[0], TensorProto.INT64, None)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
        return ReferenceEvaluator(helper.make_model(g, opset_imports=q.opset_import)).run(
            None, {start.input[0]: np.arange(shape[0])})[0]
    if node is None:    # portable: the weight is a main-graph tensor computed from the packed one
        g = helper.make_graph([n for n in q.graph.node if n.name.startswith(f"bq_{name}_")], "w", [],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)], inits)
        return ReferenceEvaluator(helper.make_model(g, opset_imports=q.opset_import)).run(None, {})[0]
    n = onnx.NodeProto()
    n.CopyFrom(node)
    gather = n.op_type in ("GatherBlockQuantized", "GatherAffine", "GatherLut")
    n.input[1 if n.op_type == "GatherBlockQuantized" else 0] = "probe_in"
    n.output[0] = "w"
    # with the main-graph nodes that compute its constant inputs (a scaled codebook's table)
    made = _producers(_constants(q.graph), n.input)
    g = helper.make_graph([*made, n], "w", [helper.make_tensor_value_info("probe_in", TensorProto.INT64 if gather
                                                                          else TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)], inits)
    K = next((a.i for a in n.attribute if a.name == "K"), 0)
    feed = np.arange(shape[0]) if gather else np.eye(K, dtype=np.float32)
    w = ReferenceEvaluator(helper.make_model(g, opset_imports=q.opset_import),
                           new_ops=REFERENCE_OPS).run(None, {"probe_in": feed})[0]
    return w if gather or name != "W2" else w.T     # W2 is read by Gemm with transB: the MatMul sees W2^T


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", ["branches", "loop"])
def test_weights_in_subgraphs_are_stored_packed_and_run(tmp_path, case, target):
    if target != "native":
        pytest.importorskip("bayesq_onnx.runtime.custom_ops").require()
    m, data = getattr(models, case)(), getattr(models, case + "_data")()
    out = tmp_path / "q.onnx"
    rep = compress(m, Recipe(bits=4.5, **TARGETS[target]), calib=data, output=out).report
    nested = {"branches": {"W1", "W2", "E"}, "loop": {"W"}}[case]
    layers = {l["name"]: l for l in rep["layers"]}
    assert set(layers) == nested | {"W3"} and rep["skipped"] == []
    assert all(layers[w]["format"] != "float32" for w in nested), rep["plan"]
    for w in nested:   # what the statistics of a weight in a subgraph come from
        how = "data-free" if case == "loop" else "calibration: its input is a main-graph tensor"
        assert layers[w]["subgraph"] == {"branches": "If", "loop": "Loop"}[case]
        assert layers[w]["statistics"].startswith(how), layers[w]["statistics"]
    assert "statistics" not in layers["W3"]

    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    # no fp32 copy anywhere: neither in the main graph nor in a subgraph
    everywhere = [t.name for t in q.graph.initializer] + \
                 [t.name for n in all_nodes(q.graph) for g in subgraphs(n) for t in g.initializer]
    assert not set(layers) & set(everywhere)
    # the file stores exactly the bits the report counts, per weight (read back by inspect)
    got = {e["name"]: 8 * e["bytes"] for e in inspect_model(out)["quantized"]}
    assert got == {k: l["stored_bits"] for k, l in layers.items()}
    inner = [n for n in all_nodes(q.graph) if n not in q.graph.node]
    inner_reads = {i for n in inner for i in n.input}
    for k in nested:
        if target == "portable" and k != "E":   # standard ops rebuild it in the main graph; the subgraph reads it
            assert k in inner_reads and any(n.output[0] == k for n in q.graph.node)
        elif target == "portable":              # the lookup gathers packed rows inside the subgraph
            assert any(n.op_type == "Gather" and n.input[0] == "bq_E_B" for n in inner)
        else:                                   # the subgraph's reader is the packed op, on outer-scope tensors
            ops = ({"GatherBlockQuantized"} if target == "native" else {"GatherAffine", "GatherLut"}) if k == "E" \
                else ({"MatMulNBits"} if target == "native" else {"MatMulAffine", "MatMulLut"})
            codes = f"bq_{k}_{'data' if k == 'E' and target == 'native' else 'B'}"
            assert any(n.op_type in ops and codes in n.input for n in inner), k

    w = {k: _dequantized(q, k, l["shape"]) for k, l in layers.items()}
    session = make_session(str(out))
    orig = make_session(m.SerializeToString())
    runs = [{k: v[d["x"].mean(axis=1) * s > 0] for k, v in d.items()} for d in [data] for s in (1, -1)] \
        if case == "branches" else [data]     # one run per branch: the condition is one per run
    for feed in runs:
        y = session.run(None, feed)[0]
        want = _numpy_branches(w, **feed) if case == "branches" else _numpy_loop(w, **feed)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)   # fp32 kernels against numpy: summation order
        if case == "branches":   # onnx 1.23's reference Loop misses numpy on the fp32 model itself (4.3 max abs)
            ref = ReferenceEvaluator(q, new_ops=REFERENCE_OPS).run(None, feed)[0]
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
        fp32 = orig.run(None, feed)[0]
        # the dequantized weights are not the originals, and the model still carries the signal
        assert 0 < np.linalg.norm(y - fp32) / np.linalg.norm(fp32) < 0.5


def test_subgraph_sites_and_what_stays_skipped():
    """Outer-scope reads are sites; a subgraph's own initializer, a name a subgraph redefines, and a
    Transpose inside a subgraph are not."""
    vi = lambda n, t=TensorProto.FLOAT, s=None: helper.make_tensor_value_info(n, t, s)
    t = lambda n: numpy_helper.from_array(np.ones((64, 64), np.float32), n)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_in_then"),
                              helper.make_node("MatMul", ["a", "L"], ["b"], name="mm_local"),
                              helper.make_node("Transpose", ["T"], ["Tt"], name="tr_in_then"),
                              helper.make_node("MatMul", ["b", "Tt"], ["y1"], name="mm_t")],
                             "then", [], [vi("y1")], [t("L")])
    # the else branch defines its own S (a Constant), which hides the main graph's S there
    other = helper.make_graph([helper.make_node("Constant", [], ["S"], value=t("S_value"), name="c"),
                               helper.make_node("MatMul", ["x", "S"], ["y2"], name="mm_s")], "else", [], [vi("y2")])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if"),
                           helper.make_node("MatMul", ["x", "S"], ["z"], name="mm_main")], "g",
                          [vi("c", TensorProto.BOOL, []), vi("x", s=[2, 64])], [vi("y"), vi("z")],
                          [t("W"), t("T"), t("S")])
    sites, skipped = find_sites(helper.make_model(g))
    by = {s.name: s for s in sites}
    assert set(by) == {"W", "S"}
    assert by["W"].consumers == ("mm_in_then",) and by["W"].subgraph == "If" and by["W"].activations == ("x",)
    assert by["S"].consumers == ("mm_main",) and by["S"].subgraph == ""      # mm_s reads the branch's own S
    assert {(s.name, s.reason) for s in skipped} == {
        ("T", "transposed inside a control-flow subgraph"),
        ("L", "an initializer of a control-flow subgraph (only the main graph's initializers are quantized)")}
