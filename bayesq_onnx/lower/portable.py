"""``--target portable``: a packed ``bayesq`` weight unpacked with standard ONNX ops only, for runtimes
without the custom-op library (opset >= 13: Gather, Cast, BitShift, Add, Sub, Mul, Reshape, Transpose).

    nodes, inits = portable_weight_nodes("W", "bq_w", fmt, packed, native_shape=(K, N), axis=0)
    # then MatMul(x, "W") as for an fp32 weight
    nodes, inits = portable_gather_nodes("ids", "E", "bq_emb", fmt, packed, V, D)   # an embedding lookup

Per code: two byte Gathers along K, ``lo | hi << 8`` in uint32, a left then a right BitShift that
isolate its bits; the LUT is a Gather of ``code + (row * G + group) * 2**bits`` in the flat table;
affine weights are ``(float(q) - float(zp)) * scale``, zero points unpacked the same way.  float16
scales / LUT levels stay float16 in the file and are Cast to float after their Gather (exact).  The
result equals the numpy reference bit for bit.  The position tables are shared initializers per
``(K, bits)`` (``bq_pos_*``): identical for every weight of that geometry, so a pass that lowers
several weights adds each such name once.  onnxruntime constant-folds the whole subgraph at load
(all its inputs are initializers): the file keeps the packed size, memory holds the fp32 weight.
An embedding lookup gathers the packed rows of its indices first and unpacks only those: no
constant subgraph, so the table stays packed in memory as well.
"""
from __future__ import annotations

import re

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..formats import BayesqLut, BayesqSparse, BayesqUniform
from ..formats.bayesq_sparse import pattern_bits, patterns
from ..formats.bayesq_uniform import code_positions, group_index, groups, stream_positions


# the code position table of a weight's codes: names its K and bits (graph/inspect.py reads them back)
CODE_TABLE = re.compile(r"bq_pos_K(?P<K>\d+)_b(?P<bits>\d+)_lo")


def _t(a: np.ndarray, name: str) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def _unpack(src: str, n: int, bits: int, stream: bool, pre: str, out: str
            ) -> tuple[list[NodeProto], list[TensorProto]]:
    """uint32 ``out (rows, n)``: the codes of packed ``src (rows, bytes)``."""
    lo, hi, shift = (stream_positions if stream else code_positions)(n, bits)
    tag = f"bq_pos_{'zp' if stream else 'K'}{n}_b{bits}"   # shared by every tensor of that geometry; CODE_TABLE
    inits = [_t(lo.astype(np.int64), f"{tag}_lo"), _t(hi.astype(np.int64), f"{tag}_hi"),
             _t((32 - bits - shift).astype(np.uint32), f"{tag}_lsh"), _t(np.array(32 - bits, np.uint32), f"{tag}_rsh"),
             _t(np.array(8, np.uint32), "bq_pos_u32_8")]
    nodes = [
        helper.make_node("Gather", [src, f"{tag}_lo"], [f"{pre}_lo8"], axis=1),
        helper.make_node("Gather", [src, f"{tag}_hi"], [f"{pre}_hi8"], axis=1),
        helper.make_node("Cast", [f"{pre}_lo8"], [f"{pre}_lo"], to=TensorProto.UINT32),
        helper.make_node("Cast", [f"{pre}_hi8"], [f"{pre}_hi"], to=TensorProto.UINT32),
        helper.make_node("BitShift", [f"{pre}_hi", "bq_pos_u32_8"], [f"{pre}_hi_s"], direction="LEFT"),
        helper.make_node("Add", [f"{pre}_lo", f"{pre}_hi_s"], [f"{pre}_word"]),
        helper.make_node("BitShift", [f"{pre}_word", f"{tag}_lsh"], [f"{pre}_top"], direction="LEFT"),
        helper.make_node("BitShift", [f"{pre}_top", f"{tag}_rsh"], [out], direction="RIGHT"),
    ]
    return nodes, inits


def _view_nodes(prefix: str, fmt: BayesqUniform | BayesqLut, packed: dict[str, np.ndarray], K: int, N: int,
                rows: str | None = None, tmp: str | None = None) -> tuple[list[NodeProto], list[TensorProto], str]:
    """Nodes computing the float32 view ``(N, K)`` of the packed weight (``f"{tmp}_view"``), or only
    its rows named by the 1-D int tensor ``rows`` (an embedding lookup: the packed rows are gathered
    first, so only they are unpacked, at run time).  Initializers ``f"{prefix}_<role>"`` hold the
    packed data (plus the shared position tables); computed tensors are named ``f"{tmp}_..."`` (default
    ``prefix``: several lookups of one table each take their own)."""
    tmp = tmp or prefix
    if isinstance(fmt, BayesqSparse):
        return _sparse_view_nodes(prefix, fmt, packed, K, N, rows, tmp)
    bits, G = fmt.bits, groups(K, fmt.block)
    gidx = group_index(K, fmt.block)
    nodes: list[NodeProto] = []

    def src(name: str) -> str:   # a packed tensor, or its selected rows
        if rows is None:
            return name
        picked = f"{tmp}{name[len(prefix):]}_rows"
        nodes.append(helper.make_node("Gather", [name, rows], [picked], axis=0))
        return picked

    inits = [_t(packed["B"], f"{prefix}_B")]
    un, pos = _unpack(src(f"{prefix}_B"), K, bits, False, f"{tmp}_q", f"{tmp}_q")
    nodes += un
    inits += pos
    view = f"{tmp}_view"
    half = fmt.scale_dtype == "float16"
    if isinstance(fmt, BayesqLut):
        lut_out = f"{tmp}_view16" if half else view
        # (no "lut" in packed: the graph computes it, flat -- a scaled codebook, bayesq_nodes.scaled_lut_nodes)
        inits += [_t(np.asarray(packed["lut"], fmt.scale_dtype).reshape(-1), f"{prefix}_lut")] if "lut" in packed else []
        inits += [_t((np.arange(N, dtype=np.int64) * (G << bits)).reshape(N, 1), f"{prefix}_rowbase"),
                  _t((gidx << bits).reshape(1, K), f"{prefix}_groupbase")]
        rowbase = src(f"{prefix}_rowbase")
        nodes += [helper.make_node("Cast", [f"{tmp}_q"], [f"{tmp}_q64"], to=TensorProto.INT64),
                  helper.make_node("Add", [f"{tmp}_q64", rowbase], [f"{tmp}_i1"]),
                  helper.make_node("Add", [f"{tmp}_i1", f"{prefix}_groupbase"], [f"{tmp}_idx"]),
                  helper.make_node("Gather", [f"{prefix}_lut", f"{tmp}_idx"], [lut_out], axis=0)]
        if half:
            nodes.append(helper.make_node("Cast", [lut_out], [view], to=TensorProto.FLOAT))
    else:
        sk = f"{tmp}_sk16" if half else f"{tmp}_sk"
        inits += [_t(np.asarray(packed["scales"], fmt.scale_dtype).reshape(N, G), f"{prefix}_scales"),
                  _t(packed["zero_points"], f"{prefix}_zero_points"), _t(gidx, f"{prefix}_gidx")]
        scales, zps = src(f"{prefix}_scales"), src(f"{prefix}_zero_points")
        zn, zi = _unpack(zps, G, bits, True, f"{tmp}_z", f"{tmp}_zq")
        nodes += zn
        inits += zi
        nodes += [helper.make_node("Cast", [f"{tmp}_q"], [f"{tmp}_qf"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", [f"{tmp}_zq"], [f"{tmp}_zf"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", [f"{tmp}_zf", f"{prefix}_gidx"], [f"{tmp}_zk"], axis=1),
                  helper.make_node("Gather", [scales, f"{prefix}_gidx"], [sk], axis=1),
                  *([helper.make_node("Cast", [sk], [f"{tmp}_sk"], to=TensorProto.FLOAT)] if half else []),
                  helper.make_node("Sub", [f"{tmp}_qf", f"{tmp}_zk"], [f"{tmp}_centred"]),
                  helper.make_node("Mul", [f"{tmp}_centred", f"{tmp}_sk"], [view])]
    return nodes, inits, view


def _sparse_view_nodes(prefix: str, fmt: BayesqSparse, packed: dict[str, np.ndarray], K: int, N: int,
                       rows: str | None, tmp: str) -> tuple[list[NodeProto], list[TensorProto], str]:
    """:func:`_view_nodes` of an N:M sparse weight: the compacted view (N, K * keep / of) as a dense
    affine one, then each position's value picked from it (GatherElements at its run's base plus its
    offset among the run's survivors, looked up by the run's pattern) where the pattern keeps it, 0
    elsewhere (Where)."""
    keep, of, runs = fmt.keep, fmt.of, K // fmt.of
    nodes, inits, packed_view = _view_nodes(prefix, fmt.inner_format(), packed, K * keep // of, N, rows, f"{tmp}_c")
    mask = f"{prefix}_mask"
    if rows is not None:
        nodes.append(helper.make_node("Gather", [mask, rows], [f"{tmp}_mask_rows"], axis=0))
        mask = f"{tmp}_mask_rows"
    un, pos = _unpack(mask, runs, pattern_bits(keep, of), True, f"{tmp}_m", f"{tmp}_pat")
    kept = patterns(keep, of)
    tag = f"bq_pos_sparse{keep}of{of}"     # shared by every weight of that pattern (and K)
    view = f"{tmp}_view"
    inits += pos + [_t(packed["mask"], f"{prefix}_mask"), _t(kept, f"{tag}_keep"), _t(np.where(kept, np.cumsum(kept, axis=1) - 1, 0), f"{tag}_off"),
                    _t((np.arange(runs, dtype=np.int64) * keep).reshape(runs, 1), f"{tag}_K{K}_base"),
                    _t(np.array([-1, K], np.int64), f"{tag}_K{K}_shape"), _t(np.zeros((), np.float32), "bq_pos_f32_0")]
    nodes += un + [
        helper.make_node("Cast", [f"{tmp}_pat"], [f"{tmp}_pat64"], to=TensorProto.INT64),
        helper.make_node("Gather", [f"{tag}_off", f"{tmp}_pat64"], [f"{tmp}_off"], axis=0),     # (N, runs, of)
        helper.make_node("Add", [f"{tmp}_off", f"{tag}_K{K}_base"], [f"{tmp}_at3"]),
        helper.make_node("Reshape", [f"{tmp}_at3", f"{tag}_K{K}_shape"], [f"{tmp}_at"]),
        helper.make_node("GatherElements", [packed_view, f"{tmp}_at"], [f"{tmp}_picked"], axis=1),
        helper.make_node("Gather", [f"{tag}_keep", f"{tmp}_pat64"], [f"{tmp}_keep3"], axis=0),
        helper.make_node("Reshape", [f"{tmp}_keep3", f"{tag}_K{K}_shape"], [f"{tmp}_keep"]),
        helper.make_node("Where", [f"{tmp}_keep", f"{tmp}_picked", "bq_pos_f32_0"], [view])]
    return nodes, inits, view


def _named(nodes: list[NodeProto], prefix: str) -> list[NodeProto]:
    for i, n in enumerate(nodes):
        n.name = f"{prefix}_u{i}"
    return nodes


def portable_weight_nodes(out: str, prefix: str, fmt: BayesqUniform | BayesqLut | BayesqSparse, packed: dict[str, np.ndarray],
                          native_shape: tuple[int, ...], axis: int) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes computing the fp32 weight ``out`` of ``native_shape`` (``nodes.dequantize_node``'s view
    convention: a MatMul ``W (K, N)`` is ``axis=0``, a Conv ``(O, I, kh, kw)`` along I is ``axis=1``)
    from the packed tensors of ``fmt``, with standard ONNX ops.  Initializers ``f"{prefix}_<role>"``
    hold the packed data (plus the shared position tables)."""
    shape = [int(d) for d in native_shape]
    K = shape[axis]
    N = int(np.prod(shape, dtype=np.int64)) // K
    nodes, inits, view = _view_nodes(prefix, fmt, packed, K, N)
    # view (N, K) = moveaxis(W, axis, -1).reshape(N, K): reshape to the other axes + K, move K back
    rest = shape[:axis] + shape[axis + 1:]
    perm = list(range(len(rest)))
    perm.insert(axis, len(rest))
    inits.append(_t(np.array(rest + [K], np.int64), f"{prefix}_viewshape"))
    nodes += [helper.make_node("Reshape", [view, f"{prefix}_viewshape"], [f"{prefix}_nd"]),
              helper.make_node("Transpose", [f"{prefix}_nd"], [out], perm=perm)]
    return _named(nodes, prefix), _dedupe(inits)


def portable_gather_nodes(indices: str, out: str, prefix: str, fmt: BayesqUniform | BayesqLut,
                          packed: dict[str, np.ndarray], V: int, D: int, tmp: str | None = None
                          ) -> tuple[list[NodeProto], list[TensorProto]]:
    """``out = table[indices]`` (float32, ``indices.shape + (D,)``) for a ``(V, D)`` table packed by
    ``fmt`` (view: V rows of D), with standard ops: the packed rows (codes, scales, zero points, or
    the codebook's row offsets) are gathered by index and only those are unpacked, so the table stays
    packed in memory too (nothing here is constant: onnxruntime cannot fold it).  ONNX Gather's index
    rule (negative indices count from the end).  ``tmp``: as in :func:`_view_nodes` (computed tensors
    and nodes; each lookup of one table needs its own)."""
    tmp = tmp or prefix
    flat = f"{tmp}_rows"
    inits = [_t(np.array([-1], np.int64), f"{prefix}_flatshape"), _t(np.array([D], np.int64), f"{prefix}_D")]
    head = [helper.make_node("Reshape", [indices, f"{prefix}_flatshape"], [flat])]
    nodes, vinits, view = _view_nodes(prefix, fmt, packed, D, V, rows=flat, tmp=tmp)
    tail = [helper.make_node("Shape", [indices], [f"{tmp}_ishape"]),
            helper.make_node("Concat", [f"{tmp}_ishape", f"{prefix}_D"], [f"{tmp}_oshape"], axis=0),
            helper.make_node("Reshape", [view, f"{tmp}_oshape"], [out])]
    return _named(head + nodes + tail, tmp), _dedupe(inits + vinits)


def _dedupe(inits: list[TensorProto]) -> list[TensorProto]:
    seen, out = set(), []
    for t in inits:
        if t.name not in seen:
            seen.add(t.name)
            out.append(t)
    return out
