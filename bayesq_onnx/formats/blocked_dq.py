"""ONNX ``DequantizeLinear`` with blocked quantization (``block_size`` attribute, opset >= 21).

``y = (x - x_zero_point) * x_scale`` with ``x_scale``/``x_zero_point`` shaped like ``x`` except the
blocked axis, whose length is ``ceil(L / block)``.  Any ``block >= 1`` is legal.  The output has ``x_scale``'s
type (``scale_dtype``: float32, or float16 for a float16 model).  ``x`` and
``x_zero_point`` share one type: (U)INT8, (U)INT4 (opset 21, IR 10) or (U)INT2 (opset 25, IR 13).

The view's rows are independent and ``L`` is the blocked axis; ``pack`` returns arrays in view layout
with one *unpacked* integer per element (int8/uint8 numpy arrays).  ``lower/nodes.py`` moves them to
the native layout and writes sub-byte TensorProtos, which ONNX packs over the whole flattened tensor
(2 int4 or 4 int2 per byte, LSB first, one padded byte at the end at most).

Signed types store ``c - 2**(bits-1)`` for a code ``c`` (zero point likewise), so ``x - zp`` and the
dequantized values are identical to the unsigned form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes, n_groups
from .bayesq_uniform import SCALE_DTYPES, check_scale_dtype, round_values, store_values


@dataclass(frozen=True)
class BlockedDequantize(Format):
    bits: int
    block: int
    signed: bool = False
    scale_dtype: str = "float32"   # sets the output type: float16 in a float16 model

    def __post_init__(self):
        check_scale_dtype(self.scale_dtype)
        if self.bits not in (2, 4, 8):
            raise ValueError(f"DequantizeLinear integer types are 2, 4 or 8 bits, got {self.bits}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")

    @property
    def name(self) -> str:
        return f"dq-{'' if self.signed else 'u'}int{self.bits}-g{self.block}" + \
            ("-f16" if self.scale_dtype == "float16" else "")

    def round_scales(self, scale: np.ndarray) -> np.ndarray:
        """float32 scales exactly as stored (fp16-rounded for float16): codes are chosen on these."""
        return round_values(scale, self.scale_dtype, "scales")

    @property
    def offset(self) -> int:
        """Stored value = code - offset."""
        return 1 << (self.bits - 1) if self.signed else 0

    def min_opset(self) -> int:
        # block_size appeared in DequantizeLinear-21 (with INT4/UINT4); INT2/UINT2 in DequantizeLinear-25.
        return 25 if self.bits == 2 else 21

    def min_ir_version(self) -> int:
        # onnx.helper.find_min_ir_version_for: opset 21 -> IR 10, opset 25 -> IR 13
        return {21: 10, 25: 13}[self.min_opset()]

    def stored_bits(self, rows: int, L: int) -> int:
        g = rows * n_groups(L, self.block)
        packed = lambda n: 8 * -(-n * self.bits // 8)   # sub-byte tensors pack over the whole tensor
        return packed(rows * L) + packed(g) + 8 * np.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize * g

    def pack(self, q: UniformCodes) -> dict[str, np.ndarray]:
        assert q.bits == self.bits and q.block == self.block, (q.bits, q.block, self)
        dt = np.int8 if self.signed else np.uint8
        conv = lambda a: (a.astype(np.int16) - self.offset).astype(dt)
        return {"x": conv(q.codes),
                "x_scale": store_values(q.scale, self.scale_dtype, "scales"),
                "x_zero_point": conv(q.zero_point)}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        conv = lambda a: (np.asarray(a).astype(np.int16) + self.offset).astype(np.uint8)
        return UniformCodes(codes=conv(packed["x"]).reshape(rows, L),
                            scale=np.asarray(packed["x_scale"], np.float32).reshape(rows, -1),
                            zero_point=conv(packed["x_zero_point"]).reshape(rows, -1),
                            bits=self.bits, block=self.block)
