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
FLAT_SHAPE = "bq_flat_shape"   # a Reshape target (-1,), one per model

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
    """The initializers of the op's packed inputs, named ``f"{prefix}_<role>"``; a role missing from
    ``packed`` is a tensor the graph computes under that name (a scaled codebook's levels:
    :func:`scaled_lut_nodes`)."""
    role = "lut" if isinstance(fmt, BayesqLut) else "scales"
    if role in packed and np.asarray(packed[role]).dtype != np.dtype(fmt.scale_dtype):   # the op's input type
        raise BayesQError(f"{prefix}: {fmt.name} needs {fmt.scale_dtype} {role}, got {np.asarray(packed[role]).dtype}")
    return [numpy_helper.from_array(np.ascontiguousarray(packed[k]), f"{prefix}_{k}") for k in _ROLES[type(fmt)]
            if k in packed]


def _names(fmt, prefix: str) -> list[str]:
    return [f"{prefix}_{k}" for k in _ROLES[type(fmt)]]


def scaled_lut_nodes(prefix: str, packed: dict[str, np.ndarray], flat: bool = False
                     ) -> tuple[list[NodeProto], list[TensorProto]]:
    """``f"{prefix}_lut"``, float32 ``(N, G, 2**bits)`` (``flat``: ``(-1,)``, as the portable
    lowering reads a LUT, through a Reshape whose target ``FLAT_SHAPE`` every site shares): a
    ``BayesqScaledLut``'s fp16 scales (stored ``(N, G, 1)``) times its fp16 levels, both widened to
    float32 first (``bayesq_scaled_lut.scaled_table``).  All constant: onnxruntime folds them into one
    tensor when it loads the model, and ``fmt.lut``'s ops read it as their LUT."""
    N, G = np.shape(packed["scales"])
    inits = [numpy_helper.from_array(np.ascontiguousarray(packed["scales"]).reshape(N, G, 1), f"{prefix}_scales"),
             numpy_helper.from_array(np.ascontiguousarray(packed["codebook"]), f"{prefix}_codebook")]
    t, lut = f"{prefix}_lut_", f"{prefix}_lut"
    nodes = [helper.make_node("Cast", [f"{prefix}_scales"], [t + "s"], to=TensorProto.FLOAT),
             helper.make_node("Cast", [f"{prefix}_codebook"], [t + "c"], to=TensorProto.FLOAT),
             helper.make_node("Mul", [t + "s", t + "c"], [t + "3" if flat else lut])]
    if flat:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), FLAT_SHAPE))
        nodes.append(helper.make_node("Reshape", [t + "3", FLAT_SHAPE], [lut]))
    for i, n in enumerate(nodes):
        n.name = f"{t}{i}"
    return nodes, inits


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
    inputs = [inp] + _names(fmt, prefix) + ([bias] if bias else [])
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
    node = helper.make_node(_OPS[type(fmt)][1], _names(fmt, prefix), [out], name=prefix, domain=BAYESQ_DOMAIN,
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
    node = helper.make_node(op, [indices] + _names(fmt, prefix), [out], name=prefix, domain=BAYESQ_DOMAIN,
                            K=D, N=V, bits=fmt.bits, block_size=fmt.block)
    return node, inits
