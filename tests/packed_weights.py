"""Random packed weights for the kernel tests (numpy only: tests/test_cuda.py runs where onnx may not be)."""
from __future__ import annotations

import numpy as np

from bayesq_onnx.formats import BayesqLut, BayesqSparse, BayesqUniform, LutCodes, SparseCodes, UniformCodes
from bayesq_onnx.formats.bayesq_sparse import top_mask
from bayesq_onnx.formats.bayesq_uniform import groups


def weight(kind, bits, K, N, block, seed, scale_dtype="float32"):
    """(format, packed arrays, V (N, K) float32 as the packers decode it, |zp * s| per weight: the affine
    CPU kernels sum a * q per group and subtract zp * s * sum(a) apart, so their rounding bound has it)."""
    rng = np.random.default_rng(seed)
    G = groups(K, block)
    codes = rng.integers(0, 1 << bits, (N, K), dtype=np.uint8)
    if kind == "lut":
        q = LutCodes(codes=codes, lut=rng.standard_normal((N, G, 1 << bits)).astype(np.float32), bits=bits, block=block)
        fmt = BayesqLut(bits, block, scale_dtype)
        zs = np.zeros((N, K))
    else:
        q = UniformCodes(codes=codes, scale=rng.uniform(0.01, 0.2, (N, G)).astype(np.float32),
                         zero_point=rng.integers(0, 1 << bits, (N, G), dtype=np.uint8), bits=bits, block=block)
        fmt = BayesqUniform(bits, block, scale_dtype)
        g = np.arange(K) // block
        zs = np.abs(q.zero_point[:, g] * q.scale[:, g].astype(np.float64))
    q = fmt.stored_codes(q)                      # scales / levels as stored (fp16-rounded for float16)
    return fmt, fmt.pack(q), q.dequantize().astype(np.float32), zs


def sparse_weight(keep, of, bits, block, N, K, seed, scale_dtype="float32"):
    """A random N:M sparse weight: its format, codes, packed arrays and the plain-numpy view (N, K)."""
    rng = np.random.default_rng(seed)
    fmt = BayesqSparse(keep, of, bits, block, scale_dtype)
    mask = top_mask(rng.standard_normal((N, K)), keep, of)
    Kc, g = K * keep // of, groups(K, block)
    inner = UniformCodes(rng.integers(0, 1 << bits, (N, Kc), dtype=np.uint8),
                         rng.uniform(0.01, 0.2, (N, g)).astype(np.float32),
                         rng.integers(0, 1 << bits, (N, g), dtype=np.uint8), bits, fmt.inner_block)
    q = SparseCodes(mask, inner, keep, of)
    return fmt, q, fmt.pack(q), fmt.stored_codes(q).dequantize()
