"""Weights drawn from the kept posterior inside the graph (docs/design.md, "Keeping the posterior"):
layout only, no maths.

Every posterior weight is a tensor ``X`` that some nodes read (an initializer, or the output of the
nodes that dequantize its mean).  ``add_sampling`` renames its producer's output to ``X__bq_mean``
and computes ``X`` again from it:

- ``vpq``: ``X = mean + sigma * RandomNormalLike(mean, seed)``; ``sigma = Exp(dequantized log-sigma
  codes + offset)`` (the bayesq ``DequantizeAffine`` op, or the portable unpacking in standard ops),
  or a float32 initializer for float32 means.  Each ``Run`` of a session draws a new weight set;
  a new session with the same seeds draws the same sequence.
- ``jq``: the same draw, then rounded to ``bits`` per view row on its min/max grid (integer zero
  point, as the affine formats), as a low-precision memory holding the sampled weight would.
- ``spq``: ``X`` is one of ``S`` stored weight sets, each in the bayesq affine format (or float32),
  picked by the graph input ``bq_sample`` (int64 scalar): a Gather of each packed tensor.  The mean's
  nodes and tensors are then dead and removed.

A weight's *layout* says how the numerics' view ``(rows, L)`` maps to ``X``: ``X`` of ``shape``
with ``view = moveaxis(X, axis, -1).reshape(-1, shape[axis])``, or, ``flat``, ``view =
X.reshape(rows, L)``.  A ``(1, L)`` sigma (one per input index) is stored in ``X``'s layout with
size 1 on every other axis and broadcasts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..formats import BayesqUniform
from ..graph.cone import all_nodes
from .bayesq_nodes import BAYESQ_DOMAIN, BAYESQ_OPSET, bayesq_dequantize_node
from .nodes import to_native
from .portable import portable_weight_nodes

MODES = ("vpq", "jq", "spq")
SAMPLE_INPUT = "bq_sample"
_ROLES = ("B", "scales", "zero_points")     # BayesqUniform's packed tensors (formats/bayesq_uniform.py)


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    axis: int
    flat: bool = False

    def native(self, view: np.ndarray) -> np.ndarray:
        """A ``(r, L)`` view (r = rows, or 1 to broadcast) in this layout."""
        r = view.shape[0]
        if self.flat:
            return view.reshape((r if r > 1 else 1, *self.shape[1:]))
        if r == 1:
            shape = [1] * len(self.shape)
            shape[self.axis] = self.shape[self.axis]
            return to_native(view, tuple(shape), self.axis)
        return to_native(view, self.shape, self.axis)

    def dequant_target(self, r: int) -> tuple[tuple[int, ...], int, tuple[int, ...] | None]:
        """``(shape, axis, reshape_to)`` for an op that writes a ``(r, L)`` view in this layout: the
        shape and axis it writes, and the native shape a Reshape then gives (flat layouts)."""
        if self.flat:
            return (r, int(np.prod(self.shape[1:]))), 1, (r if r > 1 else 1, *self.shape[1:])
        shape = list(self.shape)
        if r == 1:
            shape = [1] * len(self.shape)
            shape[self.axis] = self.shape[self.axis]
        return tuple(shape), self.axis, None

    @property
    def reduce_axes(self) -> list[int]:
        """Axes of one view row."""
        return list(range(1, len(self.shape))) if self.flat else [self.axis]


@dataclass(frozen=True)
class SigmaStore:
    """One weight's standard deviations as stored: log-sigma codes packed by ``fmt`` plus ``offset``,
    or (``fmt`` None) float32 ``values``; both as a ``(r, L)`` view."""

    rows: int
    fmt: BayesqUniform | None = None
    packed: dict | None = None
    offset: float = 0.0
    values: np.ndarray | None = None


@dataclass(frozen=True)
class SampleSets:
    """SPQ: one weight's stored sample sets, each packed by ``fmt`` (``packed``: one dict per set), or
    float32 ``values`` ``(S, rows, L)``."""

    fmt: BayesqUniform | None = None
    packed: tuple = ()
    values: np.ndarray | None = None


@dataclass(frozen=True)
class PosteriorWeight:
    tensor: str                 # the tensor the model's nodes read
    layout: Layout
    prefix: str                 # names of the new nodes and initializers start with it
    sigma: SigmaStore | None = None
    sets: SampleSets | None = None
    bits: int = 0               # jq: the code bits its draws are rounded to (0: not rounded)


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def add_sampling(model: onnx.ModelProto, weights: list[PosteriorWeight], mode: str, seed: int = 0,
                 portable: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose posterior weights are drawn (vpq, jq) or picked (spq); see above."""
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose from {', '.join(MODES)}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    head, new_inits = [], []
    after: dict[int, list] = {}    # nodes that read a mean go right after the node making it
    for i, w in enumerate(weights):
        mean = f"{w.tensor}__bq_mean"
        if w.tensor in inits:
            inits[w.tensor].name = mean
            place = head
        else:
            n = producers[w.tensor]
            n.output[list(n.output).index(w.tensor)] = mean
            place = head if mode == "spq" else after.setdefault(id(n), [])
        if mode == "spq":
            ns, ts = _sets_nodes(w, portable)
        else:
            sig, ns, ts = _sigma_nodes(w, portable)
            raw = f"{w.prefix}_draw" if mode == "jq" and w.bits else w.tensor
            ns += [helper.make_node("RandomNormalLike", [mean], [f"{w.prefix}_eps"], name=f"{w.prefix}_eps",
                                    dtype=TensorProto.FLOAT, seed=float(node_seed(seed, i))),
                   helper.make_node("Mul", [f"{w.prefix}_eps", sig], [f"{w.prefix}_noise"], name=f"{w.prefix}_noise"),
                   helper.make_node("Add", [mean, f"{w.prefix}_noise"], [raw], name=f"{w.prefix}_draw")]
            if raw != w.tensor:
                rn, rt = _round_nodes(raw, w.tensor, w.prefix, w.bits, w.layout.reduce_axes, opset(m))
                ns += rn
                ts += rt
        place += ns
        new_inits += ts
    body = [x for n in g.node for x in [n, *after.get(id(n), [])]]
    del g.node[:]
    g.node.extend(head + body)
    # the portable unpacking's position tables are shared by every tensor of one geometry: add once
    have = {t.name for t in g.initializer}
    for t in new_inits:
        if t.name not in have:
            have.add(t.name)
            g.initializer.append(t)
    if mode == "spq":
        g.input.append(helper.make_tensor_value_info(SAMPLE_INPUT, TensorProto.INT64, []))
    if any(n.domain == BAYESQ_DOMAIN for n in g.node) and not any(o.domain == BAYESQ_DOMAIN for o in m.opset_import):
        m.opset_import.append(BAYESQ_OPSET)
    remove_dead(m)
    onnx.checker.check_model(m)
    return m


def node_seed(seed: int, i: int) -> int:
    """The seed of weight ``i``'s RandomNormalLike: distinct per weight, exact in float32."""
    return (int(seed) * 1009 + i) % (1 << 24)


def set_seed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy of a vpq / jq model drawing from ``seed`` instead (its RandomNormalLike seeds in order)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    i = 0
    for n in m.graph.node:
        if n.op_type == "RandomNormalLike":
            for a in n.attribute:
                if a.name == "seed":
                    a.f = float(node_seed(seed, i))
            i += 1
    return m


def _dequant(w: PosteriorWeight, out: str, pre: str, fmt: BayesqUniform, packed: dict, r: int, portable: bool):
    """Nodes writing the ``(r, L)`` view packed by ``fmt`` to ``out`` in ``w``'s layout."""
    shape, axis, reshape_to = w.layout.dequant_target(r)
    target = f"{out}__bq_view" if reshape_to else out
    if portable:
        ns, ts = portable_weight_nodes(target, pre, fmt, packed, shape, axis)
    else:
        node, ts = bayesq_dequantize_node(target, pre, fmt, packed, shape, axis)
        ns = [node]
    if reshape_to:
        t = numpy_helper.from_array(np.array(reshape_to, np.int64), f"{pre}_native_shape")
        ns.append(helper.make_node("Reshape", [target, t.name], [out], name=f"{pre}_reshape"))
        ts = [*ts, t]
    return ns, list(ts)


def _sigma_nodes(w: PosteriorWeight, portable: bool):
    s, pre = w.sigma, f"{w.prefix}_sigma"
    if s.fmt is None:
        t = numpy_helper.from_array(np.ascontiguousarray(w.layout.native(s.values), np.float32), pre)
        return pre, [], [t]
    ns, ts = _dequant(w, f"{pre}_log", pre, s.fmt, s.packed, s.rows, portable)
    off = numpy_helper.from_array(np.array(s.offset, np.float32), f"{pre}_offset")
    ns += [helper.make_node("Add", [f"{pre}_log", off.name], [f"{pre}_logc"], name=f"{pre}_add"),
           helper.make_node("Exp", [f"{pre}_logc"], [pre], name=f"{pre}_exp")]
    return pre, ns, ts + [off]


def _sets_nodes(w: PosteriorWeight, portable: bool):
    sets, pre = w.sets, f"{w.prefix}_set"
    if sets.fmt is None:
        stacked = np.stack([w.layout.native(v) for v in sets.values]).astype(np.float32)
        t = numpy_helper.from_array(stacked, f"{pre}_all")
        return [helper.make_node("Gather", [t.name, SAMPLE_INPUT], [w.tensor], axis=0, name=pre)], [t]
    rows = sets.packed[0]["B"].shape[0]
    ns, ts = _dequant(w, w.tensor, pre, sets.fmt, sets.packed[0], rows, portable)
    # the packed tensors of set 0 become Gathers from all sets' tensors stacked on a new axis 0
    kept = []
    for t in ts:
        role = t.name[len(pre) + 1:] if t.name.startswith(pre + "_") else None
        if role in _ROLES:
            stacked = np.stack([np.asarray(p[role]).reshape(numpy_helper.to_array(t).shape) for p in sets.packed])
            kept.append(numpy_helper.from_array(np.ascontiguousarray(stacked), f"{t.name}_all"))
            ns.insert(0, helper.make_node("Gather", [f"{t.name}_all", SAMPLE_INPUT], [t.name], axis=0,
                                          name=f"{t.name}_pick"))
        else:
            kept.append(t)
    return ns, kept


def _round_nodes(x: str, out: str, pre: str, bits: int, axes: list[int], version: int):
    """``out``: ``x`` rounded per row (``axes`` reduced) to ``bits`` on its min/max range widened to 0,
    integer zero point: ``(clip(round(x / s) + zp, 0, qmax) - zp) * s``."""
    qmax = float((1 << bits) - 1)
    c = {k: numpy_helper.from_array(np.array(v, np.float32), f"{pre}_q_{k}")
         for k, v in (("zero", 0.0), ("qmax", qmax), ("tiny", 1e-30))}
    ts = list(c.values())

    def reduce(op, name):
        if version >= 18:
            a = numpy_helper.from_array(np.array(axes, np.int64), f"{pre}_q_axes")
            if a.name not in {t.name for t in ts}:
                ts.append(a)
            return helper.make_node(op, [x, a.name], [name], keepdims=1, name=name)
        return helper.make_node(op, [x], [name], axes=axes, keepdims=1, name=name)

    p = f"{pre}_q"
    ns = [reduce("ReduceMin", f"{p}_min"), reduce("ReduceMax", f"{p}_max"),
          helper.make_node("Min", [f"{p}_min", c["zero"].name], [f"{p}_lo"]),
          helper.make_node("Max", [f"{p}_max", c["zero"].name], [f"{p}_hi"]),
          helper.make_node("Sub", [f"{p}_hi", f"{p}_lo"], [f"{p}_span"]),
          helper.make_node("Div", [f"{p}_span", c["qmax"].name], [f"{p}_s0"]),
          helper.make_node("Max", [f"{p}_s0", c["tiny"].name], [f"{p}_s"]),
          helper.make_node("Div", [f"{p}_lo", f"{p}_s"], [f"{p}_los"]),
          helper.make_node("Neg", [f"{p}_los"], [f"{p}_nlos"]),
          helper.make_node("Round", [f"{p}_nlos"], [f"{p}_zp"]),
          helper.make_node("Div", [x, f"{p}_s"], [f"{p}_xs"]),
          helper.make_node("Round", [f"{p}_xs"], [f"{p}_xr"]),
          helper.make_node("Add", [f"{p}_xr", f"{p}_zp"], [f"{p}_qz"]),
          helper.make_node("Clip", [f"{p}_qz", c["zero"].name, c["qmax"].name], [f"{p}_code"]),
          helper.make_node("Sub", [f"{p}_code", f"{p}_zp"], [f"{p}_c"]),
          helper.make_node("Mul", [f"{p}_c", f"{p}_s"], [out])]
    for i, n in enumerate(ns):
        n.name = n.name or f"{p}_{i}"
    return ns, ts


def remove_dead(m: onnx.ModelProto) -> None:
    """Drop main-graph nodes whose outputs nothing reads, then initializers nothing reads."""
    g = m.graph
    outputs = {o.name for o in g.output}
    while True:
        read = {i for n in all_nodes(g) for i in n.input} | outputs
        keep = [n for n in g.node if any(o in read for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    read = {i for n in all_nodes(g) for i in n.input} | outputs
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)


def unfuse_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy whose bayesq ``MatMulAffine`` / ``MatMulLut`` nodes on constant weights (initializers, or
    computed from them: a scaled codebook's table) read their weight ``W (K, N)`` from the format's
    Dequantize op (one per packed weight, shared by its readers) and run a plain ``MatMul`` (+ ``Add``
    for a bias); and ``{packed codes initializer: W}``."""
    from ..runtime.session import _constants, _fp32_matmul, _may_have_float16, _n_weight_inputs
    casts = _may_have_float16(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts = _constants(g)
    made: dict[str, str] = {}
    body = []
    for n in g.node:
        if n.domain != BAYESQ_DOMAIN or n.op_type not in ("MatMulAffine", "MatMulLut"):
            body.append(n)
            continue
        packed = [i for i in n.input[1:_n_weight_inputs(n) + 1] if i]
        if not all(i in consts for i in packed):
            body.append(n)
            continue
        w = made.get(packed[0])
        if w is None:
            w = made[packed[0]] = f"{packed[0]}__bq_W"
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            # shape and axis spelled out (the op's defaults), so that inspect reads the weight back
            body.append(helper.make_node(n.op_type.replace("MatMul", "Dequantize"), list(n.input[1:_n_weight_inputs(n) + 1]),
                                         [w], name=f"{w}_dq", domain=BAYESQ_DOMAIN, **attrs,
                                         shape=[attrs["K"], attrs["N"]], axis=0))
        body += _fp32_matmul(n, w, casts)
    del g.node[:]
    g.node.extend(body)
    return m, made
