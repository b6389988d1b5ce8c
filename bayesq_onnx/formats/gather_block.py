"""``com.microsoft.GatherBlockQuantized`` with uint8 ``data``: embedding tables ``(V, D)`` quantized along D.

From onnxruntime ``contrib_ops/cpu/quantization/gather_block_quantized.cc`` and ``ContribOperators.md``:

* uint8 data requires ``gather_axis = 0`` and ``quantize_axis`` = last axis; ``bits`` in {2, 4, 8}.
* ``data`` is ``(V, D * bits / 8)``: ``8 / bits`` codes per byte, LSB first.  The kernel indexes codes
  by the flat *logical* index and the output's last dim is ``packed_dim * 8 / bits``, so D must be a
  multiple of ``8 / bits`` (see :meth:`supports`).
* ``scales``: ``(V, ceil(D / block))`` with the output dtype (``scale_dtype``: float32 or float16); ``block`` a power of two >= 16.
* ``zero_points`` (uint8): ``(V, ceil(n_groups * bits / 8))``, each row packed on its own LSB first
  (for 8 bits simply ``(V, n_groups)``).
* ``out = float(data - zp) * scale``; indices outside ``[-V, V)`` give zero rows.

(uint4/int4 ``data`` also runs, but only at 4 bits; uint8 covers 2/4/8 bits with one layout.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes, check_ort_packed, n_groups
from .bayesq_uniform import SCALE_DTYPES, check_scale_dtype, round_values, store_values
from .matmulnbits import pack_bits, unpack_bits


@dataclass(frozen=True)
class GatherBlockQuantized(Format):
    bits: int
    block: int
    scale_dtype: str = "float32"   # the op's output type: float16 in a float16 model

    def __post_init__(self):
        check_ort_packed("GatherBlockQuantized", self.bits, self.block)
        check_scale_dtype(self.scale_dtype)

    @property
    def name(self) -> str:
        return f"gbq-b{self.bits}-g{self.block}" + ("-f16" if self.scale_dtype == "float16" else "")

    def round_scales(self, scale: np.ndarray) -> np.ndarray:
        """float32 scales exactly as stored (fp16-rounded for float16): codes are chosen on these."""
        return round_values(scale, self.scale_dtype, "scales")

    def supports(self, rows: int, L: int) -> bool:
        """Whether ORT can represent a (rows, L) table: L must fill whole bytes (see module doc)."""
        return L % (8 // self.bits) == 0

    def stored_bits(self, rows: int, L: int) -> int:
        g = n_groups(L, self.block)
        sbytes = np.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        return 8 * rows * (-(-L * self.bits // 8) + sbytes * g + -(-g * self.bits // 8))

    def pack(self, q: UniformCodes) -> dict[str, np.ndarray]:
        assert q.bits == self.bits and q.block == self.block, (q.bits, q.block, self)
        if not self.supports(*q.codes.shape):
            raise ValueError(f"{self.name}: D={q.codes.shape[1]} is not a multiple of {8 // self.bits}")
        return {"data": pack_bits(q.codes, self.bits),
                "scales": store_values(q.scale, self.scale_dtype, "scales"),
                "zero_points": pack_bits(q.zero_point, self.bits)}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        g = n_groups(L, self.block)
        return UniformCodes(codes=unpack_bits(packed["data"], self.bits, L),
                            scale=np.asarray(packed["scales"], np.float32).reshape(rows, g),
                            zero_point=unpack_bits(packed["zero_points"], self.bits, g),
                            bits=self.bits, block=self.block)
