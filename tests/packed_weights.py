"""Random packed weights for the kernel tests (numpy only: tests/test_cuda.py runs where onnx may not be)."""
from __future__ import annotations

import numpy as np

from bayesq_onnx.formats import BayesqLut, BayesqUniform, LutCodes, UniformCodes
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
