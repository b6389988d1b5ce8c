"""What a model file stores, read from its graph alone (nothing is run): ``bayesq-onnx inspect``.

    info = inspect_model("model.bq.onnx")     # a JSON-ready dict; summary_lines(info) for people

A quantized weight is recognised by the op that reads its packed tensors, with the bits and group
size where the lowering (``lower/nodes.py``, ``lower/bayesq_nodes.py``, ``lower/portable.py``) puts them:

* ``com.microsoft.MatMulNBits``: attributes ``K``, ``N``, ``bits``, ``block_size``; tensors ``B``,
  ``scales``, ``zero_points`` (``B`` may come through a Reshape: a tied head reading an embedding table);
* ``com.microsoft.GatherBlockQuantized``: attributes ``bits`` (default 4), ``block_size`` (default
  128); tensors ``data``, ``scales``, ``zero_points``; uint8 ``data`` holds ``8 / bits`` codes a byte;
* ``DequantizeLinear`` of an integer (or float8) initializer: bits from its type, ``block_size``
  attribute (0: one scale per tensor or per channel);
* ``bayesq.MatMulAffine`` / ``MatMulLut`` / ``DequantizeAffine`` / ``DequantizeLut`` / ``GatherAffine`` /
  ``GatherLut``: attributes ``K``, ``N``, ``bits``, ``block_size`` (0: one group per row), ``shape`` for
  the Dequantize ops (a Gather's table is ``N x K``; a tied head's MatMul reads the same tensors);
  ``MatMulSparseAffine`` / ``DequantizeSparseAffine`` as the affine ones, plus ``keep``, ``of`` and the
  ``mask`` tensor of the patterns;
* ``--target portable``: standard ops unpacking ``<prefix>_B`` (or, for an embedding lookup, its rows
  gathered by index) through the position table
  ``bq_pos_K<K>_b<bits>_lo`` (``portable.CODE_TABLE``); the group of each position is the
  ``<prefix>_gidx`` (affine) or ``<prefix>_groupbase`` (codebook) initializer; an N:M sparse weight
  also has ``<prefix>_mask``, its codes being the survivors' compacted view, and reads its pattern
  table ``bq_pos_sparse<keep>of<of>_keep``.

``bytes`` counts every stored byte of a weight (codes, scales, zero points, codebooks), as the
report's ``stored_bits`` does; the portable target's position and group tables are decoding
aids shared or sized by K alone, and are left out (the file size includes them).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..formats import BayesqLut, BayesqScaledLut, BayesqSparse, BayesqUniform, BlockedDequantize, GatherBlockQuantized, MatMulNBits
from ..lower.portable import CODE_TABLE
from .cone import all_nodes
from .model_io import constants_to_initializers, read_model

MS = "com.microsoft"
BAYESQ = "bayesq"
# element widths ONNX packs below a byte (numpy's view of them takes a whole byte each)
SUB_BYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
                 TensorProto.INT2: 2, TensorProto.UINT2: 2}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
SIGNED_INTS = {TensorProto.INT8, TensorProto.INT4, TensorProto.INT2}
SPARSE_TABLE = re.compile(r"bq_pos_sparse(?P<keep>\d+)of(?P<of>\d+)_keep")   # lower/portable.py's pattern table


def element_bits(data_type: int) -> int:
    if data_type in SUB_BYTE_BITS:
        return SUB_BYTE_BITS[data_type]
    return 8 * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor's values take packed (sub-byte types over the whole tensor, as ONNX stores them)."""
    n = int(np.prod(t.dims, dtype=np.int64))
    return -(-n * element_bits(t.data_type) // 8)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def _format_name(make) -> str | None:
    """Our name for the format (docs/formats.md), or None when the file uses one we do not write."""
    try:
        return make().name
    except (ValueError, KeyError, TypeError):
        return None


def _our_name(tensor: str, role: str) -> str:
    """The weight's name as the lowering wrote it: ``bq_<name>_<role>`` (non-alphanumerics as ``_``)."""
    if tensor.startswith("bq_") and tensor.endswith("_" + role):
        return tensor[3:-len(role) - 1]
    return tensor


def inspect_model(path: str | os.PathLike) -> dict:
    """Every quantized weight of the model at ``path``, the float weights it keeps, and totals."""
    path = Path(path)
    model = read_model(path)
    constants_to_initializers(model)   # a weight held in a Constant node is a weight too
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in all_nodes(g) for o in n.output}

    def constant(name: str) -> str | None:
        """The initializer behind ``name``, through Reshape/Identity of constants (a tied head's B)."""
        seen = 0
        while name not in inits and name in producer and seen < 8:
            n = producer[name]
            if n.op_type not in ("Reshape", "Identity") or _domain(n):
                return None
            name, seen = n.input[0], seen + 1
        return name if name in inits else None

    entries: dict[str, dict] = {}   # keyed by the tensor holding the codes

    def add(codes: str, node: onnx.NodeProto, **fields):
        if codes in entries:
            entries[codes]["nodes"].append(node.name)
            return
        tensors = [t for t in dict.fromkeys([codes, *fields.pop("tensors")]) if t]
        shape = [int(d) for d in fields["shape"]]
        n = int(np.prod(shape, dtype=np.int64))
        nbytes = sum(tensor_bytes(inits[t]) for t in tensors)
        entries[codes] = {"name": fields["name"], "op": fields["op"], "nodes": [node.name],
                          "format": fields.get("format"), "bits": int(fields["bits"]),
                          "block_size": int(fields["block_size"]), "shape": shape, "n_weights": n,
                          "bytes": nbytes, "bits_per_weight": 8 * nbytes / n if n else None, "tensors": tensors}

    def init_inputs(node, slots):
        return [constant(node.input[i]) for i in slots if i < len(node.input) and node.input[i]]

    for node in all_nodes(g):   # a quantized weight's reader may sit in an If branch or Loop body
        dom, op, a = _domain(node), node.op_type, _attrs(node)
        if dom == MS and op == "MatMulNBits":
            codes = constant(node.input[1])
            if codes is None:
                continue
            bits, block = a.get("bits", 4), a.get("block_size", 0)
            # B through a Reshape: a tied head reading the embedding table GatherBlockQuantized stores
            add(codes, node, name=_our_name(codes, "B") if codes == node.input[1] else _our_name(codes, "data"),
                op=f"{MS}.MatMulNBits", bits=bits, block_size=block, shape=[a.get("K", 0), a.get("N", 0)],
                tensors=init_inputs(node, (2, 3, 4)), format=_format_name(lambda: MatMulNBits(bits, block)))
        elif dom == MS and op == "GatherBlockQuantized":
            codes = constant(node.input[0])
            if codes is None:
                continue
            t = inits[codes]
            bits, block = a.get("bits", 4), a.get("block_size", 128)
            shape = list(t.dims)
            if t.data_type == TensorProto.UINT8 and shape:
                shape[-1] = shape[-1] * 8 // bits     # 8 / bits codes per byte along the last axis
            add(codes, node, name=_our_name(codes, "data"), op=f"{MS}.GatherBlockQuantized", bits=bits,
                block_size=block, shape=shape, tensors=init_inputs(node, (2, 3)),
                format=_format_name(lambda: GatherBlockQuantized(bits, block))
                if t.data_type == TensorProto.UINT8 else None)
        elif dom == "" and op == "DequantizeLinear":
            codes = constant(node.input[0])
            if codes is None or inits[codes].data_type in FLOAT_TYPES:
                continue
            t = inits[codes]
            bits, block = element_bits(t.data_type), a.get("block_size", 0)
            signed = t.data_type in SIGNED_INTS
            add(codes, node, name=node.output[0], op="DequantizeLinear", bits=bits, block_size=block,
                shape=list(t.dims), tensors=init_inputs(node, (1, 2)),
                format=_format_name(lambda: BlockedDequantize(bits, block, signed)) if block else None)
        elif dom == BAYESQ and op in ("MatMulAffine", "MatMulLut", "DequantizeAffine", "DequantizeLut",
                                      "GatherAffine", "GatherLut", "MatMulSparseAffine", "DequantizeSparseAffine"):
            matmul = op.startswith("MatMul")
            gather = op.startswith("Gather")
            lut = op.endswith("Lut")
            sparse = "Sparse" in op
            first = 1 if matmul or gather else 0
            # B, lut / B, scales, zero_points / B, scales, zero_points, mask; then bias
            slots = range(first, first + (2 if lut else 4 if sparse else 3))
            codes, *rest = init_inputs(node, slots)
            if codes is None:
                continue
            bits, block = a.get("bits", 0), a.get("block_size", 0)
            values = inits[rest[0]] if rest and rest[0] else None
            dtype = "float16" if values is not None and values.data_type == TensorProto.FLOAT16 else "float32"
            cls = BayesqLut if lut else BayesqUniform
            prefix = codes[:-len("_B")]
            if lut and values is None and {f"{prefix}_scales", f"{prefix}_codebook"} <= inits.keys():
                # a scaled codebook: its LUT is computed from these (bayesq_nodes.scaled_lut_nodes)
                cls, rest = _scaled, [f"{prefix}_scales", f"{prefix}_codebook"]
            if sparse:
                keep, of = a.get("keep", 0), a.get("of", 0)
                cls = functools.partial(BayesqSparse, keep, of)
            # a gather's table is (N, K): N rows (the vocabulary) of K
            shape = ([a.get("K", 0), a.get("N", 0)] if matmul else [a.get("N", 0), a.get("K", 0)] if gather
                     else a.get("shape", []))
            add(codes, node, name=_our_name(codes, "B") if matmul or gather else node.output[0], op=f"{BAYESQ}.{op}",
                bits=bits, block_size=block, shape=shape, tensors=rest,
                format=_format_name(lambda: cls(bits, block, dtype)))
        elif dom == "" and op == "Gather" and len(node.input) > 1 and CODE_TABLE.fullmatch(node.input[1]):
            codes = _portable_codes(node.input[0], inits, producer)
            if codes is not None:
                _add_portable(add, node, codes, inits, g)

    quantized = list(entries.values())
    held = {t for e in quantized for t in e["tensors"]}
    floats = [{"name": t.name, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name,
               "shape": list(t.dims),
               "bytes": tensor_bytes(t)}
              for t in g.initializer if t.data_type in FLOAT_TYPES and len(t.dims) >= 2 and t.name not in held]
    n = sum(e["n_weights"] for e in quantized)
    stored = sum(e["bytes"] for e in quantized)
    return {
        "model": str(path), "file_bytes": _file_bytes(path, model),
        "quantized": quantized, "float_weights": floats,
        "totals": {"quantized_weights": len(quantized), "n_weights": n, "stored_bytes": stored,
                   "bits_per_weight": 8 * stored / n if n else None, "fp32_bytes_replaced": 4 * n,
                   "float_weights": len(floats), "float_bytes": sum(f["bytes"] for f in floats)},
    }


def _portable_codes(name: str, inits, producer) -> str | None:
    """The packed codes initializer ``<prefix>_B`` that a portable unpacking reads: itself, or (an
    embedding lookup) through the Gather of its rows by index."""
    if name not in inits and name in producer and producer[name].op_type == "Gather" and not _domain(producer[name]):
        name = producer[name].input[0]
    return name if name in inits and name.endswith("_B") else None


def _add_portable(add, node, codes, inits, g) -> None:
    """A ``--target portable`` weight, found at the Gather that reads its codes (lower/portable.py)."""
    lookup = node.input[0] != codes    # an embedding lookup: the rows of a (N, K) table
    prefix = codes[:-len("_B")]
    m = CODE_TABLE.fullmatch(node.input[1])
    K, bits = int(m["K"]), int(m["bits"])
    scaled = f"{prefix}_codebook" in inits   # its LUT computed from scales and levels (scaled_lut_nodes)
    lut = f"{prefix}_lut" in inits or scaled
    groups_of = inits.get(f"{prefix}_groupbase" if lut else f"{prefix}_gidx")
    if groups_of is None:
        return
    gidx = numpy_helper.to_array(groups_of).reshape(-1).astype(np.int64) >> (bits if lut else 0)
    # one group per row is block 0 for a codebook (what the planner writes) and the row's length for
    # an affine grid (whose block is positive); a block beyond K is the same grouping
    block = int(np.count_nonzero(gidx == 0)) if gidx.max(initial=0) > 0 or not lut else 0
    N = int(inits[codes].dims[0])
    # an N:M sparse weight: its codes are the compacted view of the survivors (K * keep / of wide),
    # its patterns the ``_mask``, keep and of read from the pattern table its lookup gathers from
    sparse = next((SPARSE_TABLE.fullmatch(n.input[0]) for n in g.node if n.op_type == "Gather"
                   and len(n.input) > 1 and n.input[1] == f"{prefix}_pat64" and SPARSE_TABLE.fullmatch(n.input[0])),
                  None) if f"{prefix}_mask" in inits else None
    if sparse:
        keep, of = int(sparse["keep"]), int(sparse["of"])
        K, block = K * of // keep, block * of // keep
    shape = [N, K] if lookup else [K, N]
    out = f"{prefix}_nd"
    name = _our_name(codes, "B")
    for n in g.node:   # the final Transpose gives the weight its native layout and its name
        if n.op_type == "Transpose" and n.input and n.input[0] == out:
            view = inits.get(f"{prefix}_viewshape")
            perm = _attrs(n).get("perm")
            if view is not None and perm is not None:
                dims = numpy_helper.to_array(view).tolist()
                shape = [int(dims[p]) for p in perm]
            name = n.output[0]
    values = f"{prefix}_lut" if lut else f"{prefix}_scales"
    dtype = "float16" if values in inits and inits[values].data_type == TensorProto.FLOAT16 else "float32"
    cls = _scaled if scaled else BayesqLut if lut else BayesqUniform
    if sparse:
        cls = functools.partial(BayesqSparse, keep, of)
    kind = "scaled codebook" if scaled else "codebook" if lut else f"{keep}:{of} sparse affine" if sparse else "affine"
    add(codes, node, name=name, op=f"portable {kind} (standard ops)", bits=bits,
        block_size=block, shape=shape,
        tensors=([f"{prefix}_scales", f"{prefix}_codebook"] if scaled else [values])
        + ([] if lut else [f"{prefix}_zero_points"]) + ([f"{prefix}_mask"] if sparse else []),
        format=_format_name(lambda: cls(bits, block, dtype)))


def _scaled(bits: int, block: int, _dtype: str) -> BayesqScaledLut:
    """A scaled codebook, made as the other classes are (its scales and levels are always fp16)."""
    return BayesqScaledLut(bits, block)


def _file_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The model file and the external data files it names."""
    total = path.stat().st_size
    seen = set()
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                p = path.parent / e.value
                total += p.stat().st_size if p.is_file() else 0
    return total


def _size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _no_block(op: str) -> str:
    """What block size 0 means: one group per row for our ops, per tensor or channel for DequantizeLinear."""
    return "row" if op.startswith((BAYESQ, "portable")) else "-"


def summary_lines(info: dict) -> list[str]:
    """The listing for a terminal: totals first, then one line per quantized weight and per float weight."""
    t = info["totals"]
    kept = (f"{t['float_weights']} float weight{'s' * (t['float_weights'] != 1)} kept "
            f"({_size(t['float_bytes'])})")
    if not info["quantized"]:
        return [f"{info['model']}: nothing is quantized; {kept}; file {_size(info['file_bytes'])}"]
    lines = [f"{info['model']}: {t['quantized_weights']} quantized weights, {t['n_weights']} values in "
             f"{_size(t['stored_bytes'])} ({t['bits_per_weight']:.3f} bits/weight; fp32 would take "
             f"{_size(t['fp32_bytes_replaced'])}); {kept}; file {_size(info['file_bytes'])}"]
    rows = [("weight", "op", "format", "bits", "block", "shape", "bytes", "bits/w")]
    for e in info["quantized"]:
        rows.append((e["name"], e["op"], e["format"] or "-", str(e["bits"]),
                     str(e["block_size"]) if e["block_size"] else _no_block(e["op"]),
                     "x".join(map(str, e["shape"])), str(e["bytes"]),
                     f"{e['bits_per_weight']:.3f}" if e["bits_per_weight"] is not None else "-"))
    for f in info["float_weights"]:
        rows.append((f["name"], "(kept)", f["dtype"], "-", "-", "x".join(map(str, f["shape"])), str(f["bytes"]), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines
