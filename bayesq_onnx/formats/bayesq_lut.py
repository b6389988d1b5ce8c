"""``bayesq.MatMulLut``: b-bit codes (1..8) indexing a codebook of ``2**b`` levels per row or per
group (non-uniform grids such as posterior-weighted Lloyd-Max codebooks), stored as float32 or float16
(``scale_dtype``; name suffix ``-f16``).

* ``B``: uint8 ``(N, ceil(K * bits / 8))``, the same code layout as ``bayesq_uniform`` (layout.h);
* ``lut``: float32 or float16 ``(N, G, 2**bits)``, ``G = ceil(K / block)``, or ``G = 1`` with
  ``block = 0`` (one codebook per row, i.e. per output column of ``W``);
* ``W[k, n] = lut[n, k // block, q[n, k]]``: a copy (of the fp32-widened level), so kernels dequantize
  bit-exactly.

With float16, ``pack`` rounds the levels to fp16: a quantizer should round its codebook first
(``fmt.round_scales(lut)``) and then assign codes to the rounded levels, or the nearest level may
change; ``fmt.stored_codes(q)`` gives what the runtime will dequantize.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes
from .bayesq_uniform import (SCALE_DTYPES, check_bayesq, check_scale_dtype, col_bytes, group_index, groups,
                             pack_codes, round_values, store_values, unpack_codes)


@dataclass(frozen=True)
class LutCodes:
    """``w[r, k] ~= lut[r, g(k), codes[r, k]]`` with ``g(k) = k // block`` (0 for ``block = 0``)."""

    codes: np.ndarray   # uint8 (rows, L), values in [0, 2**bits)
    lut: np.ndarray     # float32 (rows, G, 2**bits)
    bits: int
    block: int
    gptq_objective: float | None = None   # as UniformCodes'

    def dequantize(self) -> np.ndarray:
        rows, L = self.codes.shape
        g = group_index(L, self.block)
        return self.lut[np.arange(rows)[:, None], g[None, :], self.codes].astype(np.float32)

    @classmethod
    def from_uniform(cls, q: UniformCodes) -> "LutCodes":
        """The affine grid of ``q`` as a codebook: ``lut[r, g, j] = (j - zp[r, g]) * scale[r, g]``, the
        same fp32 operations as ``UniformCodes.dequantize``, so both dequantize to identical values."""
        j = np.arange(1 << q.bits, dtype=np.float32)
        lut = (j[None, None, :] - q.zero_point.astype(np.float32)[:, :, None]) * q.scale[:, :, None]
        return cls(codes=q.codes, lut=lut.astype(np.float32), bits=q.bits, block=q.block)


@dataclass(frozen=True)
class BayesqLut(Format):
    bits: int
    block: int   # 0: one codebook per row
    scale_dtype: str = "float32"   # how the LUT levels are stored: "float32" or "float16"

    def __post_init__(self):
        check_bayesq(self.bits, self.block)
        check_scale_dtype(self.scale_dtype)

    @property
    def name(self) -> str:
        return f"bq-lut{self.bits}-g{self.block or 'row'}" + ("-f16" if self.scale_dtype == "float16" else "")

    def stored_bits(self, rows: int, L: int) -> int:
        lbytes = np.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        return 8 * rows * (col_bytes(L, self.bits) + lbytes * groups(L, self.block) * (1 << self.bits))

    def round_scales(self, lut: np.ndarray) -> np.ndarray:
        """float32 LUT levels exactly as stored and used by the runtime (fp16-rounded for float16):
        round the codebook with this before assigning codes."""
        return round_values(lut, self.scale_dtype, "lut")

    def stored_codes(self, q: LutCodes) -> LutCodes:
        """``q`` with its LUT replaced by the stored levels: its ``dequantize()`` is what the runtime
        computes (the codes are kept, so round the codebook before assigning them)."""
        return LutCodes(codes=q.codes, lut=self.round_scales(q.lut), bits=q.bits, block=q.block)

    def pack(self, q: LutCodes) -> dict[str, np.ndarray]:
        assert q.bits == self.bits and q.block == self.block, (q.bits, q.block, self)
        rows, L = q.codes.shape
        lut = store_values(q.lut, self.scale_dtype, "lut")
        if lut.shape != (rows, groups(L, self.block), 1 << self.bits):
            raise ValueError(f"{self.name}: lut must be {(rows, groups(L, self.block), 1 << self.bits)}, "
                             f"got {lut.shape}")
        return {"B": pack_codes(q.codes, self.bits), "lut": lut}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> LutCodes:
        lut = np.asarray(packed["lut"], np.float32).reshape(rows, groups(L, self.block), 1 << self.bits)
        return LutCodes(codes=unpack_codes(packed["B"], L, self.bits), lut=lut, bits=self.bits, block=self.block)
