"""What every stored weight format provides.

A format works on a *view*: a float32 array ``(rows, L)`` whose rows are independent and whose
last axis ``L`` is the reduction axis, quantized in groups of ``block`` consecutive elements (the
last group of a row may be short when ``L % block != 0``).  Each site (graph/sites.py) says how its
initializer maps to and from that view, so formats never see ONNX layouts other than their own
packed tensors.  Formats are frozen dataclasses: hashable, comparable, usable as table keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UniformCodes:
    """Affine b-bit quantization of a view: ``w[r, k] ~= (codes[r, k] - zp[r, k // block]) * scale[r, k // block]``."""

    codes: np.ndarray        # uint8 (rows, L), values in [0, 2**bits)
    scale: np.ndarray        # float32 (rows, n_groups)
    zero_point: np.ndarray   # uint8 (rows, n_groups), values in [0, 2**bits)
    bits: int
    block: int
    # where GPTQ made the codes: the damped layer error it minimised (quantize.rounding.error_feedback)
    gptq_objective: float | None = None

    def dequantize(self) -> np.ndarray:
        rows, L = self.codes.shape
        zp = self.zero_point.astype(np.float32)
        if L % self.block == 0:   # whole groups: broadcast per group instead of gathering per weight
            c = self.codes.reshape(rows, -1, self.block).astype(np.float32)
            c -= zp[:, :, None]
            c *= self.scale[:, :, None]   # in place: the product rounded to float32, as below
            return c.reshape(rows, L)
        g = np.arange(L) // self.block
        return ((self.codes.astype(np.float32) - zp[:, g]) * self.scale[:, g]).astype(np.float32)


def n_groups(L: int, block: int) -> int:
    return -(-L // block)


def check_ort_packed(op: str, bits: int, block: int) -> None:
    """onnxruntime's packed contrib ops take 2/4/8-bit codes in power-of-two blocks >= 16 and
    reject anything else at session creation (matmul_nbits_helper.h, gather_block_quantized.cc)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"{op} bits must be 2, 4 or 8, got {bits}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"{op} block must be a power of two >= 16, got {block}")


class Format:
    """Base class; subclasses are frozen dataclasses (one class per stored format)."""

    bits: int = 32
    block: int = 0
    sparsity: float = 0.0   # share of the weights the format drops (stores as exactly 0)

    @property
    def name(self) -> str:
        """Stable short id used in reports and tables, e.g. ``matmulnbits-b4-g64``."""
        raise NotImplementedError

    def code_bits(self, rows: int, L: int) -> int:
        """Bits of the codes alone (no scales / zero points)."""
        return rows * L * self.bits

    def stored_bits(self, rows: int, L: int) -> int:
        """Every bit this format stores for a (rows, L) view: packed codes with their padding,
        scales, zero points, codebooks.  Must equal 8 * the bytes of ``pack(...)`` arrays."""
        raise NotImplementedError

    def pack(self, q: UniformCodes) -> dict[str, np.ndarray]:
        """Native packed tensors for the runtime op, keyed by role (``"B"``, ``"scales"``, ...)."""
        raise NotImplementedError

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        """Inverse of ``pack`` (used by tests and reference ops)."""
        raise NotImplementedError
