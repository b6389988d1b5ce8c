"""Unquantized fp32 weight: a candidate the allocator may pick for sensitive layers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes


@dataclass(frozen=True)
class Float32(Format):
    bits: int = 32
    block: int = 0

    @property
    def name(self) -> str:
        return "float32"

    def stored_bits(self, rows: int, L: int) -> int:
        return 32 * rows * L

    def pack(self, q: UniformCodes | np.ndarray) -> dict[str, np.ndarray]:
        """The weight itself (a view array); given codes, their dequantized values."""
        w = q.dequantize() if isinstance(q, UniformCodes) else q
        return {"W": np.ascontiguousarray(w, dtype=np.float32)}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        raise TypeError("float32 stores no codes; use packed['W']")
