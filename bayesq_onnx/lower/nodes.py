"""ONNX node builders for the stored formats: layout only, no maths.

Each builder takes a format's ``pack(...)`` dict and returns ``(node, [initializers])``; initializer
names are ``f"{prefix}_<role>"`` and the node is named ``prefix``.  Sub-byte integer tensors are made
with ``numpy_helper.from_array`` on ml_dtypes arrays, which stores them packed in ``raw_data``.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..formats import BlockedDequantize, GatherBlockQuantized, MatMulNBits

MS_DOMAIN = "com.microsoft"


def _tensor(a: np.ndarray, name: str) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def matmulnbits_node(inp: str, out: str, prefix: str, fmt: MatMulNBits, packed: dict[str, np.ndarray],
                     K: int, N: int, accuracy_level: int = 0, bias: str | None = None
                     ) -> tuple[NodeProto, list[TensorProto]]:
    """``out = inp @ W (+ bias)`` for ``W (K, N)`` whose view ``W^T`` was packed by ``fmt``.

    ``accuracy_level`` 0 keeps A in fp32 (only 4 bits has a fast kernel there); 4 quantizes A to int8
    per block (fast for all widths, ~0.5% error).  ``bias`` names an existing fp32 ``(N,)`` tensor.
    """
    inits = [_tensor(packed[k], f"{prefix}_{k}") for k in ("B", "scales", "zero_points")]
    inputs = [inp] + [t.name for t in inits] + (["", bias] if bias else [])  # "" = no g_idx
    node = helper.make_node("MatMulNBits", inputs, [out], name=prefix, domain=MS_DOMAIN,
                            K=K, N=N, bits=fmt.bits, block_size=fmt.block, accuracy_level=accuracy_level)
    return node, inits


_ML = {(2, False): ml_dtypes.uint2, (2, True): ml_dtypes.int2,
       (4, False): ml_dtypes.uint4, (4, True): ml_dtypes.int4,
       (8, False): np.uint8, (8, True): np.int8}


def to_native(view: np.ndarray, native_shape: tuple[int, ...], axis: int, axis_len: int | None = None) -> np.ndarray:
    """Inverse of ``view = np.moveaxis(native, axis, -1).reshape(-1, native_shape[axis])``.

    ``axis_len`` replaces ``native_shape[axis]`` (for scales: the number of groups).
    """
    shape = list(native_shape)
    shape[axis] = view.shape[-1] if axis_len is None else axis_len
    rest = shape[:axis] + shape[axis + 1:]
    return np.moveaxis(view.reshape(*rest, shape[axis]), -1, axis)


def dequantize_node(out: str, prefix: str, fmt: BlockedDequantize, packed: dict[str, np.ndarray],
                    native_shape: tuple[int, ...], axis: int) -> tuple[NodeProto, list[TensorProto]]:
    """A ``DequantizeLinear`` producing a weight of ``native_shape`` blocked along ``axis``.

    The view convention is ``view = np.moveaxis(W, axis, -1).reshape(-1, W.shape[axis])``:
    rows enumerate all other axes in C order, ``L = W.shape[axis]``.  Examples:

    * MatMul ``B (K, N)``, axis 0: view ``(N, K) = B.T``.
    * Conv ``W (O, I, kh, kw)``, axis 1: view ``W.transpose(0, 2, 3, 1).reshape(O*kh*kw, I)``;
      scales/zero points are stored natively as ``(O, ceil(I / block), kh, kw)``.

    Codes, scales and zero points are stored in native layout, so the node's output *is* the weight
    (no Transpose/Reshape node).  Needs opset ``fmt.min_opset()`` and IR ``fmt.min_ir_version()``.
    """
    assert native_shape[axis] == packed["x"].shape[1], (native_shape, axis, packed["x"].shape)
    dt = _ML[fmt.bits, fmt.signed]
    G = packed["x_scale"].shape[1]
    inits = [_tensor(to_native(packed["x"], native_shape, axis).astype(dt), f"{prefix}_x"),
             _tensor(to_native(packed["x_scale"], native_shape, axis, G), f"{prefix}_x_scale"),
             _tensor(to_native(packed["x_zero_point"], native_shape, axis, G).astype(dt), f"{prefix}_x_zero_point")]
    node = helper.make_node("DequantizeLinear", [t.name for t in inits], [out], name=prefix,
                            axis=axis, block_size=fmt.block)
    return node, inits


def gather_block_quantized_node(indices: str, out: str, prefix: str, fmt: GatherBlockQuantized,
                                packed: dict[str, np.ndarray]) -> tuple[NodeProto, list[TensorProto]]:
    """``out = dequantized_table[indices]`` (shape ``indices.shape + (D,)``) for a ``(V, D)`` table.

    ``indices`` is int32 or int64; out-of-range indices give zero rows (ORT kernel behaviour).
    """
    inits = [_tensor(packed[k], f"{prefix}_{k}") for k in ("data", "scales", "zero_points")]
    node = helper.make_node("GatherBlockQuantized", [inits[0].name, indices, inits[1].name, inits[2].name],
                            [out], name=prefix, domain=MS_DOMAIN, bits=fmt.bits, block_size=fmt.block,
                            gather_axis=0, quantize_axis=1)
    return node, inits


def tied_head_nodes(inp: str, out: str, name: str, prefix: str, fmt: GatherBlockQuantized, V: int, D: int,
                    accuracy_level: int = 0) -> tuple[list[NodeProto], list[TensorProto]]:
    """``out = inp @ table^T`` reading the packed table that ``gather_block_quantized_node`` wrote
    under the same ``prefix``: with ``D % block == 0`` its ``(V, D*bits/8)`` data, scales and zero
    points are byte for byte MatMulNBits' ``B (V, n_blocks, blob)``, scales and zero points, so a
    Reshape is all the head needs (onnxruntime folds it at load; the file stores the table once)."""
    blob = fmt.block * fmt.bits // 8
    shape = _tensor(np.array([V, D // fmt.block, blob], np.int64), f"{prefix}_head_shape")
    reshape = helper.make_node("Reshape", [f"{prefix}_data", shape.name], [f"{prefix}_head_B"], name=f"{name}_B")
    mm = helper.make_node("MatMulNBits", [inp, f"{prefix}_head_B", f"{prefix}_scales", f"{prefix}_zero_points"],
                          [out], name=name, domain=MS_DOMAIN, K=D, N=V, bits=fmt.bits, block_size=fmt.block,
                          accuracy_level=accuracy_level)
    return [reshape, mm], [shape]
