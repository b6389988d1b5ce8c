"""numpy reference kernels for the com.microsoft and bayesq ops we emit, for ``onnx.reference.ReferenceEvaluator``.

    ReferenceEvaluator(model, new_ops=REFERENCE_OPS)

They decode the packed tensors bit by bit from the op specs (independently of ``formats``'s
vectorised packers) and compute in fp32.  MatMulNBits ignores ``accuracy_level``: it is the exact
fp32 computation that onnxruntime approximates at level 4 (int8 activations).  bayesq scales / LUT
levels may be float32 or float16: widened exactly to fp32 (``astype``) before use, as the kernels do.
"""
from __future__ import annotations

import itertools

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


# ---- domain "bayesq" (custom_ops/include/bayesq/layout.h) -----------------------------------------

def _bq_codes(B: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Codes (N, K) of ``B`` read bit by bit from the layout rules: chunks of ``lanes`` x ``steps``;
    lane l step i holds k = k0 + lanes*i + l; bit t of it is bit (b*i + t) of lane l's word, whose
    byte j lives in the plane covering j (pieces of 4, 2, 1 bytes), at plane_offset + l*width."""
    N = B.shape[0]
    out = np.zeros((N, K), np.int32)
    full, r = divmod(K, 128)
    spans = [(full * 128, 16, 8, 0)] if full else []           # (n codes, lanes, steps, first k)
    if r >= 8:
        spans.append(((r // 8) * 8, r // 8, 8, full * 128))
    if K % 8:
        spans.append((K % 8, 1, K % 8, K - K % 8))
    for n, lanes, steps, first in spans:
        k = np.arange(first, first + n)
        k0 = first + ((k - first) // (lanes * steps)) * lanes * steps
        d = k - k0
        lane, step = d % lanes, d // lanes
        lane_bytes = -(-steps * bits // 8)
        for t in range(bits):
            bit = step * bits + t
            j = bit // 8
            off = np.zeros_like(j)                              # offset of byte j inside the chunk
            start = plane0 = 0
            rem = lane_bytes
            while rem > 0:
                w = 4 if rem >= 4 else 2 if rem >= 2 else 1
                here = (j >= start) & (j < start + w)
                off = np.where(here, plane0 + lane * w + (j - start), off)
                plane0 += lanes * w
                start += w
                rem -= w
            byte = B[:, k0 * bits // 8 + off]
            out[:, k] |= ((byte >> (bit % 8).astype(np.uint8)) & 1).astype(np.int32) << t
    return out


def _bq_stream(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Elements 0..n-1 of a per-row LSB-first bit stream of any width (they may span two bytes)."""
    out = np.zeros((buf.shape[0], n), np.int32)
    for t in range(bits):
        bit = np.arange(n) * bits + t
        out |= ((buf[:, bit // 8] >> (bit % 8).astype(np.uint8)) & 1).astype(np.int32) << t
    return out


def _bq_groups(K: int, block_size: int) -> np.ndarray:
    return np.arange(K) // block_size if block_size > 0 else np.zeros(K, np.int64)


def _bq_affine(B, scales, zero_points, K, N, bits, block_size) -> np.ndarray:
    G = -(-K // block_size) if block_size > 0 else 1
    q = _bq_codes(B.reshape(N, -1), K, bits).astype(np.float32)
    zp = (np.full((N, G), 1 << (bits - 1), np.float32) if zero_points is None
          else _bq_stream(zero_points.reshape(N, -1), bits, G).astype(np.float32))
    g = _bq_groups(K, block_size)
    s = scales.reshape(N, G).astype(np.float32)
    return ((q - zp[:, g]) * s[:, g]).astype(np.float32)        # view (N, K)


def _bq_lut(B, lut, K, N, bits, block_size) -> np.ndarray:
    G = -(-K // block_size) if block_size > 0 else 1
    q = _bq_codes(B.reshape(N, -1), K, bits)
    table = lut.reshape(N, G, 1 << bits).astype(np.float32)
    return table[np.arange(N)[:, None], _bq_groups(K, block_size)[None, :], q]


def _bq_sparse(B, scales, zero_points, mask, K, N, bits, block_size, keep, of) -> np.ndarray:
    """The view (N, K) of an N:M sparse weight: pattern p of a run (its index in the run's mask
    stream) is the p-th ``keep``-subset of ``of`` in lexicographic order; the run's survivors take the
    compacted view's values in order, the rest are 0."""
    Kc = K * keep // of
    subsets = list(itertools.combinations(range(of), keep))
    pbits = max(1, (len(subsets) - 1).bit_length())
    dense = _bq_affine(B, scales, zero_points, Kc, N, bits, block_size * keep // of)
    index = _bq_stream(mask.reshape(N, -1), pbits, K // of)
    pos = np.array(subsets, np.int64)[index] + (np.arange(K // of) * of)[None, :, None]   # (N, runs, keep)
    V = np.zeros((N, K), np.float32)
    np.put_along_axis(V, pos.reshape(N, Kc), dense, axis=1)
    return V


def _bq_matmul(A, V, bias):
    y = A.astype(np.float32) @ V.T
    if bias is not None:
        y = y + bias.astype(np.float32)
    return (y.astype(A.dtype),)


def _bq_native(V, K, N, shape, axis):
    shape = [K, N] if shape is None else [int(d) for d in shape]
    axis = axis % len(shape)
    rest = shape[:axis] + shape[axis + 1:]
    return (np.ascontiguousarray(np.moveaxis(V.reshape(*rest, K), -1, axis)),)


class MatMulAffine(OpRun):
    op_domain = "bayesq"

    def _run(self, A, B, scales, zero_points=None, bias=None, K=None, N=None, bits=None, block_size=None):
        return _bq_matmul(A, _bq_affine(B, scales, zero_points, K, N, bits, block_size), bias)


class MatMulLut(OpRun):
    op_domain = "bayesq"

    def _run(self, A, B, lut, bias=None, K=None, N=None, bits=None, block_size=None):
        return _bq_matmul(A, _bq_lut(B, lut, K, N, bits, block_size), bias)


class DequantizeAffine(OpRun):
    op_domain = "bayesq"

    def _run(self, B, scales, zero_points=None, K=None, N=None, bits=None, block_size=None, shape=None, axis=0):
        return _bq_native(_bq_affine(B, scales, zero_points, K, N, bits, block_size), K, N, shape, axis)


class DequantizeLut(OpRun):
    op_domain = "bayesq"

    def _run(self, B, lut, K=None, N=None, bits=None, block_size=None, shape=None, axis=0):
        return _bq_native(_bq_lut(B, lut, K, N, bits, block_size), K, N, shape, axis)


class MatMulSparseAffine(OpRun):
    op_domain = "bayesq"

    def _run(self, A, B, scales, zero_points, mask, bias=None, K=None, N=None, bits=None, block_size=None,
             keep=None, of=None):
        return _bq_matmul(A, _bq_sparse(B, scales, zero_points, mask, K, N, bits, block_size, keep, of), bias)


class DequantizeSparseAffine(OpRun):
    op_domain = "bayesq"

    def _run(self, B, scales, zero_points, mask, K=None, N=None, bits=None, block_size=None, keep=None, of=None,
             shape=None, axis=0):
        return _bq_native(_bq_sparse(B, scales, zero_points, mask, K, N, bits, block_size, keep, of), K, N, shape, axis)


def _bq_rows(V, indices):
    """Rows ``indices`` of the view ``V (N, K)``: ONNX Gather's rule (negative indices count from the
    end; outside ``[-N, N)`` an error)."""
    N = V.shape[0]
    idx = np.asarray(indices).astype(np.int64)
    if idx.size and (idx.min() < -N or idx.max() >= N):
        raise IndexError(f"bayesq gather: indices outside [-{N}, {N})")
    return (V[np.where(idx < 0, idx + N, idx)],)


class GatherAffine(OpRun):
    op_domain = "bayesq"

    def _run(self, indices, B, scales, zero_points=None, K=None, N=None, bits=None, block_size=None):
        return _bq_rows(_bq_affine(B, scales, zero_points, K, N, bits, block_size), indices)


class GatherLut(OpRun):
    op_domain = "bayesq"

    def _run(self, indices, B, lut, K=None, N=None, bits=None, block_size=None):
        return _bq_rows(_bq_lut(B, lut, K, N, bits, block_size), indices)


REFERENCE_OPS = [MatMulNBits, GatherBlockQuantized, MatMulAffine, MatMulLut, DequantizeAffine, DequantizeLut,
                 GatherAffine, GatherLut, MatMulSparseAffine, DequantizeSparseAffine]
