"""Where GPTQ's error feedback runs: numpy on the CPU (no torch needed), or torch on a GPU.

The column loop (rounding.error_feedback) is written once against the few operations below, so
both backends run the same arithmetic.  Each repeats its own bytes -- numpy whatever the BLAS thread
count (BLAS splits a product over its output, not over the at most 128 terms each entry sums here;
tests/test_gptq_backends.py checks it), torch on one GPU run to run -- but the two differ in the
last bits of their sums, so a weight within ~1e-7 of a rounding threshold may round differently.
"""
from __future__ import annotations

import numpy as np

from ..config import DEVICES
from ..errors import BayesQError


class NumpyBackend:
    name = "cpu"

    def put(self, a, dtype) -> np.ndarray:
        """``a`` as a fresh C-ordered array of ``dtype`` (the loop writes into it; the library reads it)."""
        return np.array(a, dtype, order="C")

    def get(self, a) -> np.ndarray:
        return np.asarray(a)

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def affine_codes(self, w, scale, zp, qmax: int):
        """Nearest code of each weight on its grid (the reference's ``quantize``: divide, round half
        to even, shift, clip) and the value it stands for."""
        q = np.rint(w / scale)
        q += zp
        np.clip(q, 0, qmax, out=q)
        return q, (q - zp) * scale

    def nearest_level(self, w, thr, lev):
        """Index of the nearest level (the number of thresholds below ``w``; a tie goes to the lower
        level) and the level, per row: ``thr`` (K-1, rows), ``lev`` (rows, K).  One comparison per
        threshold, each a contiguous row: GPTQ asks once per column, and a (rows, K-1) mask counted
        along its rows took 2.6x as long at 4 levels on 768 rows (21 against 8 us), 4x on 2048, 1.7x
        at 8 levels, as long at 16."""
        k = np.zeros(w.shape, np.intp)
        for t in thr:
            k += t < w
        K = lev.shape[1]
        return k, lev.reshape(-1)[np.arange(0, K * len(w), K) + k]


class TorchBackend:
    def __init__(self, device):
        import torch
        self.device = torch.device(device)
        self.name = str(self.device)

    @property
    def torch(self):   # not an attribute: a module does not pickle (Ray ships quantizers)
        import torch
        return torch

    def _dtype(self, dtype):
        return {np.dtype(np.float32): self.torch.float32, np.dtype(np.float64): self.torch.float64,
                np.dtype(np.uint8): self.torch.uint8, np.dtype(np.int64): self.torch.int64}[np.dtype(dtype)]

    def put(self, a, dtype):
        if isinstance(a, self.torch.Tensor):
            return a.to(self.device, self._dtype(dtype), copy=True)
        return self.torch.tensor(np.asarray(a, dtype), device=self.device)

    def get(self, a) -> np.ndarray:
        return a.cpu().numpy() if isinstance(a, self.torch.Tensor) else np.asarray(a)

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=self._dtype(dtype), device=self.device)

    def affine_codes(self, w, scale, zp, qmax: int):
        q = self.torch.round(w / scale)        # round half to even, as np.rint
        q += zp
        q.clamp_(0, qmax)
        return q, (q - zp) * scale

    def nearest_level(self, w, thr, lev):
        k = (thr < w[None, :]).sum(dim=0)
        return k, lev.gather(1, k[:, None])[:, 0]


NUMPY = NumpyBackend()


def backend(device: str = "cpu"):
    """The backend for a recipe's ``device``: ``"cpu"`` numpy; ``"cuda"`` torch on the GPU (a clear
    error without one); ``"auto"`` cuda when torch sees a GPU, else cpu."""
    if device not in DEVICES:
        raise BayesQError(f"unknown device {device!r}; choose from {list(DEVICES)}")
    if device == "cpu":
        return NUMPY
    try:
        import torch
    except ImportError:
        if device == "auto":
            return NUMPY
        raise BayesQError("--device cuda needs torch (pip install torch)") from None
    if torch.cuda.is_available():
        return TorchBackend("cuda")
    if device == "auto":
        return NUMPY
    raise BayesQError("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
