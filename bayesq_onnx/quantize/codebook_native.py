"""ctypes binding of the native codebook fits in ``libbayesq_ops.so``: the Lloyd-Max of ``codebook.py``
group by group (``custom_ops/src/codebook.cpp``), on the grouped, padded float64 chunks that module
prepares (inputs are checked there), and the scale search of ``scaled_codebook.py``
(``custom_ops/src/scaled_codebook.cpp``).  The calls release the GIL, so sites fitted on two threads
use two cores.  ``BAYESQ_CODEBOOK=numpy`` forces the numpy implementations, which also run when the
library was not built (or predates these entry points)."""
from __future__ import annotations

import ctypes
import os

import numpy as np

from ..errors import BayesQError
from ..runtime.library import library_path, load

START = {"given": 0, "kmeans": 1, "quantile": 2}   # codebook.cpp's `start` argument

_F64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
_F32 = ctypes.c_void_p   # float32 rows with a row stride: checked by the caller
_I64, _I32, _D = ctypes.c_int64, ctypes.c_int32, ctypes.c_double


def library() -> ctypes.CDLL | None:
    """The library with its codebook entry points, or None (numpy then does the work)."""
    mode = os.environ.get("BAYESQ_CODEBOOK", "")
    if mode not in ("", "numpy"):
        raise BayesQError(f"BAYESQ_CODEBOOK must be 'numpy' or unset, got {mode!r}")
    p = None if mode == "numpy" else library_path()
    if p is None:
        return None
    lib = load(p)
    if not hasattr(lib, "BayesqCodebookFit"):
        return None
    if lib.BayesqCodebookFit.argtypes is None:
        lib.BayesqCodebookFit.argtypes = [
            _I64, _I64, _I32, _F64, _F64, _F64, np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS"), _I32,
            ctypes.c_void_p, _I32, _D, _I64, _I32, _D, _F64]
        lib.BayesqCodebookLoss.argtypes = [_I64, _I64, _I32, _F64, _F64, _F64, _F64, _D, _F64]
        if hasattr(lib, "BayesqScaledFitScales"):
            lib.BayesqScaledFitScales.argtypes = [_I64, _I64, _I64, _F32, _I64, _F32, _I64, _I32, _F32, _F64, _I32,
                                                  _I32, _F64]
    return lib


def fit(lib, mu, sig, w, valid, levels: int, start: str, init, alt, *, iters: int, tol: float, dp_bins: int,
        kmeans_rounds: int, z_lloyd: float) -> np.ndarray:
    """Codebooks ``(g, levels)`` float64 (float32 values, sorted) of one chunk ``(g, block)``:
    ``start`` a key of ``START``; ``init`` the levels for ``"given"``; ``alt`` the second start
    ``"auto"`` rates in the first round, or None."""
    g, B = mu.shape
    c = np.zeros((g, levels)) if init is None else np.array(init, np.float64, order="C", copy=True)
    alt = None if alt is None else np.ascontiguousarray(alt, np.float64)
    rc = lib.BayesqCodebookFit(g, B, levels, mu, sig, w, np.ascontiguousarray(valid).view(np.uint8), START[start],
                               None if alt is None else alt.ctypes.data, iters, tol, dp_bins, kmeans_rounds,
                               z_lloyd, c)
    if rc:
        raise BayesQError("codebook: the native Lloyd-Max failed (out of memory, or a z cut past 7 sigma)")
    return c


def loss(lib, mu, sig, w, codebook, z_cut: float) -> np.ndarray:
    """``sum_i weight_i E[(Q(w_i) - w_i)^2]`` per group of one chunk, float64 ``(g,)``."""
    g, B = mu.shape
    out = np.empty(g)
    if lib.BayesqCodebookLoss(g, B, codebook.shape[1], mu, sig, w, np.ascontiguousarray(codebook, np.float64),
                              z_cut, out):
        raise BayesQError("codebook: the native expected loss failed (out of memory, or a z cut past 7 sigma)")
    return out


def _rows(a: np.ndarray) -> tuple[np.ndarray, int]:
    """A float32 ``(rows, L)`` array as the native code reads it: unit element stride, and the row
    stride in elements (0 for one row broadcast to all); copied only where the layout needs it."""
    if a.strides[1] != 4 or a.strides[0] % 4 or a.strides[0] < 0:
        a = np.ascontiguousarray(a)
    return a, a.strides[0] // 4


def fit_scales(lib, mu: np.ndarray, w: np.ndarray, levels: np.ndarray, scale: np.ndarray, block: int,
               multiples: np.ndarray, ls_steps: int) -> np.ndarray | None:
    """``scaled_codebook._fit_scales`` natively: the new ``(rows, G)`` float64 scales, or None where the
    library predates it."""
    if not hasattr(lib, "BayesqScaledFitScales"):
        return None
    (mu, ms), (w, ws) = _rows(mu), _rows(w)
    levels = np.ascontiguousarray(levels, np.float32)
    out = np.array(scale, np.float64, order="C", copy=True)
    multiples = np.ascontiguousarray(multiples, np.float64)
    rows, L = mu.shape
    if lib.BayesqScaledFitScales(rows, L, block, mu.ctypes.data, ms, w.ctypes.data, ws, len(levels),
                                 levels.ctypes.data, multiples, len(multiples), ls_steps, out):
        raise BayesQError("scaled codebook: the native scale search failed (bad sizes or out of memory)")
    return out
