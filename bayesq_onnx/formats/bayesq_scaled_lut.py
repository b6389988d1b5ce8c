"""One codebook per weight, scaled per group (name ``bq-nf{bits}-g{block|row}-f16``): ``2**bits`` float16
levels for the whole tensor and one float16 scale per group; ``W[k, n] = scales[n, k // block] *
codebook[q[n, k]]`` in fp32.  NormalFloat-like (one shape of levels for every group), but the levels
are fitted to the tensor (``quantize/scaled_codebook.py``).

* ``B``: uint8 ``(N, ceil(K * bits / 8))``, the layout of ``bayesq_uniform`` (layout.h);
* ``scales``: float16 ``(N, G)``, ``G = ceil(K / block)`` (``block = 0``: one per row);
* ``codebook``: float16 ``(2**bits,)``.

No op of its own: the graph multiplies scales and levels into the per-group codebooks of
``bayesq.MatMulLut`` / ``DequantizeLut`` / ``GatherLut`` (a float32 ``(N, G, 2**bits)`` tensor that
onnxruntime folds once when it loads the model) and those ops decode the codes (``self.lut``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Format
from .bayesq_lut import BayesqLut, LutCodes
from .bayesq_uniform import check_bayesq, col_bytes, groups, pack_codes, round_values, unpack_codes


def scaled_table(scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The per-group codebooks the runtime computes, float32 ``(rows, G, 2**bits)``: each stored scale
    times each stored level in float32 (one correctly rounded product, as the graph's ``Mul``)."""
    return np.asarray(scale, np.float32)[:, :, None] * np.asarray(levels, np.float32)[None, None, :]


@dataclass(frozen=True)
class ScaledLutCodes(LutCodes):
    """``LutCodes`` whose ``lut`` is ``scale[r, g] * levels`` (float32, as the runtime computes it)."""

    scale: np.ndarray | None = None    # float32 (rows, G), fp16-exact
    levels: np.ndarray | None = None   # float32 (2**bits,), fp16-exact

    @classmethod
    def of(cls, codes: np.ndarray, scale: np.ndarray, levels: np.ndarray, bits: int, block: int,
           gptq_objective: float | None = None) -> "ScaledLutCodes":
        return cls(codes, scaled_table(scale, levels), bits, block, gptq_objective, np.asarray(scale, np.float32),
                   np.asarray(levels, np.float32))


@dataclass(frozen=True)
class BayesqScaledLut(Format):
    bits: int
    block: int   # 0: one scale per row

    def __post_init__(self):
        check_bayesq(self.bits, self.block)

    @property
    def name(self) -> str:
        return f"bq-nf{self.bits}-g{self.block or 'row'}-f16"   # its scales and levels are fp16

    @property
    def lut(self) -> BayesqLut:
        """The format whose op decodes this one, once the graph has made its float32 codebooks."""
        return BayesqLut(self.bits, self.block, "float32")

    def stored_bits(self, rows: int, L: int) -> int:
        return 8 * rows * col_bytes(L, self.bits) + 16 * rows * groups(L, self.block) + 16 * (1 << self.bits)

    def round_scales(self, scale: np.ndarray) -> np.ndarray:
        """float32 scales exactly as stored (fp16-rounded): round them before assigning codes."""
        return round_values(scale, "float16", "scales")

    def pack(self, q: ScaledLutCodes) -> dict[str, np.ndarray]:
        assert q.bits == self.bits and q.block == self.block, (q.bits, q.block, self)
        rows, L = q.codes.shape
        scales, levels = q.scale.astype(np.float16), q.levels.astype(np.float16)
        if scales.shape != (rows, groups(L, self.block)) or levels.shape != (1 << self.bits,):
            raise ValueError(f"{self.name}: scales {scales.shape} / codebook {levels.shape} do not fit a "
                             f"({rows}, {L}) view")
        if not (np.array_equal(scales.astype(np.float32), q.scale) and np.array_equal(levels.astype(np.float32), q.levels)):
            raise ValueError(f"{self.name}: scales and levels must be fp16 values (round them before the codes)")
        return {"B": pack_codes(q.codes, self.bits), "scales": scales, "codebook": levels}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> ScaledLutCodes:
        scale = np.asarray(packed["scales"], np.float32).reshape(rows, groups(L, self.block))
        return ScaledLutCodes.of(unpack_codes(packed["B"], L, self.bits), scale,
                                 np.asarray(packed["codebook"], np.float32), self.bits, self.block)
