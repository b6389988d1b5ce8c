"""``bayesq.MatMulSparseAffine``: N:M structured sparsity with affine codes for the survivors.

Along the reduction axis, every run of ``of`` consecutive weights keeps ``keep`` of them (2:4, 4:8,
6:8, ...); the others are exactly 0.  Which ones survive is the run's *pattern*: its index among the
``C(of, keep)`` subsets in lexicographic order (``itertools.combinations``), stored in
``ceil(log2 C(of, keep))`` bits -- 3 bits per 4 weights for 2:4, 7 per 8 for 4:8 -- cheaper than a
bitmap (``of`` bits) or per-survivor positions (``keep * log2(of)`` bits).  The survivors, in order,
form a *compacted* view ``(N, K * keep / of)`` stored exactly as ``bayesq_uniform`` stores a dense one
(same code layout, scales and zero points), its groups being the survivors of each group of
``block`` original weights (``block * keep / of`` of them).

* ``B``: uint8 ``(N, ceil(Kc * bits / 8))``, ``Kc = K * keep / of``: the survivors' codes (layout.h);
* ``scales``: float32 or float16 ``(N, G)``, ``G = ceil(K / block)``;
* ``zero_points``: uint8 ``(N, ceil(G * bits / 8))``, LSB-first per row;
* ``mask``: uint8 ``(N, ceil(K / of * pbits / 8))``: each run's pattern index, LSB-first per row;
* ``W[k, n] = (q - zp) * scale`` of the survivor at ``k``, 0 where the pattern drops ``k``.

Requires ``K % of == 0`` and ``block % of == 0`` with ``block * keep / of`` a multiple of 16 (the
compacted view's group size, which the dense layout needs).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from .base import Format, UniformCodes
from .bayesq_uniform import (SCALE_DTYPES, BayesqUniform, check_scale_dtype, col_bytes, groups, pack_stream,
                             unpack_stream)


@functools.lru_cache(maxsize=None)
def patterns(keep: int, of: int) -> np.ndarray:
    """bool ``(C(of, keep), of)``: row ``p`` is pattern ``p``'s survivors (lexicographic subsets)."""
    out = np.zeros((math.comb(of, keep), of), bool)
    for p, kept in enumerate(itertools.combinations(range(of), keep)):
        out[p, list(kept)] = True
    out.flags.writeable = False
    return out


def pattern_bits(keep: int, of: int) -> int:
    """Bits of one run's pattern index (at least 1, so the stream rule stays one rule)."""
    return max(1, (math.comb(of, keep) - 1).bit_length())


def mask_from_patterns(index: np.ndarray, keep: int, of: int) -> np.ndarray:
    """bool ``(rows, runs * of)`` survivors of pattern indices ``(rows, runs)``."""
    rows, runs = index.shape
    return patterns(keep, of)[index].reshape(rows, runs * of)


def patterns_from_mask(mask: np.ndarray, keep: int, of: int) -> np.ndarray:
    """Inverse of :func:`mask_from_patterns`: int64 ``(rows, runs)``; every run must keep ``keep``."""
    rows, L = mask.shape
    runs = mask.reshape(rows, L // of, of)
    if not (runs.sum(axis=2) == keep).all():
        raise ValueError(f"every run of {of} must keep exactly {keep}")
    bits = runs.astype(np.int64) @ (1 << np.arange(of, dtype=np.int64))     # the run as a bitmask
    table = patterns(keep, of).astype(np.int64) @ (1 << np.arange(of, dtype=np.int64))
    order = np.argsort(table)
    return order[np.searchsorted(table[order], bits)]


def top_mask(score: np.ndarray, keep: int, of: int) -> np.ndarray:
    """bool mask keeping the ``keep`` largest ``score`` of each run of ``of`` along the last axis
    (ties: the earlier position, so the mask is a function of the scores alone)."""
    rows, L = score.shape
    runs = np.asarray(score, np.float64).reshape(rows, L // of, of)
    order = np.argsort(-runs, axis=2, kind="stable")[..., :keep]
    mask = np.zeros(runs.shape, bool)
    np.put_along_axis(mask, order, True, axis=2)
    return mask.reshape(rows, L)


@dataclass(frozen=True)
class SparseCodes:
    """Survivors ``mask`` (bool ``(rows, L)``, ``keep`` of every ``of``) and their affine codes
    ``inner`` on the compacted view ``(rows, L * keep / of)``."""

    mask: np.ndarray
    inner: UniformCodes
    keep: int
    of: int

    @property
    def bits(self) -> int:
        return self.inner.bits

    def dequantize(self) -> np.ndarray:
        out = np.zeros(self.mask.shape, np.float32)
        out[self.mask] = self.inner.dequantize().ravel()   # row-major: survivors in row order
        return out


def compact(view: np.ndarray, mask: np.ndarray, keep: int, of: int) -> np.ndarray:
    """The survivors of ``view`` in order: ``(rows, L * keep / of)``."""
    return np.asarray(view)[mask].reshape(view.shape[0], view.shape[1] * keep // of)


@dataclass(frozen=True)
class BayesqSparse(Format):
    """``keep`` of every ``of`` weights along the reduction axis, survivors in ``bits``-bit affine
    groups of ``block`` original weights (``bayesq.MatMulSparseAffine`` / ``DequantizeSparseAffine``)."""

    keep: int
    of: int
    bits: int
    block: int
    scale_dtype: str = "float32"

    def __post_init__(self):
        check_scale_dtype(self.scale_dtype)
        # of <= 8: a pattern index fits a byte (C(8, 4) = 70 patterns, 7 bits)
        if not (1 <= self.keep < self.of <= 8):
            raise ValueError(f"sparse pattern must keep 1..of-1 of at most 8, got {self.keep}:{self.of}")
        if self.block <= 0 or self.block % self.of or (self.block * self.keep // self.of) % 16:
            raise ValueError(f"sparse block must be a multiple of {self.of} whose {self.keep}:{self.of} "
                             f"survivors are a multiple of 16, got {self.block}")
        self.inner_format()   # checks bits

    @property
    def name(self) -> str:
        return f"bq-s{self.keep}of{self.of}-u{self.bits}-g{self.block}" + ("-f16" if self.scale_dtype == "float16" else "")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.of

    @property
    def inner_block(self) -> int:
        return self.block * self.keep // self.of

    def inner_format(self) -> BayesqUniform:
        """The dense format of the compacted view (what its codes, scales and zero points follow)."""
        return BayesqUniform(self.bits, self.inner_block, self.scale_dtype)

    def fits(self, L: int) -> bool:
        return L % self.of == 0

    def mask_bytes(self, L: int) -> int:
        return col_bytes(L // self.of, pattern_bits(self.keep, self.of))

    def code_bits(self, rows: int, L: int) -> int:
        return rows * (L * self.keep // self.of) * self.bits

    def stored_bits(self, rows: int, L: int) -> int:
        if not self.fits(L):
            raise ValueError(f"{self.name}: the reduction axis ({L}) is not a multiple of {self.of}")
        g = groups(L, self.block)
        sbytes = np.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        Lc = L * self.keep // self.of
        return 8 * rows * (col_bytes(Lc, self.bits) + sbytes * g + -(-g * self.bits // 8) + self.mask_bytes(L))

    def round_scales(self, scale: np.ndarray) -> np.ndarray:
        return self.inner_format().round_scales(scale)

    def stored_codes(self, q: SparseCodes) -> SparseCodes:
        return SparseCodes(q.mask, self.inner_format().stored_codes(q.inner), q.keep, q.of)

    def pack(self, q: SparseCodes) -> dict[str, np.ndarray]:
        assert (q.keep, q.of, q.inner.bits, q.inner.block) == (self.keep, self.of, self.bits, self.inner_block), \
            (q.keep, q.of, q.inner.bits, q.inner.block, self)
        out = self.inner_format().pack(q.inner)
        out["mask"] = pack_stream(patterns_from_mask(q.mask, self.keep, self.of), pattern_bits(self.keep, self.of))
        return out

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> SparseCodes:
        runs = L // self.of
        index = unpack_stream(packed["mask"], pattern_bits(self.keep, self.of), runs).astype(np.int64)
        inner = self.inner_format().unpack(packed, rows, L * self.keep // self.of)
        return SparseCodes(mask_from_patterns(index, self.keep, self.of), inner, self.keep, self.of)
