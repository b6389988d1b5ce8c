"""What ONNX shape inference tells of a graph: the rows its MatMuls multiply, the shapes its
packed ops output, the values its ``Shape`` nodes take for given input shapes.

Inference carries the graph inputs' dimension names (``batch``, ``seq``) and fixed sizes through
every op that keeps them, and names what it cannot follow ``unk__N``.  It knows no custom op: for
the inference only, each packed op stands in as the standard op of the same output shape.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

Rows = tuple   # the leading dimensions' names and sizes, sorted, 1s left out; None: not known


def _stand_in(n: onnx.NodeProto, stub: str, weights: dict) -> tuple[onnx.NodeProto, list[int]] | None:
    """A standard node with n's output shape, reading a weight ``stub`` of the returned shape
    (``weights``: the initializers by name)."""
    at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if n.domain == "com.microsoft" and n.op_type == "GatherBlockQuantized" and n.input[0] in weights:
        data = weights[n.input[0]]   # (N, K) codes, two to a byte when uint8 (com.microsoft's layout)
        if len(data.dims) == 2 and at.get("gather_axis", 0) == 0:
            per_byte = 8 // at.get("bits", 4) if data.data_type == TensorProto.UINT8 else 1
            return helper.make_node("Gather", [stub, n.input[1]], [n.output[0]]), [data.dims[0], data.dims[1] * per_byte]
    if n.domain == "bayesq" or (n.domain == "com.microsoft" and n.op_type == "MatMulNBits"):
        if n.op_type.startswith("MatMul"):
            return helper.make_node("MatMul", [n.input[0], stub], [n.output[0]]), [at["K"], at["N"]]
        if n.op_type.startswith("Gather"):
            return helper.make_node("Gather", [stub, n.input[0]], [n.output[0]]), [at["N"], at["K"]]
        if n.op_type.startswith("Dequantize"):
            return helper.make_node("Identity", [stub], [n.output[0]]), list(at.get("shape", [at["K"], at["N"]]))
    return None


def _small(t: onnx.TensorProto) -> bool:
    return math.prod(t.dims) <= 64 and t.data_location != TensorProto.EXTERNAL


def _inferred(model: onnx.ModelProto, inputs=None) -> dict | None:
    """Every main-graph tensor's inferred type (``TypeProto.Tensor``) by name, the packed ops
    standing in as standard ones, ``inputs`` (ValueInfoProtos) in place of the graph's if given;
    None where inference fails."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, stubs = [], []
    for i, n in enumerate(g.node):
        stub = f"__bq_shape_stub_{i}"
        s = _stand_in(n, stub, inits)
        nodes.append(n if s is None else s[0])
        if s is not None:
            stubs.append(helper.make_tensor_value_info(stub, TensorProto.FLOAT, s[1]))
    # weights as inputs of their shapes (inference needs no data, and a large model has GBs of it);
    # small tensors keep theirs: shapes, axes and indices that Reshape, Reduce* and Gather read
    small = [t for t in g.initializer if _small(t)]
    known = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer if not _small(t)]
    graph = helper.make_graph(nodes, g.name, list(g.input if inputs is None else inputs) + known + stubs,
                              list(g.output), small)
    stripped = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = shape_inference.infer_shapes(stripped, data_prop=True).graph
    except Exception:   # inference refuses some graphs; then nothing is known, which is always safe
        return None
    return {v.name: v.type.tensor_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}


def packed_outputs(model: onnx.ModelProto, domains=("bayesq",)) -> list[onnx.ValueInfoProto]:
    """Shapes of the outputs of the ``domains``' nodes (main graph), float32, as inference gives
    them through the stand-ins: onnxruntime infers nothing past a custom op, and without its
    outputs' shapes it skips fusions that need them (MiniLM unpacked: no BiasGelu after a bayesq
    embedding).  For a graph whose activations are float32 only (the stand-ins' type)."""
    shapes = _inferred(model) or {}
    out = []
    for n in model.graph.node:
        for o in n.output if n.domain in domains else ():
            t = shapes.get(o)
            if o and t is not None and t.HasField("shape"):
                out.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, [_size(d) for d in t.shape.dim]))
    return out


def _size(d) -> int | str | None:
    """An inferred dimension as value_info states it: inference's own names (``unk__N``), and sizes
    of 0 (what it makes of some slices of a free length), stand for sizes it could not follow."""
    if d.HasField("dim_value"):
        return d.dim_value or None
    return None if d.dim_param.startswith("unk__") else d.dim_param or None


def leading_dims(model: onnx.ModelProto, names: list[str], inputs=None) -> dict[str, Rows | None]:
    """For each tensor of ``names`` (main graph), the multiset of its dimensions but the last, as
    sizes and the graph inputs' dimension names (``batch``, ``seq``): two that differ multiply
    different rows unless a named size happens to be 1 (a pooled head's ``batch`` against the tokens'
    ``batch x seq``).  None where inference cannot tell (or fails).  ``inputs``: the graph inputs
    to infer from, if not the graph's own."""
    shapes = _inferred(model, inputs)
    if shapes is None:
        return dict.fromkeys(names)

    def dims(name):
        t = shapes.get(name)
        if t is None or not t.HasField("shape") or len(t.shape.dim) < 2:
            return None
        lead = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
                for d in t.shape.dim[:-1]]
        if any(d is None or d == "" or str(d).startswith("unk__") for d in lead):
            return None    # inference's own names stand for a size it could not follow: unknown
        return tuple(sorted((d for d in lead if d != 1), key=repr))

    return {name: dims(name) for name in names}


def _bind(model: onnx.ModelProto, primes: tuple[int, ...]) -> tuple[list[onnx.ValueInfoProto], dict[str, int]] | None:
    """Copies of the graph inputs (alone: the model may hold GBs of weights) with their free
    dimensions bound to ``primes``, one per dimension name (``input:axis`` for an unnamed one), and
    each name's prime; None where there are more names than primes."""
    values: dict[str, int] = {}
    inputs = []
    for vi in model.graph.input:
        bound = onnx.ValueInfoProto()
        bound.CopyFrom(vi)
        dims = bound.type.tensor_type.shape.dim
        for i, key in _free_dims(vi):
            if key not in values:
                if len(values) == len(primes):
                    return None
                values[key] = primes[len(values)]
            dims[i].dim_value = values[key]
        inputs.append(bound)
    return inputs, values


def _free_dims(vi: onnx.ValueInfoProto) -> list[tuple[int, str]]:
    """The axes of graph input ``vi`` without a fixed size, each with its dimension's name
    (``input:axis`` for an unnamed one): axes of one name take one size."""
    return [(i, d.dim_param or f"{vi.name}:{i}") for i, d in enumerate(vi.type.tensor_type.shape.dim)
            if not d.HasField("dim_value")]


def _is_shape(n: onnx.NodeProto) -> bool:
    return n.op_type == "Shape" and n.domain in ("", "ai.onnx")


def rows_follow(model: onnx.ModelProto, names: list[str]) -> tuple[str, int] | None:
    """A graph input of which each tensor of ``names`` (main graph) has one row per ``ratio``
    elements whatever sizes the inputs take, as ``(input, ratio)``; None where there is none or
    inference cannot tell.  A transformer's MatMuls read one row per token: ``input_ids`` with
    ratio 1.  Inference runs twice, the inputs' free dimensions bound to distinct primes each
    time (one per dimension name), so a ratio that is the same both times is a constant."""
    ratios = []
    for primes in ((3, 5, 7, 11, 13, 17, 19, 23), (29, 31, 37, 41, 43, 47, 53, 59)):
        bound = _bind(model, primes)
        if bound is None:
            return None
        inputs = bound[0]
        sizes = {vi.name: math.prod(d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in inputs}
        rows = [None if r is None or any(isinstance(x, str) for x in r) else math.prod(r)
                for r in leading_dims(model, names, inputs).values()]
        if None in rows:
            return None
        ratios.append({x: {s // r for r in rows} for x, s in sizes.items() if all(s % r == 0 for r in rows)})
    for x, first in ratios[0].items():
        if len(first) == 1 and ratios[1].get(x) == first:
            return x, first.pop()
    return None


# bindings of the free dimensions for fold_shapes' second try: primes no model constant is likely to
# hold as a factor (one that does shows as a coefficient differing between the two, and stays unfolded)
FOLD_PRIMES = ((101, 103, 107, 109, 113, 127, 131, 137), (139, 149, 151, 157, 163, 167, 173, 179))


def _shape_values(model: onnx.ModelProto, inputs: list[onnx.ValueInfoProto]) -> dict[str, list[int]]:
    """The value of each main-graph ``Shape`` node (by output name) that inference fixes for graph
    inputs of the shapes ``inputs`` state."""
    shapes = _inferred(model, inputs) or {}
    out = {}
    for n in model.graph.node:
        t = shapes.get(n.input[0]) if _is_shape(n) else None
        if t is not None and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out[n.output[0]] = [d.dim_value for d in t.shape.dim][slice(at.get("start"), at.get("end"))]
    return out


def _monomial(value: int, primes: list[int]) -> tuple[int, tuple[int, ...]] | None:
    """``value`` as ``c * prod(p ** e)`` over ``primes``: ``(c, es)``; None for a size that is not one."""
    if value <= 0:
        return None
    es = []
    for p in primes:
        e = 0
        while value % p == 0:
            value, e = value // p, e + 1
        es.append(e)
    return value, tuple(es)


def _bound_values(model: onnx.ModelProto, inputs: list[onnx.ValueInfoProto], names: set[str]) -> dict[str, list[int]]:
    """The ``Shape`` nodes of ``names`` that inference fixes once the free dimensions are primes:
    ONNX's broadcasting cannot follow a size of 1 against a dimension it lost (an exported Llama's
    rotary halves are slices it cannot size: at a batch of 1 its attention's sums lose every
    dimension, at 8 they keep them), a prime it can.  Each dimension of such a value is read, in
    two bindings with different primes, as a coefficient times a product of powers of the bound
    sizes; where both readings agree, it is that product at the sizes ``inputs`` state (a batch of 1,
    say).  A size that is not such a product (``seq + 1``, a convolution's strides) reads
    differently in the two and is left alone."""
    given = {vi.name: vi for vi in inputs}
    sizes: dict[str, int | None] = {}
    for vi in model.graph.input:
        dims = given[vi.name].type.tensor_type.shape.dim if vi.name in given else []
        for i, key in _free_dims(vi):
            size = dims[i].dim_value if i < len(dims) and dims[i].HasField("dim_value") else None
            sizes[key] = size if sizes.get(key, size) == size else None   # two sizes for one name: neither
    readings = []
    for primes in FOLD_PRIMES:
        bound = _bind(model, primes)
        if bound is None:
            return {}
        bound_inputs, keys = bound
        ps = list(keys.values())
        readings.append({o: [_monomial(v, ps) for v in vs]
                         for o, vs in _shape_values(model, bound_inputs).items() if o in names})
    keys = list(keys)
    out = {}
    for o, first in readings[0].items():
        if readings[1].get(o) != first or None in first:
            continue
        if all(sizes.get(keys[j]) is not None for _, es in first for j, e in enumerate(es) if e):
            out[o] = [c * math.prod(sizes[keys[j]] ** e for j, e in enumerate(es) if e) for c, es in first]
    return out


def fold_shapes(model: onnx.ModelProto, inputs: list[onnx.ValueInfoProto]) -> list[onnx.NodeProto]:
    """The main graph's nodes with each ``Shape`` node whose input inference fixes, for graph
    inputs of the shapes ``inputs`` state, replaced by a ``Constant`` of its value (the others
    unchanged; all of them where inference fails); where inference at those sizes leaves some
    unfixed, it tries again with the free dimensions bound to primes (:func:`_bound_values`).  An
    exported transformer takes its reshapes' targets from the shapes of its hidden states: without
    this, the masks and positions a segment reads beside its cut hang on the whole model's forward
    pass (runtime/stream.py)."""
    values = _shape_values(model, inputs)
    left = {n.output[0] for n in model.graph.node if _is_shape(n) and n.output[0] not in values}
    if left:
        values.update(_bound_values(model, inputs, left))
    return [helper.make_node("Constant", [], [n.output[0]], name=n.name,
                             value=numpy_helper.from_array(np.array(values[n.output[0]], np.int64)))
            if _is_shape(n) and n.output[0] in values else n
            for n in model.graph.node]
