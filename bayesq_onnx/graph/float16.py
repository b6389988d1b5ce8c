"""Cast a float32 model to float16 or bfloat16 (its weights, and its activations with them): how the
tests and ``tools/bench_fp16.py`` make half-precision models out of float32 ones.

    half = to_half(onnx.load("model.onnx"), "float16", keep_io_types=True)

Every float32 initializer and Constant becomes ``dtype`` (values beyond its finite range are clipped
to it, so a ``finfo(float32).min`` mask constant stays finite: ``0 * -inf`` would give NaN), every
``Cast(to=FLOAT)`` casts to ``dtype``, and float32 value_info is retyped.  ``keep_io_types``: the
graph's float32 inputs and outputs stay float32 with a Cast after / before them (as converters
commonly offer); otherwise they change type too.  Tensors some op needs in float32 whatever its
other inputs' type (``Resize`` scales) stay float32.  Main graph only: a model with control-flow
subgraphs is refused.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import BayesQError

_TYPES = {"float16": (TensorProto.FLOAT16, np.float16), "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}
_FLOAT32_INPUTS = {("Resize", 2), ("Upsample", 1)}   # (op, input slot) that must stay float32


def _cast_tensor(t: TensorProto, np_type) -> TensorProto:
    a = numpy_helper.to_array(t).astype(np.float32)
    big = float(ml_dtypes.finfo(np_type).max)
    out = numpy_helper.from_array(np.clip(a, -big, big).astype(np_type), t.name)
    return out


def to_half(model: onnx.ModelProto, dtype: str = "float16", keep_io_types: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` computing in ``dtype`` ("float16" or "bfloat16"); see the module doc."""
    if dtype not in _TYPES:
        raise BayesQError(f"to_half: dtype must be float16 or bfloat16, got {dtype!r}")
    onnx_type, np_type = _TYPES[dtype]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise BayesQError("to_half: models with control-flow subgraphs are not converted")
    keep32 = {n.input[i] for n in g.node for op, i in _FLOAT32_INPUTS if n.op_type == op and len(n.input) > i}
    inits = []
    for t in g.initializer:
        inits.append(_cast_tensor(t, np_type) if t.data_type == TensorProto.FLOAT and t.name not in keep32 else t)
    del g.initializer[:]
    g.initializer.extend(inits)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT and n.output[0] not in keep32:
                a.t.CopyFrom(_cast_tensor(a.t, np_type))
            elif n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = onnx_type
    for v in g.value_info:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT and v.name not in keep32:
            v.type.tensor_type.elem_type = onnx_type
    inits_names = {t.name for t in g.initializer}
    head, tail = [], []
    for v in g.input:
        if v.name in inits_names or v.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if keep_io_types:
            inner = f"{v.name}__{dtype}"
            for n in g.node:
                n.input[:] = [inner if i == v.name else i for i in n.input]
            head.append(helper.make_node("Cast", [v.name], [inner], to=onnx_type, name=f"{inner}_cast"))
        else:
            v.type.tensor_type.elem_type = onnx_type
    for v in g.output:
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if keep_io_types:
            inner = f"{v.name}__{dtype}"
            for n in g.node:
                n.input[:] = [inner if i == v.name else i for i in n.input]
                n.output[:] = [inner if o == v.name else o for o in n.output]
            tail.append(helper.make_node("Cast", [inner], [v.name], to=TensorProto.FLOAT, name=f"{inner}_cast"))
        else:
            v.type.tensor_type.elem_type = onnx_type
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    return m
