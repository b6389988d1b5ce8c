"""Stored weight formats (see base.py for the view convention)."""
from .base import Format, UniformCodes, n_groups
from .bayesq_lut import BayesqLut, LutCodes
from .bayesq_scaled_lut import BayesqScaledLut, ScaledLutCodes
from .bayesq_sparse import BayesqSparse, SparseCodes
from .bayesq_uniform import BayesqUniform
from .blocked_dq import BlockedDequantize
from .float32 import Float32
from .gather_block import GatherBlockQuantized
from .matmulnbits import MatMulNBits, pack_bits, unpack_bits

__all__ = ["Format", "UniformCodes", "n_groups", "MatMulNBits", "BlockedDequantize",
           "GatherBlockQuantized", "Float32", "pack_bits", "unpack_bits", "BayesqUniform", "BayesqLut", "LutCodes",
           "BayesqScaledLut", "ScaledLutCodes", "CODEBOOKS",
           "BayesqSparse", "SparseCodes"]

# the formats whose codes index levels fitted by Lloyd-Max (not an affine grid): the knapsack's alone
CODEBOOKS = (BayesqLut, BayesqScaledLut)
