"""numpy reference kernels for the com.microsoft ops we emit, for ``onnx.reference.ReferenceEvaluator``.

    ReferenceEvaluator(model, new_ops=REFERENCE_OPS)

They decode the packed tensors bit by bit from the op specs (independently of ``formats``'s
vectorised packers) and compute in fp32.  MatMulNBits ignores ``accuracy_level``: it is the exact
fp32 computation that onnxruntime approximates at level 4 (int8 activations).
"""
from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun


def _bits_at(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Element i of the last axis of ``buf`` sits in byte ``i*bits//8`` at bit ``(i*bits)%8`` (LSB first)."""
    i = np.arange(n)
    return ((buf[..., i * bits // 8] >> ((i * bits) % 8).astype(np.uint8)) & ((1 << bits) - 1)).astype(np.int32)


class MatMulNBits(OpRun):
    op_domain = "com.microsoft"

    def _run(self, A, B, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None, bits=4,
             block_size=None, accuracy_level=0, weight_prepacked=0):
        if weight_prepacked:
            raise NotImplementedError("prepacked MatMulNBits weights")
        nb = -(-K // block_size)
        q = _bits_at(B.reshape(N, -1), bits, K)            # blobs are whole bytes: flat per column = K order
        s = scales.reshape(N, nb).astype(np.float32)
        if zero_points is None:
            zp = np.full((N, nb), 1 << (bits - 1), np.float32)
        elif zero_points.dtype == np.uint8:
            zp = _bits_at(zero_points.reshape(N, -1), bits, nb).astype(np.float32)
        else:
            zp = zero_points.reshape(N, nb).astype(np.float32)
        g = np.arange(K) // block_size if g_idx is None else g_idx[:K].astype(np.int64)
        w = (q.astype(np.float32) - zp[:, g]) * s[:, g]    # (N, K)
        y = A.astype(np.float32) @ w.T
        if bias is not None:
            y = y + bias
        return (y.astype(A.dtype),)


class GatherBlockQuantized(OpRun):
    op_domain = "com.microsoft"

    def _run(self, data, indices, scales, zero_points=None, bits=4, block_size=128, gather_axis=0,
             quantize_axis=1):
        r = data.ndim
        ga, qa = gather_axis % r, quantize_axis % r
        if data.dtype == np.uint8:                          # bits < 8: packed along the last axis
            if ga != 0 or qa != r - 1:
                raise ValueError("uint8 GatherBlockQuantized needs gather_axis 0 and quantize_axis last")
            codes = _bits_at(data, bits, data.shape[-1] * 8 // bits)
            zp = (np.full(scales.shape, 1 << (bits - 1), np.int32) if zero_points is None
                  else _bits_at(zero_points, bits, scales.shape[-1]))
        else:                                               # int4 / uint4 (ml_dtypes): already logical
            codes = data.astype(np.int32)
            zp = np.zeros(scales.shape, np.int32) if zero_points is None else zero_points.astype(np.int32)
        g = np.arange(codes.shape[qa]) // block_size
        deq = ((codes - np.take(zp, g, axis=qa)).astype(np.float32)
               * np.take(scales, g, axis=qa).astype(np.float32)).astype(scales.dtype)
        n = deq.shape[ga]
        idx = indices.astype(np.int64)
        valid = (idx >= -n) & (idx < n)                     # out of range -> zeros, as in ORT
        out = np.take(deq, np.where(valid, idx % n, 0), axis=ga)
        mask = valid.reshape((1,) * ga + idx.shape + (1,) * (r - ga - 1))
        return (np.where(mask, out, 0).astype(scales.dtype),)


REFERENCE_OPS = [MatMulNBits, GatherBlockQuantized]
