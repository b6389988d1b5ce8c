"""graph/shapes.py: shape inference through the packed ops' stand-ins, on a small token model
compressed both ways (onnxruntime's formats: GatherBlockQuantized + MatMulNBits; ours: bayesq Gather
and MatMul ops).  The tokens' rows reach the first MatMul, the pooled rows the second."""
from __future__ import annotations

import collections

import onnx
import pytest

import models
from bayesq_onnx import compress
from bayesq_onnx.graph.shapes import leading_dims, packed_outputs, rows_follow


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
