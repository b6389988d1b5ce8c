"""graph/shapes.py: shape inference through the packed ops' stand-ins, on a small token model
compressed both ways (onnxruntime's formats: GatherBlockQuantized + MatMulNBits; ours: bayesq Gather
and MatMul ops).  The tokens' rows reach the first MatMul, the pooled rows the second."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx import compress
from bayesq_onnx.graph.shapes import fold_shapes, leading_dims, packed_outputs, rows_follow
from bayesq_onnx.runtime.session import make_session


@pytest.mark.parametrize("custom_ops", [False, True])
def test_rows_follow_the_packed_ops(tmp_path, custom_ops):
    src = tmp_path / "embed.onnx"
    onnx.save(models.embed(vocab=1000, d=128, seq=12), src)
    out = tmp_path / "q.onnx"
    compress(str(src), bits=4.5, method="rtn", custom_ops=custom_ops, calib=models.embed_data(n=16, vocab=1000),
             output=str(out))
    m = onnx.load(str(out))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    gather, matmul = ("GatherAffine", "MatMulAffine") if custom_ops else ("GatherBlockQuantized", "MatMulNBits")
    assert ops[gather] == 1 and ops[matmul] == 2, ops
    a = [n.input[0] for n in m.graph.node if n.op_type == matmul]
    dims = leading_dims(m, a)
    assert dims[a[0]] == tuple(sorted(("n", 12), key=repr))     # tokens: batch x the export's length
    assert dims[a[1]] == ("n",)                                   # after the mean over the tokens
    # the tokens' MatMul reads one row per token id, the pooled head one per sample: no single ratio
    assert rows_follow(m, a[:1]) == (m.graph.input[0].name, 1)
    assert rows_follow(m, a) is None
    # what onnxruntime is told of the packed ops' outputs (it infers nothing past a custom op)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in packed_outputs(m, ("bayesq", "com.microsoft"))}
    assert shapes == {n.output[0]: want for n, want in zip(
        [n for n in m.graph.node if n.op_type in (gather, matmul)], (["n", 12, 128], ["n", 12, 128], ["n", 32]))}


def test_inference_that_cannot_follow_says_so():
    m = models.embed()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()       # an unnamed batch: nothing to carry
    dims = leading_dims(m, ["e", "p"])
    assert dims == {"e": None, "p": None}


def test_rows_follow_an_unnamed_dimension_too():
    """Each free dimension gets a size of its own for inference, named or not, so the token rows
    are still one per id when the batch has no name."""
    m = models.embed()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    assert rows_follow(m, ["e"]) == ("ids", 1)
    assert rows_follow(m, ["e", "p"]) is None


def _rotated():
    """x plus its halves swapped, as a Llama's rotary embedding adds them: inference cannot size the
    halves (slices at a computed point), so the sum's batch is known only where broadcasting fixes
    it -- against a batch of 8, not of 1.  ``Shape`` nodes read the sum (``s``), the sum with one row
    more (``s1``: batch + 1) and two sums stacked (``s2``: 2 x batch)."""
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"], start=1),
        helper.make_node("Div", ["xs", "two"], ["half"]),
        helper.make_node("Slice", ["x", "zero", "half", "one"], ["lo"]),
        helper.make_node("Slice", ["x", "half", "big", "one"], ["hi"]),
        helper.make_node("Concat", ["hi", "lo"], ["rot"], axis=1),
        helper.make_node("Add", ["x", "rot"], ["y"]),
        helper.make_node("Concat", ["y", "row"], ["y1"], axis=0),
        helper.make_node("Concat", ["y", "y"], ["y2"], axis=0),
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Shape", ["y1"], ["s1"]),
        helper.make_node("Shape", ["y2"], ["s2"]),
    ]
    inits = [c("two", [2]), c("zero", [0]), c("one", [1]), c("big", [1 << 30]),
             numpy_helper.from_array(np.zeros((1, 6), np.float32), "row")]
    outs = [helper.make_tensor_value_info(o, TensorProto.INT64, None) for o in ("xs", "s", "s1", "s2")]
    g = helper.make_graph(nodes, "rotated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_shapes_fold_at_a_batch_of_one_too(batch):
    """fold_shapes folds the sum's shape at every batch, 1 included (there inference at the batch
    itself leaves it open, and the primes' reading fixes it), and the stacked sums' (2 x batch); the
    extra row's (batch + 1) is not a product of the sizes, and stays a Shape node unless inference
    at the batch itself fixes it.  Every folded value is what onnxruntime computes."""
    m = _rotated()
    nodes = fold_shapes(m, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6])])
    folded = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"}
    x = np.arange(batch * 6, dtype=np.float32).reshape(batch, 6)
    ran = dict(zip(("xs", "s", "s1", "s2"), make_session(m).run(None, {"x": x})))
    assert {"xs", "s", "s2"} <= set(folded)
    assert ("s1" in folded) == (batch > 1)     # at a batch of 1 the extra row's sum is open to inference
    for name, value in folded.items():
        np.testing.assert_array_equal(value, ran[name])
