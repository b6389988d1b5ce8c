"""The weight left unquantized, in its own float type (float32, or float16 / bfloat16 in such a
model): a candidate the allocator may pick for sensitive layers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes


@dataclass(frozen=True)
class Float32(Format):
    bits: int = 32
    block: int = 0
    dtype: str = "float32"   # float16 / bfloat16 (bits 16): a weight of such a model kept as it is

    @classmethod
    def keep(cls, dtype: str) -> "Float32":
        """The format that keeps a weight of ``dtype`` as it is."""
        return cls(bits={"float32": 32, "float16": 16, "bfloat16": 16}[dtype], dtype=dtype)

    @property
    def name(self) -> str:
        return self.dtype

    def stored_bits(self, rows: int, L: int) -> int:
        return self.bits * rows * L

    def pack(self, q: UniformCodes | np.ndarray) -> dict[str, np.ndarray]:
        """The weight itself (a view array); given codes, their dequantized values."""
        w = q.dequantize() if isinstance(q, UniformCodes) else q
        return {"W": np.ascontiguousarray(w, dtype=np.float32)}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        raise TypeError("float32 stores no codes; use packed['W']")
