"""The task-aware proxy (plan/proxy.py) measured on the whole model, on one site's forward cone
(runtime/probe.ConeRun) and from one site's segment on (runtime/stream.SegmentRun, graph/cone.py):
the same distortion, from less of the graph."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx import Analysis, Recipe
from bayesq_onnx.graph.cone import forward_cone, segments
from bayesq_onnx.plan.proxy import OutputDistortion
from bayesq_onnx.runtime.probe import ConeRun, Probe
from bayesq_onnx.runtime.stream import SegmentRun

CASES = {"mlp": (models.mlp, models.mlp_data), "embed": (models.embed, models.embed_data),
         "cnn": (models.cnn, models.cnn_data), "tied": (models.tied, models.tied_data),
         "residual": (models.residual, models.residual_data)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cone_distortion_equals_whole_model_distortion(case):
    build, data = CASES[case]
    a = Analysis(build(), Recipe(bits=4.0), calib=data())
    d = OutputDistortion(a.probe, a.fit, 8)
    rng = np.random.default_rng(0)
    for s in a.sites:
        w = a.probe.weights[s.name]
        noisy = (w + 0.05 * np.abs(w).mean() * rng.standard_normal(w.shape)).astype(np.float32)
        whole, cone = d({s.name: noisy}), d.restricted_to([s.name])({s.name: noisy})
        segmented = d.segmented([t.name for t in a.sites])({s.name: noisy})
        assert whole > 0
        # the cone and the segments run the same ops on the same inputs; only float32 rounding may
        # differ where onnxruntime fuses differently across a cut (relative 1e-7 per output, squared
        # errors of about 1e-3 relative: 1e-5 is far above that and far below any format's difference)
        assert cone == pytest.approx(whole, rel=1e-5), s.name
        assert segmented == pytest.approx(whole, rel=1e-5), s.name
        assert d.restricted_to([s.name])({}) == pytest.approx(0.0, abs=1e-10)   # unchanged: no error


def test_cone_runs_only_what_the_weight_reaches():
    a = Analysis(models.mlp(), Recipe(bits=4.0), calib=models.mlp_data())
    g = a.probe.model.graph
    cone = forward_cone(g, {"W1"})
    names = {o for n in cone.nodes for o in n.output}
    assert {"a1", "a1b", "s1", "logits"} <= names and "a0" not in names and "r0" in cone.frontier
    run = ConeRun(a.probe, ["W1"], a.fit, 8, ["logits", "aux"])
    assert run.outputs == ["logits", "aux"]                       # aux reads a2, downstream of W1
    last = ConeRun(a.probe, ["W3"], a.fit, 8, ["logits", "aux"])  # the head: one node, aux unchanged
    assert last.outputs == ["logits"] and len(forward_cone(g, {"W3"}).nodes) == 1


def test_graph_with_subgraphs_is_measured_whole():
    """An If may read outer tensors its inputs do not list: no cutting, the whole model runs."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 64)).astype(np.float32)
    branch = lambda name, op: helper.make_graph([helper.make_node(op, ["h"], [f"y_{name}"])], name, [],
                                                [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             helper.make_node("Greater", ["sx", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("t", "Relu"), else_branch=branch("e", "Neg"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.float32(0), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    probe = Probe(m, ["W"])
    assert probe.model is None
    d = OutputDistortion(probe, {"x": rng.standard_normal((4, 1, 64)).astype(np.float32)[:, 0]}, 1)
    assert d.restricted_to(["W"]) is d


def test_segments_cut_the_residual_stream_between_blocks():
    """One segment per block, cut where the stream is the only live tensor: a Shape of the stream
    carries no value and the head's Transpose only prepares a weight, so neither keeps it open.
    In the first block the stream is the model's input, which no weight changes: there the ReLU
    between the two weights is a cut too."""
    a = Analysis(models.residual(), Recipe(bits=4.0), calib=models.residual_data())
    names = {s.name for s in a.sites}
    assert names == {"up0", "down0", "up1", "down1", "up2", "down2", "headT"}
    segs = segments(a.probe.model.graph, names, a.probe.outputs)
    assert [(sg.start, sg.end) for sg in segs] == [(None, "r0"), ("r0", "h0"), ("h0", "h1"), ("h1", "h2"), ("h2", None)]
    reads = [{i for n in sg.nodes for i in n.input} & names for sg in segs]
    assert reads == [{"up0"}, {"down0"}, {"up1", "down1"}, {"up2", "down2"}, {"headT"}]
    assert [n.op_type for n in segs[-1].nodes] == ["Transpose", "MatMul"]


def test_a_tied_weight_is_measured_through_every_segment_that_reads_it():
    """The tied table is read by the first segment (Gather) and the last (head): the segmented
    measurement changes it in both, as the whole model does."""
    a = Analysis(models.tied(), Recipe(bits=4.0), calib=models.tied_data())
    d = OutputDistortion(a.probe, a.fit, 8)
    s = next(s for s in a.sites if s.kind == "tied")
    w = a.probe.weights[s.name]
    noisy = (w + 0.05 * np.abs(w).mean() * np.random.default_rng(0).standard_normal(w.shape)).astype(np.float32)
    only_head = d.segmented([t.name for t in a.sites])
    # rel: float32 rounding across the cuts only (see above)
    assert only_head({s.name: noisy}) == pytest.approx(d({s.name: noisy}), rel=1e-5)


def test_a_shape_of_the_cone_feeding_the_frontier_is_computed_by_the_prefix():
    """As BERT's attention mask: the Shape of a tensor the weights change sizes a mask outside the
    cone, which the cone then reads.  The shape is the same whatever the weights, so the mask is
    part of the frontier; the part of the model that computes it must include that Shape."""
    rng = np.random.default_rng(0)
    W = {n: (rng.standard_normal((64, 64)) / 8).astype(np.float32) for n in ("W1", "W2")}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Shape", ["h"], ["shp"]),
             helper.make_node("Expand", ["mask", "shp"], ["m"]),      # outside the cone: mask and a shape
             helper.make_node("Mul", ["h", "m"], ["hm"]),
             helper.make_node("MatMul", ["hm", "W2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
                                       helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                          [numpy_helper.from_array(w, n) for n, w in W.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    data = {"x": models.mlp_data(32)["x"], "mask": (rng.random((32, 1)) > 0.3).astype(np.float32)}
    a = Analysis(m, Recipe(bits=4.0), calib=data)
    d = OutputDistortion(a.probe, a.fit, 8)
    for name in ("W1", "W2"):
        w = a.probe.weights[name]
        noisy = (w + 0.05 * np.abs(w).mean() * rng.standard_normal(w.shape)).astype(np.float32)
        whole = d({name: noisy})
        # rel: float32 rounding across the cuts only (see above)
        assert d.restricted_to([name])({name: noisy}) == pytest.approx(whole, rel=1e-5)
        assert d.segmented(["W1", "W2"])({name: noisy}) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("case", ["tied", "residual"])
def test_a_linear_head_is_read_from_its_input(case, monkeypatch):
    """A last segment that is only ``x @ W`` (here through a Transpose) is not run for the sites
    before it: the distortion of ``x @ W`` is read from ``x`` with the Gram ``W W^T``, and is the
    whole model's.  The head's own measurement still runs it."""
    build, data = CASES[case]
    a = Analysis(build(), Recipe(bits=4.0), calib=data())
    d = OutputDistortion(a.probe, a.fit, 8)
    measure = d.segmented([t.name for t in a.sites])
    rng = np.random.default_rng(0)
    ran = []
    real = SegmentRun.outputs_from
    monkeypatch.setattr(SegmentRun, "outputs_from", lambda self, k, o: ran.append(k) or real(self, k, o))
    for s in a.sites:
        w = a.probe.weights[s.name]
        noisy = (w + 0.05 * np.abs(w).mean() * rng.standard_normal(w.shape)).astype(np.float32)
        ran.clear()
        # rel: the head's logits differences carry float32 rounding of the logits themselves in the
        # whole run (about 1e-7 of |y| against differences of 1e-3 of it); the Gram path does not
        assert measure({s.name: noisy}) == pytest.approx(d({s.name: noisy}), rel=1e-5), s.name
        assert bool(ran) == (s.name == {"tied": "E", "residual": "headT"}[case]), s.name
