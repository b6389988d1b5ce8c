"""An ONNX graph run with torch ops, so that autograd gives gradients and Hessian-vector products
keyed by initializer name (the ONNX-only route to gradient curvature: no torch source needed).

Why this means (issue 5, item 3): onnxruntime-training installs into the same ``onnxruntime/``
folder as onnxruntime 1.32 (docs/design.md, "What the runtimes accept"), so it would need its own environment and a process
boundary; a backward of our own would have to be written and checked op by op, twice for double
backward.  Executing the graph node by node with torch ops gets first and second derivatives of
every covered op from torch for free, and the float initializers are the leaves, so nothing has to
be mapped back.  The cost is covering the ops the exporters emit; an op outside the table is a
one-line error naming it (``supported_ops()`` lists the table).

Only ``plain_graph`` reads ONNX protos (lazily imported); the executor sees numpy arrays and
plain attributes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BayesQError, first_line

_DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto element types -> torch dtypes (the enum is fixed by the ONNX spec)
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


@dataclass(frozen=True)
class PlainNode:
    op: str
    name: str
    inputs: tuple[str, ...]     # "" marks an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict                 # python scalars, lists, strings, numpy arrays (tensor attributes)


@dataclass(frozen=True)
class PlainGraph:
    nodes: tuple[PlainNode, ...]
    initializers: dict[str, np.ndarray]
    inputs: tuple[str, ...]     # graph inputs that are not initializers
    outputs: tuple[str, ...]
    opset: int                  # version of the default domain


def plain_graph(model) -> PlainGraph:
    """Read an ``onnx.ModelProto`` (as returned by ``graph.model_io.load_model``) into plain data.
    Ops outside the default domain and control flow (subgraphs) are refused here, by name."""
    import onnx
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    if opset is None:
        raise BayesQError("the model imports no version of the default ONNX domain")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for i, n in enumerate(model.graph.node):
        if n.domain not in _DEFAULT_DOMAINS:
            raise BayesQError(f"unsupported op {n.domain}.{n.op_type} (node {n.name or i}) for gradient curvature")
        attrs = {}
        for a in n.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise BayesQError(f"unsupported op {n.op_type} with a subgraph (node {n.name or i}) for gradient "
                                  "curvature")
            v = helper.get_attribute_value(a)
            if a.type == onnx.AttributeProto.TENSOR:
                v = numpy_helper.to_array(v)
            elif a.type == onnx.AttributeProto.STRING:
                v = v.decode()
            elif a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
                v = list(v)
            attrs[a.name] = v
        nodes.append(PlainNode(n.op_type, n.name or f"{n.op_type}_{i}", tuple(n.input), tuple(n.output), attrs))
    inputs = tuple(v.name for v in model.graph.input if v.name not in inits)
    return PlainGraph(tuple(nodes), inits, inputs, tuple(o.name for o in model.graph.output), opset)


# ----------------------------------------------------------------------------- op table

_OPS: dict[str, Callable] = {}


def _op(*names):
    def register(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def supported_ops() -> list[str]:
    return sorted(_OPS)


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _scalar(t):
    return t.reshape(-1)[0].item()


class _Ctx:
    """What an op sees besides its inputs: the node's attributes and the opset."""

    __slots__ = ("node", "opset")

    def __init__(self, node: PlainNode, opset: int):
        self.node, self.opset = node, opset

    def attr(self, name, default=None):
        return self.node.attrs.get(name, default)

    @property
    def n_outputs(self) -> int:
        return sum(1 for o in self.node.outputs if o)


_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos,
    "Sign": torch.sign, "Not": torch.logical_not, "IsNaN": torch.isnan, "Softsign": F.softsign,
    "Softplus": F.softplus, "HardSwish": F.hardswish, "Identity": lambda x: x,
}
for _n, _f in _UNARY.items():
    _op(_n)(lambda c, x, _f=_f: [_f(x[0])])

_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "MatMul": torch.matmul,
}
for _n, _f in _BINARY.items():
    _op(_n)(lambda c, x, _f=_f: [_f(x[0], x[1])])


@_op("Div")
def _div(c, x):
    a, b = x
    if not a.is_floating_point() and not b.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]   # C integer division, as onnxruntime
    return [a / b]


@_op("Mod")
def _mod(c, x):
    return [torch.fmod(x[0], x[1]) if c.attr("fmod", 0) else torch.remainder(x[0], x[1])]


@_op("Max", "Min", "Sum", "Mean")
def _variadic(c, x):
    f = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[c.node.op]
    out = x[0]
    for t in x[1:]:
        out = f(out, t)
    return [out / len(x) if c.node.op == "Mean" else out]


@_op("IsInf")
def _isinf(c, x):
    t = x[0]
    pos, neg = c.attr("detect_positive", 1), c.attr("detect_negative", 1)
    return [(torch.isposinf(t) & bool(pos)) | (torch.isneginf(t) & bool(neg))]


@_op("LeakyRelu")
def _leaky(c, x):
    return [F.leaky_relu(x[0], c.attr("alpha", 0.01))]


@_op("Elu")
def _elu(c, x):
    return [F.elu(x[0], c.attr("alpha", 1.0))]


@_op("Selu")
def _selu(c, x):
    a, g = c.attr("alpha", 1.67326319217681884765625), c.attr("gamma", 1.05070102214813232421875)
    # expm1 of min(x, 0): the branch torch.where discards must not overflow (inf * 0 = nan gradient)
    return [g * torch.where(x[0] > 0, x[0], a * torch.expm1(torch.clamp(x[0], max=0)))]


@_op("PRelu")
def _prelu(c, x):
    return [torch.where(x[0] >= 0, x[0], x[0] * x[1])]


@_op("HardSigmoid")
def _hsig(c, x):
    return [torch.clamp(c.attr("alpha", 0.2) * x[0] + c.attr("beta", 0.5), 0.0, 1.0)]


@_op("Gelu")
def _gelu(c, x):
    return [F.gelu(x[0], approximate=c.attr("approximate", "none"))]


@_op("Clip")
def _clip(c, x):
    if c.opset < 11:
        lo, hi = c.attr("min"), c.attr("max")
    else:
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
    return [torch.clamp(x[0], lo, hi)]


@_op("Where")
def _where(c, x):
    return [torch.where(x[0].bool(), x[1], x[2])]


@_op("Cast")
def _cast(c, x):
    to = c.attr("to")
    if to not in _DTYPES:
        raise BayesQError(f"unsupported Cast to ONNX type {to} (node {c.node.name})")
    return [x[0].to(_DTYPES[to])]


@_op("CastLike")
def _castlike(c, x):
    return [x[0].to(x[1].dtype)]


@_op("Constant")
def _constant(c, x):
    a = c.node.attrs
    if "value" in a:
        return [torch.from_numpy(np.array(a["value"]))]
    if "value_float" in a:
        return [torch.tensor(a["value_float"], dtype=torch.float32)]
    if "value_floats" in a:
        return [torch.tensor(a["value_floats"], dtype=torch.float32)]
    if "value_int" in a:
        return [torch.tensor(a["value_int"], dtype=torch.int64)]
    if "value_ints" in a:
        return [torch.tensor(a["value_ints"], dtype=torch.int64)]
    raise BayesQError(f"unsupported Constant attribute {sorted(a)} (node {c.node.name})")


@_op("ConstantOfShape")
def _const_of_shape(c, x):
    v = c.attr("value")
    value = torch.from_numpy(np.array(v)).reshape(-1) if v is not None else torch.zeros(1, dtype=torch.float32)
    return [value.expand(_ints(x[0])).clone() if _ints(x[0]) else value.reshape(()).clone()]


@_op("Shape")
def _shape(c, x):
    dims = list(x[0].shape)
    start, end = c.attr("start", 0), c.attr("end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@_op("Size")
def _size(c, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@_op("Reshape")
def _reshape(c, x):
    shape = _ints(x[1])
    if not c.attr("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


@_op("Flatten")
def _flatten(c, x):
    t = x[0]
    a = _axis(c.attr("axis", 1), t.dim())
    return [t.reshape(math.prod(t.shape[:a]), math.prod(t.shape[a:]))]


def _axes_arg(c, x, idx: int, since: int):
    """Axes given as an attribute before opset ``since``, as input ``idx`` from it on."""
    if c.opset < since:
        return c.attr("axes")
    return _ints(x[idx]) if len(x) > idx and x[idx] is not None else None


@_op("Unsqueeze")
def _unsqueeze(c, x):
    t, axes = x[0], _axes_arg(c, x, 1, 13)
    rank = t.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        t = t.unsqueeze(a)
    return [t]


@_op("Squeeze")
def _squeeze(c, x):
    t, axes = x[0], _axes_arg(c, x, 1, 13)
    if axes is None:
        return [t.reshape([d for d in t.shape if d != 1])]
    axes = {_axis(a, t.dim()) for a in axes}
    return [t.reshape([d for i, d in enumerate(t.shape) if i not in axes])]


@_op("Transpose")
def _transpose(c, x):
    perm = c.attr("perm") or list(range(x[0].dim()))[::-1]
    return [x[0].permute(perm)]


@_op("Expand")
def _expand(c, x):
    return [x[0].expand(torch.broadcast_shapes(x[0].shape, tuple(_ints(x[1]))))]


@_op("Tile")
def _tile(c, x):
    return [x[0].repeat(_ints(x[1]))]


@_op("Concat")
def _concat(c, x):
    return [torch.cat([t for t in x if t is not None], dim=c.attr("axis"))]


@_op("Split")
def _split(c, x):
    t = x[0]
    axis = _axis(c.attr("axis", 0), t.dim())
    if c.opset < 13:
        sizes = c.attr("split")
    else:
        sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    if sizes is None:
        n = c.attr("num_outputs", c.n_outputs)
        step = -(-t.shape[axis] // n)
        sizes = [min(step, t.shape[axis] - i * step) for i in range(n)]
    return list(torch.split(t, sizes, dim=axis))


@_op("Slice")
def _slice(c, x):
    t = x[0]
    if c.opset < 10:
        starts, ends, axes, steps = c.attr("starts"), c.attr("ends"), c.attr("axes"), None
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, t.dim())
        dim = t.shape[a]
        if st > 0:
            s = min(max(s + dim if s < 0 else s, 0), dim)
            e = min(max(e + dim if e < 0 else e, 0), dim)
            t = t[(slice(None),) * a + (slice(s, max(e, s), st),)]
        else:  # torch has no negative-step slicing: gather the indices (clamped as the spec says)
            s = min(max(s + dim if s < 0 else s, -1), dim - 1)
            e = min(max(e + dim if e < 0 else e, -1), dim - 1)
            idx = torch.arange(s, e, st, dtype=torch.int64)
            t = torch.index_select(t, a, idx)
    return [t]


def _norm_index(idx, dim):
    idx = idx.long()
    return torch.where(idx < 0, idx + dim, idx)


@_op("Gather")
def _gather(c, x):
    t, idx = x
    a = _axis(c.attr("axis", 0), t.dim())
    flat = _norm_index(idx, t.shape[a]).reshape(-1)
    out = torch.index_select(t, a, flat)
    return [out.reshape(t.shape[:a] + idx.shape + t.shape[a + 1:])]


@_op("GatherElements")
def _gather_elements(c, x):
    t, idx = x
    a = _axis(c.attr("axis", 0), t.dim())
    return [torch.gather(t, a, _norm_index(idx, t.shape[a]))]


@_op("GatherND")
def _gather_nd(c, x):
    t, idx = x
    if c.attr("batch_dims", 0):
        raise BayesQError(f"unsupported GatherND with batch_dims (node {c.node.name})")
    k = idx.shape[-1]
    cols = tuple(_norm_index(idx[..., i], t.shape[i]) for i in range(k))
    return [t[cols]]


@_op("ScatterND")
def _scatter_nd(c, x):
    data, idx, upd = x
    if c.attr("reduction", "none") != "none":
        raise BayesQError(f"unsupported ScatterND reduction {c.attr('reduction')!r} (node {c.node.name})")
    k = idx.shape[-1]
    cols = tuple(_norm_index(idx[..., i], data.shape[i]) for i in range(k))
    return [torch.index_put(data, cols, upd)]


@_op("ScatterElements")
def _scatter_elements(c, x):
    data, idx, upd = x
    if c.attr("reduction", "none") != "none":
        raise BayesQError(f"unsupported ScatterElements reduction {c.attr('reduction')!r} (node {c.node.name})")
    a = _axis(c.attr("axis", 0), data.dim())
    return [torch.scatter(data, a, _norm_index(idx, data.shape[a]), upd)]


@_op("Range")
def _range(c, x):
    start, limit, delta = (_scalar(t) for t in x)
    n = max(int(math.ceil((limit - start) / delta)), 0)   # the spec's element count
    return [(start + delta * torch.arange(n, dtype=torch.float64)).to(x[0].dtype) if x[0].is_floating_point()
            else start + delta * torch.arange(n, dtype=x[0].dtype)]


@_op("Trilu")
def _trilu(c, x):
    k = int(_scalar(x[1])) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if c.attr("upper", 1) else torch.tril(x[0], k)]


@_op("CumSum")
def _cumsum(c, x):
    t, a = x[0], _axis(int(_scalar(x[1])), x[0].dim())
    if c.attr("reverse", 0):
        t = t.flip(a)
    out = torch.cumsum(t, a)
    if c.attr("exclusive", 0):
        out = out - t
    return [out.flip(a) if c.attr("reverse", 0) else out]


@_op("Einsum")
def _einsum(c, x):
    return [torch.einsum(c.attr("equation"), *x)]


@_op("Dropout")
def _dropout(c, x):
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)][:max(c.n_outputs, 1)]


@_op("Gemm")
def _gemm(c, x):
    a, b = x[0], x[1]
    if c.attr("transA", 0):
        a = a.t()
    if c.attr("transB", 0):
        b = b.t()
    y = c.attr("alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + c.attr("beta", 1.0) * x[2]
    return [y]


@_op("Softmax", "LogSoftmax")
def _softmax(c, x):
    t = x[0]
    f = torch.softmax if c.node.op == "Softmax" else torch.log_softmax
    if c.opset >= 13:
        return [f(t, dim=c.attr("axis", -1))]
    a = _axis(c.attr("axis", 1), t.dim())   # before opset 13: coerced to 2-D at axis
    return [f(t.reshape(math.prod(t.shape[:a]), -1), dim=1).reshape(t.shape)]


_REDUCE = {"ReduceMean": lambda t, d, k: t.mean(d, keepdim=k), "ReduceSum": lambda t, d, k: t.sum(d, keepdim=k),
           "ReduceMax": lambda t, d, k: t.amax(d, keepdim=k), "ReduceMin": lambda t, d, k: t.amin(d, keepdim=k),
           "ReduceProd": None, "ReduceL2": lambda t, d, k: t.square().sum(d, keepdim=k).sqrt(),
           "ReduceSumSquare": lambda t, d, k: t.square().sum(d, keepdim=k),
           "ReduceLogSumExp": lambda t, d, k: torch.logsumexp(t, d, keepdim=k)}
_AXES_INPUT_SINCE = {"ReduceSum": 13}  # the others took axes as an attribute until opset 18


@_op(*_REDUCE)
def _reduce(c, x):
    t = x[0]
    axes = _axes_arg(c, x, 1, _AXES_INPUT_SINCE.get(c.node.op, 18))
    keep = bool(c.attr("keepdims", 1))
    if not axes:
        if c.attr("noop_with_empty_axes", 0):
            return [t]
        axes = list(range(t.dim()))
    axes = sorted(_axis(a, t.dim()) for a in axes)
    if c.node.op == "ReduceProd":
        out = t
        for a in reversed(axes):
            out = out.prod(a, keepdim=keep)
        return [out]
    return [_REDUCE[c.node.op](t, axes, keep)]


@_op("ArgMax", "ArgMin")
def _argmax(c, x):
    t, a = x[0], _axis(c.attr("axis", 0), x[0].dim())
    keep = bool(c.attr("keepdims", 1))
    if c.attr("select_last_index", 0):
        t, flip = t.flip(a), True
    else:
        flip = False
    i = torch.argmax(t, a, keepdim=keep) if c.node.op == "ArgMax" else torch.argmin(t, a, keepdim=keep)
    return [x[0].shape[a] - 1 - i if flip else i]


@_op("TopK")
def _topk(c, x):
    v, i = torch.topk(x[0], int(_scalar(x[1])), dim=c.attr("axis", -1), largest=bool(c.attr("largest", 1)),
                      sorted=bool(c.attr("sorted", 1)))
    return [v, i]


@_op("NonZero")
def _nonzero(c, x):
    return [torch.nonzero(x[0]).t().contiguous()]


@_op("LayerNormalization")
def _layer_norm(c, x):
    if c.n_outputs > 1:
        raise BayesQError(f"unsupported LayerNormalization with Mean/InvStdDev outputs (node {c.node.name})")
    t, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    a = _axis(c.attr("axis", -1), t.dim())
    dims = list(range(a, t.dim()))
    mean = t.mean(dims, keepdim=True)
    var = (t - mean).square().mean(dims, keepdim=True)
    y = (t - mean) * torch.rsqrt(var + c.attr("epsilon", 1e-5)) * scale
    return [y + bias if bias is not None else y]


@_op("BatchNormalization")
def _batch_norm(c, x):
    if c.attr("training_mode", 0) or c.n_outputs > 1:
        raise BayesQError(f"unsupported BatchNormalization in training mode (node {c.node.name})")
    t, scale, bias, mean, var = x
    shape = (1, -1) + (1,) * (t.dim() - 2)
    inv = torch.rsqrt(var.reshape(shape) + c.attr("epsilon", 1e-5))
    return [(t - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)]


@_op("InstanceNormalization")
def _instance_norm(c, x):
    t, scale, bias = x
    dims = list(range(2, t.dim()))
    mean = t.mean(dims, keepdim=True)
    var = (t - mean).square().mean(dims, keepdim=True)
    shape = (1, -1) + (1,) * (t.dim() - 2)
    return [(t - mean) * torch.rsqrt(var + c.attr("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)]


def _spatial_pads(c, x, kernel, strides, dilations):
    """Begin/end padding per spatial axis, from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    auto = c.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        return pads_b, pads_e
    pads = c.attr("pads") or [0] * (2 * n)
    if auto == "VALID":
        pads = [0] * (2 * n)
    return list(pads[:n]), list(pads[n:])


def _torch_pad(begin, end):
    """ONNX begin/end per spatial axis -> F.pad's order (last axis first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


@_op("Conv")
def _conv(c, x):
    t, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    strides = c.attr("strides") or [1] * n
    dil = c.attr("dilations") or [1] * n
    begin, end = _spatial_pads(c, t, list(w.shape[2:]), strides, dil)
    if begin != end:
        t, padding = F.pad(t, _torch_pad(begin, end)), 0
    else:
        padding = begin
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(n)
    if conv is None:
        raise BayesQError(f"unsupported Conv with {n} spatial axes (node {c.node.name})")
    return [conv(t, w, b, stride=strides, padding=padding, dilation=dil, groups=c.attr("group", 1))]


@_op("MaxPool", "AveragePool")
def _pool(c, x):
    t = x[0]
    if c.n_outputs > 1:
        raise BayesQError(f"unsupported {c.node.op} with an indices output (node {c.node.name})")
    kernel = c.attr("kernel_shape")
    n = len(kernel)
    strides = c.attr("strides") or [1] * n
    dil = c.attr("dilations") or [1] * n
    ceil = bool(c.attr("ceil_mode", 0))
    begin, end = _spatial_pads(c, t, kernel, strides, dil)
    if n not in (1, 2, 3):
        raise BayesQError(f"unsupported {c.node.op} with {n} spatial axes (node {c.node.name})")
    if c.node.op == "MaxPool":
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        if begin != end:
            t, padding = F.pad(t, _torch_pad(begin, end), value=-math.inf), 0
        else:
            padding = begin
        return [pool(t, kernel, strides, padding, dil, ceil_mode=ceil)]
    if any(d != 1 for d in dil):
        raise BayesQError(f"unsupported AveragePool with dilations (node {c.node.name})")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    include = bool(c.attr("count_include_pad", 0))
    if begin == end:
        return [pool(t, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)]
    # asymmetric padding: average of the zero-padded input, divided by the share of real cells
    tp = F.pad(t, _torch_pad(begin, end))
    s = pool(tp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include:
        return [s]
    ones = F.pad(torch.ones_like(t[:1, :1]), _torch_pad(begin, end))
    return [s / pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)]


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(c, x):
    t = x[0]
    dims = list(range(2, t.dim()))
    return [t.mean(dims, keepdim=True) if c.node.op == "GlobalAveragePool" else t.amax(dims, keepdim=True)]


@_op("Pad")
def _pad(c, x):
    t = x[0]
    if c.opset < 11:
        pads, value = c.attr("pads"), c.attr("value", 0.0)
        axes = None
    else:
        pads = _ints(x[1])
        value = _scalar(x[2]) if len(x) > 2 and x[2] is not None else 0
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
    axes = [_axis(a, t.dim()) for a in axes] if axes is not None else list(range(t.dim()))
    k = len(axes)
    begin, end = [0] * t.dim(), [0] * t.dim()
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[k + i]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(c.attr("mode", "constant"))
    if mode is None:
        raise BayesQError(f"unsupported Pad mode {c.attr('mode')!r} (node {c.node.name})")
    spec = _torch_pad(begin, end)
    while len(spec) > 2 and spec[-2:] == [0, 0]:   # leading axes left alone (reflect/edge pad few axes)
        spec = spec[:-2]
    return [F.pad(t, spec, mode=mode, value=value) if mode == "constant" else F.pad(t, spec, mode=mode)]


# ----------------------------------------------------------------------------- executor


class OnnxTorch:
    """Runs a ``PlainGraph`` with torch ops.  ``params`` holds the float initializers of rank >= 1
    (the weights curvature is computed for); other initializers are constants."""

    def __init__(self, graph: PlainGraph):
        missing = sorted({n.op for n in graph.nodes} - set(_OPS))
        if missing:
            where = next(n.name for n in graph.nodes if n.op == missing[0])
            more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
            raise BayesQError(f"unsupported op {missing[0]} (node {where}) for gradient curvature{more}")
        self.graph = graph
        self.params: dict[str, torch.Tensor] = {}
        self.constants: dict[str, torch.Tensor] = {}
        for name, arr in graph.initializers.items():
            t = torch.from_numpy(np.array(arr))   # a copy: torch must own writable memory
            if t.is_floating_point() and t.dim() >= 1:
                self.params[name] = t
            else:
                self.constants[name] = t
        self._last_use = {}
        for i, node in enumerate(graph.nodes):
            for name in node.inputs:
                if name:
                    self._last_use[name] = i

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.graph.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.graph.outputs

    def run(self, feeds: dict[str, np.ndarray | torch.Tensor], params: dict[str, torch.Tensor] | None = None,
            outputs: tuple[str, ...] | list[str] | None = None, keep=()) -> dict[str, torch.Tensor]:
        """Values of ``outputs`` (default: the graph outputs) and of the tensors named in ``keep``.
        ``params`` replaces some or all weights (e.g. leaves that require grad)."""
        outputs = tuple(outputs or self.graph.outputs)
        wanted = set(outputs) | set(keep)
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update(self.params)
        if params:
            env.update(params)
        for name in self.graph.inputs:
            if name not in feeds:
                raise BayesQError(f"no value fed for model input {name!r}")
            v = feeds[name]
            env[name] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        for i, node in enumerate(self.graph.nodes):
            try:
                args = [env[n] if n else None for n in node.inputs]
            except KeyError as e:
                raise BayesQError(f"node {node.name} ({node.op}) reads {e.args[0]!r}, which nothing computed") from None
            while args and args[-1] is None:
                args.pop()
            try:
                res = _OPS[node.op](_Ctx(node, self.graph.opset), args)
            except BayesQError:
                raise
            except Exception as e:  # shape mismatches and the like: say where
                raise BayesQError(f"node {node.name} ({node.op}) failed in torch: {first_line(e)}") from None
            for name, val in zip(node.outputs, res):
                if name:
                    env[name] = val
            for name in node.inputs:  # free what no later node reads (autograd keeps what it needs)
                if name and self._last_use.get(name) == i and name not in wanted and name in env \
                        and name not in self.params and name not in self.constants:
                    del env[name]
        missing = [o for o in wanted if o not in env]
        if missing:
            raise BayesQError(f"tensor {missing[0]!r} is not computed by the model")
        return {o: env[o] for o in list(outputs) + [k for k in keep if k not in outputs]}
