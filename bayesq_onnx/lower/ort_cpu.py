"""Lowering passes for onnxruntime on CPU: every quantized site's initializer is replaced by its
packed tensors and the consumer is rewritten to the op that executes them:
MatMul/Gemm -> com.microsoft.MatMulNBits or bayesq.MatMulAffine/MatMulLut, Conv weight ->
DequantizeLinear (blocked) or bayesq.DequantizeAffine/DequantizeLut, Gather ->
com.microsoft.GatherBlockQuantized or bayesq.GatherAffine/GatherLut (a tied table: one set of packed
tensors read by the Gather and the head's MatMul op alike).  Sites left in fp32 are untouched.

``lower_ort_cpu`` uses the bayesq custom-op library; ``lower_portable`` (``--target portable``)
rebuilds bayesq-format weights with standard ONNX ops instead (bitwise unpack + Gather), for
runtimes without the library: the file stays small, but onnxruntime folds those constant
subgraphs into fp32 weights at session start, so memory and speed are fp32's (an embedding lookup
unpacks only the rows it gathers, at run time, and stays packed in memory).

requires: the model the sites were found in; ensures: no fp32 copy of a quantized weight remains,
opset raised only as far as the formats used need.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from ..errors import BayesQError, first_line
from ..formats import BayesqLut, BayesqScaledLut, BayesqSparse, BayesqUniform, BlockedDequantize, Float32, Format, GatherBlockQuantized, MatMulNBits
from ..graph.cone import all_nodes, subgraphs
from ..types import WeightSite
from .bayesq_nodes import (BAYESQ_DOMAIN, BAYESQ_OPSET, bayesq_dequantize_node, bayesq_gather_node, bayesq_matmul_node,
                           scaled_lut_nodes)
from .nodes import MS_DOMAIN, dequantize_node, gather_block_quantized_node, matmulnbits_node, tied_head_nodes
from .portable import portable_gather_nodes, portable_weight_nodes

BAYESQ_FORMATS = (BayesqUniform, BayesqLut, BayesqSparse)
ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "bfloat16": onnx.TensorProto.BFLOAT16}


def _typed(out: str, produced: str, want: str) -> tuple[str, list[onnx.NodeProto]]:
    """Where an op that yields ``produced`` (its output's float type) should write so that ``out``
    has type ``want``: ``out`` itself, or a temporary and a Cast to ``want`` (the bayesq Dequantize
    ops yield float32; onnxruntime's CPU ops have no bfloat16 kernels)."""
    if produced == want:
        return out, []
    tmp = f"{out}__bq_{produced}"
    return tmp, [helper.make_node("Cast", [tmp], [out], to=ONNX_TYPES[want], name=f"{tmp}_cast")]


def _prefix(name: str) -> str:
    return "bq_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _flat(s: WeightSite, out: str, pre: str) -> tuple[str, tuple[int, ...], int, list, list]:
    """Where and how a dequantizing op writes weight ``out`` of site ``s``: ``(name, shape, axis,
    nodes, initializers)``.  Its view's ``L`` is one native axis (``perm[-1]``), so the op writes the
    native layout itself; or, for a flat view (depthwise Conv: ``L`` spans every axis but the
    first), the op writes the ``(rows, L)`` view and a Reshape (folded at load) makes it native."""
    if not s.flat:
        return out, s.shape, s.perm[-1], [], []
    shape = numpy_helper.from_array(np.array(s.shape, np.int64), f"{pre}_shape")
    flat = f"{out}__bq_view"
    return flat, (s.rows, s.L), 1, [helper.make_node("Reshape", [flat, shape.name], [out], name=f"{pre}_reshape")], [shape]


def lower_ort_cpu(model: onnx.ModelProto, sites: list[WeightSite], choice: dict[str, Format],
                  packed: dict[str, dict[str, np.ndarray]], accuracy_level: int = 0) -> onnx.ModelProto:
    return _lower(model, sites, choice, packed, accuracy_level, portable=False)


def lower_portable(model: onnx.ModelProto, sites: list[WeightSite], choice: dict[str, Format],
                   packed: dict[str, dict[str, np.ndarray]], accuracy_level: int = 0) -> onnx.ModelProto:
    return _lower(model, sites, choice, packed, accuracy_level, portable=True)


def _lower(model, sites, choice, packed, accuracy_level: int, portable: bool) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    formats = [choice[s.name] for s in sites]
    _raise_opset(m, formats)  # before rewriting: the converter must only see ops of the old opset
    g = m.graph
    nodes = {n.name: n for n in all_nodes(g)}   # a consumer may sit in a subgraph (If, Loop, Scan)
    inits = {t.name: t for t in g.initializer}
    replace: dict[str, list[onnx.NodeProto]] = {}   # consumer name -> nodes taking its place
    head: list[onnx.NodeProto] = []                  # DequantizeLinear nodes (inputs are all constants)
    new_inits: list[onnx.TensorProto] = []
    shared_tables: set[str] = set()                  # portable position tables, one per (K, bits)
    drop_inits: set[str] = set()
    for s in sites:
        fmt = choice[s.name]
        if isinstance(fmt, Float32):
            continue
        drop_inits.add(s.name)
        pre, p = _prefix(s.name), packed[s.name]
        if isinstance(fmt, BayesqScaledLut):
            # its per-group codebooks are computed from its scales and levels (folded when the model
            # loads), then read as the LUT format's are
            ns, ts = scaled_lut_nodes(pre, p, flat=portable)
            head += ns
            have = {t.name for t in new_inits}
            new_inits += [t for t in ts if t.name not in have]   # FLAT_SHAPE once
            fmt, p = fmt.lut, {"B": p["B"]}
        if isinstance(fmt, BAYESQ_FORMATS) and portable and s.kind.only_looked_up:
            # each lookup gathers the packed rows it needs and unpacks those (the table stays packed)
            for cname in s.consumers:
                c = nodes[cname]
                y, cast = _typed(c.output[0], "float32", s.dtype)
                ns, ts = portable_gather_nodes(c.input[1], y, pre, fmt, p, V=s.rows, D=s.L, tmp=_prefix(cname))
                replace[cname] = ns + cast
                have = {t.name for t in new_inits}
                new_inits += [t for t in ts if t.name not in have]
                shared_tables.update(t.name for t in ts if t.name.startswith("bq_pos_"))
        elif isinstance(fmt, BAYESQ_FORMATS) and (portable or s.kind.convolved):
            # (a tied table in portable form: dequantized whole, for its Gather and the head alike)
            # the weight keeps its name (and type), now computed from the packed tensors in native layout
            w2, shape, ax, reshape, rs = _flat(s, s.name, pre)
            w, cast = _typed(w2, "float32", s.dtype)
            if portable:
                ns, ts = portable_weight_nodes(w, pre, fmt, p, shape, ax)
                head += ns
                new_inits += [t for t in ts if t.name not in shared_tables]
                shared_tables.update(t.name for t in ts if t.name.startswith("bq_pos_"))  # portable.py's naming
            else:
                node, ts = bayesq_dequantize_node(w, pre, fmt, p, shape, ax)
                head.append(node)
                new_inits += ts
            head += cast + reshape
            new_inits += rs
        elif isinstance(fmt, (MatMulNBits, *BAYESQ_FORMATS)):
            if isinstance(fmt, MatMulNBits) and fmt.scale_dtype != s.dtype:
                raise BayesQError(f"{s.name}: MatMulNBits has no {s.dtype} kernel (its scales take the "
                                  f"activations' type)")
            # a bayesq table is one packed view for every reader: the Gather of an embedding and, when
            # tied, the output head's MatMul (x @ table^T: the view of W = table^T is the table)
            shared = None
            for cname in s.consumers:
                c = nodes[cname]
                if c.op_type == "Transpose":
                    replace[cname] = []
                    continue
                if c.op_type == "Gather":
                    y, cast = _typed(c.output[0], "float32", s.dtype)    # the op yields float32
                    node, ts = bayesq_gather_node(c.input[1], y, pre, fmt, p, V=s.rows, D=s.L)
                    if shared is None:
                        shared = ts
                        new_inits += ts
                    node.name = cname
                    replace[cname] = [node, *cast]
                    continue
                bias = c.input[2] if c.op_type == "Gemm" and len(c.input) > 2 and c.input[2] else None
                fused_bias = bias if bias in inits and tuple(inits[bias].dims) == (s.rows,) else None
                out = c.output[0] if bias is None or fused_bias else c.output[0] + "_nobias"
                if isinstance(fmt, MatMulNBits):
                    node, ts = matmulnbits_node(c.input[0], out, pre, fmt, p, K=s.L, N=s.rows,
                                                accuracy_level=accuracy_level, bias=fused_bias)
                else:
                    node, ts = bayesq_matmul_node(c.input[0], out, pre, fmt, p, K=s.L, N=s.rows, bias=fused_bias)
                if shared is None:
                    shared = ts
                    new_inits += ts
                node.name = cname
                replace[cname] = [node] if bias is None or fused_bias else \
                    [node, helper.make_node("Add", [out, bias], [c.output[0]], name=cname + "_bias")]
        elif isinstance(fmt, BlockedDequantize):
            # the weight tensor keeps its name, now produced by DequantizeLinear in native layout (its
            # output type is the scales'; a Cast where that is not the weight's)
            w2, shape, ax, reshape, rs = _flat(s, s.name, pre)
            w, cast = _typed(w2, fmt.scale_dtype, s.dtype)
            node, ts = dequantize_node(w, pre, fmt, p, shape, axis=ax)
            head += [node, *cast, *reshape]
            new_inits += ts + rs
        elif isinstance(fmt, GatherBlockQuantized):  # an embedding, possibly tied to the output head
            for cname in s.consumers:
                c = nodes[cname]
                if c.op_type == "Gather":
                    y, cast = _typed(c.output[0], fmt.scale_dtype, s.dtype)   # output type = the scales'
                    node, table = gather_block_quantized_node(c.input[1], y, pre, fmt, p)
                    node.name = cname
                    replace[cname] = [node, *cast]
                elif c.op_type == "Transpose":
                    replace[cname] = []
                else:  # the head's MatMul, after the removed Transpose
                    replace[cname], ts = tied_head_nodes(c.input[0], c.output[0], cname, pre, fmt, s.rows, s.L,
                                                         accuracy_level)
                    new_inits += ts
            new_inits += table
        else:
            raise BayesQError(f"no ort-cpu lowering for format {fmt.name}")
    # a consumer inside a subgraph is rewritten there; its packed tensors stay main-graph
    # initializers, which the subgraph reads from the outer scope
    _replace_nodes(g, replace)
    body = list(g.node)
    del g.node[:]
    g.node.extend(head + body)
    kept = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if any(isinstance(f, (MatMulNBits, GatherBlockQuantized)) for f in formats) and \
            not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if any(n.domain == BAYESQ_DOMAIN for n in all_nodes(g)) and not any(o.domain == BAYESQ_DOMAIN for o in m.opset_import):
        m.opset_import.append(BAYESQ_OPSET)
    return m


def _replace_nodes(graph: onnx.GraphProto, replace: dict[str, list[onnx.NodeProto]]) -> None:
    """Each node named in ``replace`` by the nodes given there, in ``graph`` and its subgraphs."""
    body = []
    for n in graph.node:
        for sub in subgraphs(n):
            _replace_nodes(sub, replace)
        body.extend(replace.get(n.name, [n]))
    del graph.node[:]
    graph.node.extend(body)


def _raise_opset(m: onnx.ModelProto, formats: list[Format]) -> None:
    need = max([f.min_opset() for f in formats if isinstance(f, BlockedDequantize)], default=0)
    current = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    if need > current:
        try:
            converted = version_converter.convert_version(m, need)
        except Exception as e:
            raise BayesQError(f"cannot raise the model's opset from {current} to {need} (needed by blocked "
                              f"DequantizeLinear): {first_line(e)}") from None
        m.CopyFrom(converted)
    if need:
        m.ir_version = max(m.ir_version, max(f.min_ir_version() for f in formats if isinstance(f, BlockedDequantize)))
