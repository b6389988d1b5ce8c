"""ONNX node builders for the ``bayesq`` formats (custom-op domain ``bayesq``, opset 1): layout only.

Same conventions as ``nodes.py``: each builder takes a format's ``pack(...)`` dict and returns
``(node, [initializers])``, initializers named ``f"{prefix}_<role>"``, the node named ``prefix``.
A model using them needs ``BAYESQ_OPSET`` in its ``opset_import`` and the custom-op library at run
time (``runtime.custom_ops``; ``make_session`` registers it).  Signatures: layout.h.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import NodeProto, OperatorSetIdProto, TensorProto, helper, numpy_helper

from ..errors import BayesQError
from ..formats import BayesqLut, BayesqSparse, BayesqUniform

BAYESQ_DOMAIN = "bayesq"
BAYESQ_OPSET: OperatorSetIdProto = helper.make_opsetid(BAYESQ_DOMAIN, 1)

_ROLES = {BayesqUniform: ("B", "scales", "zero_points"), BayesqLut: ("B", "lut"),
          BayesqSparse: ("B", "scales", "zero_points", "mask")}
# the op names per format: (MatMul, Dequantize); no sparse Gather (embeddings are not offered sparse)
_OPS = {BayesqUniform: ("MatMulAffine", "DequantizeAffine"), BayesqLut: ("MatMulLut", "DequantizeLut"),
        BayesqSparse: ("MatMulSparseAffine", "DequantizeSparseAffine")}


def _attrs(fmt) -> dict:
    """Attributes beyond K and N: a sparse format's block_size counts original weights, its pattern
    is keep of every ``of``."""
    extra = {"keep": fmt.keep, "of": fmt.of} if isinstance(fmt, BayesqSparse) else {}
    return dict(bits=fmt.bits, block_size=fmt.block, **extra)


def _inits(fmt: BayesqUniform | BayesqLut | BayesqSparse, packed: dict[str, np.ndarray], prefix: str) -> list[TensorProto]:
    role = "lut" if isinstance(fmt, BayesqLut) else "scales"
    if np.asarray(packed[role]).dtype != np.dtype(fmt.scale_dtype):   # float32 / float16: the op's input type
        raise BayesQError(f"{prefix}: {fmt.name} needs {fmt.scale_dtype} {role}, got {np.asarray(packed[role]).dtype}")
    return [numpy_helper.from_array(np.ascontiguousarray(packed[k]), f"{prefix}_{k}") for k in _ROLES[type(fmt)]]


def bayesq_matmul_node(inp: str, out: str, prefix: str, fmt: BayesqUniform | BayesqLut | BayesqSparse,
                       packed: dict[str, np.ndarray], K: int, N: int, bias: str | None = None
                       ) -> tuple[NodeProto, list[TensorProto]]:
    """``out = inp @ W (+ bias)`` for ``W (K, N)`` whose view ``W^T (N, K)`` was packed by ``fmt``.

    ``inp`` is float32 or float16 ``(..., K)``; ``bias`` names an existing ``(N,)`` tensor of the same
    type.  The scales / LUT initializer has ``fmt.scale_dtype`` (float32 or float16), independently.  Op ``bayesq.MatMulAffine(A, B, scales, zero_points, [bias])``,
    ``bayesq.MatMulLut(A, B, lut, [bias])`` or ``bayesq.MatMulSparseAffine(A, B, scales, zero_points,
    mask, [bias])``, attributes K, N, bits, block_size (and keep, of).
    """
    inits = _inits(fmt, packed, prefix)
    inputs = [inp] + [t.name for t in inits] + ([bias] if bias else [])
    node = helper.make_node(_OPS[type(fmt)][0], inputs, [out], name=prefix, domain=BAYESQ_DOMAIN, K=K, N=N,
                            **_attrs(fmt))
    return node, inits


def bayesq_dequantize_node(out: str, prefix: str, fmt: BayesqUniform | BayesqLut | BayesqSparse, packed: dict[str, np.ndarray],
                           native_shape: tuple[int, ...], axis: int) -> tuple[NodeProto, list[TensorProto]]:
    """The fp32 weight of ``native_shape`` whose view ``np.moveaxis(W, axis, -1).reshape(-1, W.shape[axis])``
    was packed by ``fmt`` (the ``dequantize_node`` convention of ``nodes.py``): a MatMul ``B (K, N)``
    is ``axis=0``; a Conv ``(O, I, kh, kw)`` quantized along I is ``axis=1``.  The op writes the
    native layout itself (no Transpose/Reshape node).
    """
    K = int(native_shape[axis])
    N = math.prod(int(d) for d in native_shape) // K
    inits = _inits(fmt, packed, prefix)
    node = helper.make_node(_OPS[type(fmt)][1], [t.name for t in inits], [out], name=prefix, domain=BAYESQ_DOMAIN,
                            K=K, N=N, shape=[int(d) for d in native_shape], axis=axis, **_attrs(fmt))
    return node, inits


def bayesq_gather_node(indices: str, out: str, prefix: str, fmt: BayesqUniform | BayesqLut,
                       packed: dict[str, np.ndarray], V: int, D: int) -> tuple[NodeProto, list[TensorProto]]:
    """``out = table[indices]`` (float32, shape ``indices.shape + (D,)``) for a ``(V, D)`` table packed
    by ``fmt`` as a view of V rows of D: the layout of a MatMul weight ``table^T (D, V)``, so a tied
    head's ``bayesq_matmul_node(..., K=D, N=V)`` reads the same initializers.  ``indices`` int64 or
    int32.  Op ``bayesq.GatherAffine(indices, B, scales, zero_points)`` or
    ``bayesq.GatherLut(indices, B, lut)``, attributes K (= D), N (= V), bits, block_size."""
    if isinstance(fmt, BayesqSparse):
        raise BayesQError(f"{prefix}: no bayesq Gather op reads {fmt.name} (embeddings are not offered sparse)")
    inits = _inits(fmt, packed, prefix)
    op = "GatherLut" if isinstance(fmt, BayesqLut) else "GatherAffine"
    node = helper.make_node(op, [indices] + [t.name for t in inits], [out], name=prefix, domain=BAYESQ_DOMAIN,
                            K=D, N=V, bits=fmt.bits, block_size=fmt.block)
    return node, inits
