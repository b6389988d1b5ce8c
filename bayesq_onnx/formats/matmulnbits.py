"""``com.microsoft.MatMulNBits``: ``Y = A @ W`` with ``W (K, N)`` stored as ``W^T`` blocks along K.

Layout (onnxruntime ``docs/ContribOperators.md`` and ``contrib_ops/cpu/quantization/matmul_nbits_helper.h``):

* ``B``: uint8 ``(N, k_blocks, blob_size)``, ``k_blocks = ceil(K / block)``, ``blob_size = block * bits / 8``;
  codes of one (column n, block) packed LSB-first along K (4 bits: element 2j in the low nibble of
  byte j; 2 bits: element 4j+i at bits 2i..2i+1).  The last block of a column is padded to ``block``.
* ``scales``: dtype of ``A`` (``scale_dtype``: float32, or float16 for a float16 model), shape ``(N, k_blocks)`` (1-D ``(N * k_blocks,)`` also accepted).
* ``zero_points`` (uint8, packed like ``B``): ``(N, ceil(k_blocks * bits / 8))``, each column packed
  on its own with its own byte padding.
* ``W[k, n] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]``.

The view is ``(rows=N, L=K)``, i.e. ``W^T``; it is exactly what ``B`` stores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes, check_ort_packed, n_groups
from .bayesq_uniform import SCALE_DTYPES, check_scale_dtype, round_values, store_values


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` (values < 2**bits) LSB-first into bytes, zero-padding the last byte."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = -n % per
    c = np.pad(codes.astype(np.uint8), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(*codes.shape[:-1], (n + pad) // per, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``n`` codes of the last axis."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    c = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :n].astype(np.uint8)


@dataclass(frozen=True)
class MatMulNBits(Format):
    bits: int
    block: int
    scale_dtype: str = "float32"   # must be the activations' type (the op's T1): float16 in a float16 model

    def __post_init__(self):
        check_ort_packed("MatMulNBits", self.bits, self.block)
        check_scale_dtype(self.scale_dtype)

    @property
    def name(self) -> str:
        return f"matmulnbits-b{self.bits}-g{self.block}" + ("-f16" if self.scale_dtype == "float16" else "")

    def round_scales(self, scale: np.ndarray) -> np.ndarray:
        """float32 scales exactly as stored (fp16-rounded for float16): codes are chosen on these."""
        return round_values(scale, self.scale_dtype, "scales")

    def _sizes(self, rows: int, L: int) -> tuple[int, int, int]:
        nb = n_groups(L, self.block)
        return nb, self.block * self.bits // 8, -(-nb * self.bits // 8)

    def stored_bits(self, rows: int, L: int) -> int:
        nb, blob, zp_bytes = self._sizes(rows, L)
        sbytes = np.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        return 8 * rows * (nb * blob + sbytes * nb + zp_bytes)

    def pack(self, q: UniformCodes) -> dict[str, np.ndarray]:
        assert q.bits == self.bits and q.block == self.block, (q.bits, q.block, self)
        N, K = q.codes.shape
        nb = n_groups(K, self.block)
        # Pad the short last block with its zero point, so padding dequantizes to 0 should a kernel read it.
        codes = np.empty((N, nb * self.block), np.uint8)
        codes[:, :K] = q.codes
        codes[:, K:] = q.zero_point[:, -1:]
        return {
            "B": pack_bits(codes.reshape(N, nb, self.block), self.bits),
            "scales": store_values(q.scale, self.scale_dtype, "scales").reshape(N, nb),
            "zero_points": pack_bits(q.zero_point, self.bits),
        }

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        nb = n_groups(L, self.block)
        codes = unpack_bits(packed["B"], self.bits, self.block).reshape(rows, nb * self.block)[:, :L]
        return UniformCodes(codes=np.ascontiguousarray(codes),
                            scale=np.asarray(packed["scales"], np.float32).reshape(rows, nb),
                            zero_point=unpack_bits(packed["zero_points"].reshape(rows, -1), self.bits, nb),
                            bits=self.bits, block=self.block)
