"""``bayesq.MatMulAffine``: any-bit (1..8) affine codes in the ``bayesq`` custom-op layout.

The layout is defined once, in ``custom_ops/include/bayesq/layout.h``; in short: the view ``(N, K)``
(``W^T`` for a MatMul) is packed row by row in exactly ``ceil(K * bits / 8)`` bytes (no padding to
4 or 8 bits: 3-, 5- and 6-bit codes are dense).  Along K a row is cut into chunks of 16 lanes x 8
steps (lane l, step i holds code ``k0 + 16*i + l``); a last chunk of ``(K % 128) // 8`` lanes and a
1-lane chunk of ``K % 8`` codes take the rest.  Each lane's 8 codes form a ``8*bits``-bit
little-endian word whose bytes are split into planes of 4, 2 and 1 bytes with the lanes of a plane
contiguous, so a SIMD kernel gets every lane's word with one or two zero-extending loads.

* ``B``: uint8 ``(N, ceil(K * bits / 8))``;
* ``scales``: float32 or float16 (``scale_dtype``) ``(N, G)``, ``G = ceil(K / block)``;
* ``zero_points``: uint8 ``(N, ceil(G * bits / 8))``, each row LSB-first (like MatMulNBits);
* ``W[k, n] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]`` in fp32 (float16 scales are
  widened exactly to fp32 first).

float16 scales (``scale_dtype="float16"``, name suffix ``-f16``) halve the scale cost (0.5 -> 0.25
bits/weight at group 64).  ``pack`` rounds the scales to fp16, so a quantizer that computes codes must
round its grid first (``fmt.round_scales(scale)``, or ``fmt.stored_codes(q)`` for the whole codes
object): codes chosen against fp32 scales are otherwise dequantized with slightly different scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BayesQError
from .base import Format, UniformCodes

LANES, STEPS = 16, 8
CHUNK = LANES * STEPS
_ROWS_PER_PASS = 512   # bounds the packer's temporaries (a uint64 word per 8 codes)


def groups(L: int, block: int) -> int:
    """Number of groups along L; ``block = 0`` means one group per row."""
    return -(-L // block) if block > 0 else 1


def group_index(L: int, block: int) -> np.ndarray:
    """Group of each position along L (int64 ``(L,)``)."""
    k = np.arange(L, dtype=np.int64)
    return k // block if block > 0 else np.zeros(L, np.int64)


def col_bytes(K: int, bits: int) -> int:
    return -(-K * bits // 8)


def check_bayesq(bits: int, block: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bayesq bits must be 1..8, got {bits}")
    if block < 0 or block % 16:
        raise ValueError(f"bayesq block must be 0 (one group per row) or a multiple of 16, got {block}")


SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


def check_scale_dtype(scale_dtype: str) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"bayesq scale_dtype must be 'float32' or 'float16', got {scale_dtype!r}")


def store_values(values: np.ndarray, scale_dtype: str, what: str) -> np.ndarray:
    """``values`` (scales or LUT levels) as stored: fp32 first (the fp32 grid the quantizer used), then
    rounded to nearest-even fp16 when ``scale_dtype == "float16"``; beyond fp16's range is an error."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if scale_dtype == "float32":
        return v
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    bad = ~np.isfinite(h) & np.isfinite(v)
    if bad.any():
        raise BayesQError(f"bayesq float16 {what}: {float(np.abs(v[bad]).max()):.6g} exceeds the float16 "
                          f"range (65504); use scale_dtype='float32'")
    if what == "scales":
        # a positive scale below fp16's least subnormal (2**-24: a group of ~1e-7 weights) would
        # round to 0, a grid with no step; keep the least positive step instead
        h[(h == 0) & (v > 0)] = np.float16(2.0**-24)
    return h


def round_values(values: np.ndarray, scale_dtype: str, what: str) -> np.ndarray:
    """float32 copy of ``values`` holding exactly what the runtime will use after storage."""
    return store_values(values, scale_dtype, what).astype(np.float32)


def plane_widths(lane_bytes: int) -> list[int]:
    """A lane word's bytes cut greedily into pieces of 4, 2 and 1 bytes (layout.h)."""
    out = []
    while lane_bytes > 0:
        w = 4 if lane_bytes >= 4 else 2 if lane_bytes >= 2 else 1
        out.append(w)
        lane_bytes -= w
    return out


def chunks(K: int) -> list[tuple[int, int, int]]:
    """``(k0, lanes, steps)`` of a row's chunks, in storage order; full chunks as one entry per chunk."""
    full, r = divmod(K, CHUNK)
    out = [(c * CHUNK, LANES, STEPS) for c in range(full)]
    if r >= STEPS:
        out.append((full * CHUNK, r // STEPS, STEPS))
    if K % STEPS:
        out.append((K - K % STEPS, 1, K % STEPS))
    return out


def _pack_chunk(c: np.ndarray, bits: int) -> np.ndarray:
    """``c``: (batch, steps, lanes) codes -> (batch, lanes * lane_bytes) bytes in plane order.  A
    lane's word (at most 8 steps of 8 bits) is built in a little-endian uint64, step ``i`` at bit
    ``i * bits``, and its low bytes are the lane word."""
    n, S, L = c.shape
    nb = -(-S * bits // 8)
    w = np.zeros((n, L), "<u8")
    for i in range(S):
        w |= c[:, i, :].astype("<u8") << np.uint64(i * bits)
    words = w.view(np.uint8).reshape(n, L, 8)[:, :, :nb]
    out, s = [], 0
    for width in plane_widths(nb):
        out.append(words[:, :, s:s + width].reshape(n, L * width))
        s += width
    return np.concatenate(out, axis=1)


def _unpack_chunk(data: np.ndarray, bits: int, S: int, L: int) -> np.ndarray:
    """Inverse of :func:`_pack_chunk`: (batch, L * lane_bytes) bytes -> (batch, S, L) codes."""
    n = data.shape[0]
    nb = -(-S * bits // 8)
    words, s, off = np.zeros((n, L, 8), np.uint8), 0, 0
    for width in plane_widths(nb):
        words[:, :, s:s + width] = data[:, off:off + L * width].reshape(n, L, width)
        off += L * width
        s += width
    w = words.view("<u8")[:, :, 0]
    mask = np.uint64((1 << bits) - 1)
    codes = np.empty((n, S, L), np.uint8)
    for i in range(S):
        codes[:, i, :] = (w >> np.uint64(i * bits)) & mask
    return codes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, K) codes < 2**bits -> uint8 (rows, ceil(K * bits / 8)) in the bayesq layout."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (rows, K), got shape {codes.shape}")
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    codes = codes.astype(np.uint8)
    rows, K = codes.shape
    out = np.empty((rows, col_bytes(K, bits)), np.uint8)
    full = K // CHUNK
    for r0 in range(0, rows, _ROWS_PER_PASS):
        c = codes[r0:r0 + _ROWS_PER_PASS]
        n = c.shape[0]
        parts = []
        if full:
            body = c[:, :full * CHUNK].reshape(n * full, STEPS, LANES)
            parts.append(_pack_chunk(body, bits).reshape(n, -1))
        for k0, L, S in chunks(K)[full:]:
            parts.append(_pack_chunk(c[:, k0:k0 + L * S].reshape(n, S, L), bits))
        out[r0:r0 + n] = np.concatenate(parts, axis=1) if parts else np.empty((n, 0), np.uint8)
    return out


def unpack_codes(packed: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 (rows, K) codes."""
    packed = np.asarray(packed, np.uint8)
    rows = packed.shape[0]
    if packed.shape != (rows, col_bytes(K, bits)):
        raise ValueError(f"packed codes must be ({rows}, {col_bytes(K, bits)}) for K={K}, bits={bits}, "
                         f"got {packed.shape}")
    out = np.empty((rows, K), np.uint8)
    full = K // CHUNK
    if full:
        body = packed[:, :full * CHUNK * bits // 8].reshape(rows * full, LANES * bits)
        out[:, :full * CHUNK] = _unpack_chunk(body, bits, STEPS, LANES).reshape(rows, full * CHUNK)
    for k0, L, S in chunks(K)[full:]:
        b0 = k0 * bits // 8
        nbytes = L * -(-S * bits // 8)
        out[:, k0:k0 + L * S] = _unpack_chunk(packed[:, b0:b0 + nbytes], bits, S, L).reshape(rows, L * S)
    return out


def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Plain LSB-first bit stream per row (zero points): (rows, n) -> (rows, ceil(n * bits / 8))."""
    v = np.asarray(values, np.uint8)
    b = (v[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(b.reshape(v.shape[0], -1), axis=-1, bitorder="little")


def unpack_stream(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    b = np.unpackbits(np.asarray(packed, np.uint8), axis=-1, bitorder="little")[:, :n * bits]
    b = b.reshape(b.shape[0], n, bits)
    return np.bitwise_or.reduce(b << np.arange(bits, dtype=np.uint8), axis=-1).astype(np.uint8)


@dataclass(frozen=True)
class BayesqUniform(Format):
    """Affine codes of any width 1..8 (``bayesq.MatMulAffine`` / ``bayesq.DequantizeAffine``);
    scales stored as ``scale_dtype`` ("float32" or "float16")."""

    bits: int
    block: int
    scale_dtype: str = "float32"

    def __post_init__(self):
        check_bayesq(self.bits, self.block)
        check_scale_dtype(self.scale_dtype)
        if self.block == 0:   # UniformCodes groups by k // block; a row is block >= L
            raise ValueError("BayesqUniform block must be a positive multiple of 16")

    @property
    def name(self) -> str:
        return f"bq-u{self.bits}-g{self.block}" + ("-f16" if self.scale_dtype == "float16" else "")

    def stored_bits(self, rows: int, L: int) -> int:
        g = groups(L, self.block)
        sbytes = np.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        return 8 * rows * (col_bytes(L, self.bits) + sbytes * g + -(-g * self.bits // 8))

    def round_scales(self, scale: np.ndarray) -> np.ndarray:
        """float32 scales exactly as stored and used by the runtime (fp16-rounded for float16): round
        the grid with this before choosing codes."""
        return round_values(scale, self.scale_dtype, "scales")

    def stored_codes(self, q: UniformCodes) -> UniformCodes:
        """``q`` with its scales replaced by the stored ones (``unpack(pack(q))`` without the packing):
        its ``dequantize()`` is what the runtime computes."""
        return UniformCodes(codes=q.codes, scale=self.round_scales(q.scale), zero_point=q.zero_point,
                            bits=q.bits, block=q.block)

    def pack(self, q: UniformCodes) -> dict[str, np.ndarray]:
        assert q.bits == self.bits and q.block == self.block, (q.bits, q.block, self)
        rows, L = q.codes.shape
        g = groups(L, self.block)
        return {"B": pack_codes(q.codes, self.bits),
                "scales": store_values(q.scale, self.scale_dtype, "scales").reshape(rows, g),
                "zero_points": pack_stream(np.asarray(q.zero_point).reshape(rows, g), self.bits)}

    def unpack(self, packed: dict[str, np.ndarray], rows: int, L: int) -> UniformCodes:
        g = groups(L, self.block)
        return UniformCodes(codes=unpack_codes(packed["B"], L, self.bits),
                            scale=np.asarray(packed["scales"], np.float32).reshape(rows, g),
                            zero_point=unpack_stream(packed["zero_points"], self.bits, g),
                            bits=self.bits, block=self.block)


def code_positions(K: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each code of a packed row sits: ``(lo, hi, shift)``, int64 ``(K,)`` each, such that
    ``code[k] = ((row[lo] | row[hi] << 8) >> shift) & (2**bits - 1)`` (a code spans at most two
    bytes; ``hi == lo`` when it fits in one).  Used to unpack with standard ONNX ops (lower/portable.py)."""
    lo, hi, shift = (np.empty(K, np.int64) for _ in range(3))
    for k0, L, S in chunks(K):
        nb = -(-S * bits // 8)
        widths, offs, o = plane_widths(nb), [], 0   # byte j of lane l -> chunk offset (layout.h)
        for w in widths:
            offs.append(o)
            o += L * w
        byte_of = np.empty((nb, L), np.int64)
        j = 0
        for w, off in zip(widths, offs):
            for t in range(w):
                byte_of[j] = off + np.arange(L) * w + t
                j += 1
        k = np.arange(k0, k0 + L * S)
        lane, step = (k - k0) % L, (k - k0) // L
        bit = step * bits
        b0 = k0 * bits // 8
        lo[k] = b0 + byte_of[bit // 8, lane]
        spans = bit % 8 + bits > 8
        hi[k] = np.where(spans, b0 + byte_of[np.minimum(bit // 8 + 1, nb - 1), lane], lo[k])
        shift[k] = bit % 8
    return lo, hi, shift


def stream_positions(n: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``code_positions`` for a plain LSB-first bit stream of ``n`` elements (zero points)."""
    bit = np.arange(n, dtype=np.int64) * bits
    lo = bit // 8
    hi = np.where(bit % 8 + bits > 8, lo + 1, lo)
    return lo, hi, bit % 8
