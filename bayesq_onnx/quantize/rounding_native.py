"""ctypes binding of GPTQ's native column loop in ``libbayesq_ops.so`` (``custom_ops/src/gptq.cpp``):
the columns of one sub-block of :func:`rounding.error_feedback`, numpy's arithmetic operation by
operation (the same codes and errors bit for bit, tested).  The numpy loop is the reference and
runs where the library was not built (or predates this entry point)."""
from __future__ import annotations

import ctypes

import numpy as np

from ..runtime.library import library_path, load

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


def library() -> ctypes.CDLL | None:
    """The library with its column loop, or None (numpy then runs the loop)."""
    p = library_path()
    if p is None:
        return None
    lib = load(p)
    if not hasattr(lib, "BayesqGptqColumns"):
        return None
    if lib.BayesqGptqColumns.argtypes is None:
        lib.BayesqGptqColumns.argtypes = [_I64, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I32, _I32, _P, _P, _P]
    return lib


def usable(*arrays: np.ndarray) -> bool:
    """Whether the loop's arrays are as the native code reads them: C-contiguous numpy arrays."""
    return all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)


def columns(lib, W: np.ndarray, U: np.ndarray, c0: int, err: np.ndarray, codes: np.ndarray, group: np.ndarray,
            kind: int, qmax_or_k: int, a: np.ndarray, b: np.ndarray, keep: np.ndarray | None) -> None:
    """Round the sub-block's columns ``c0 .. c0 + len(W) - 1`` (rounding order): ``W`` (n, rows) their
    weights, updated in place; ``err`` and ``codes`` (n, rows) written; ``U`` the whole factor (float32, any
    positive strides);
    ``group`` and ``keep`` (None, or 1/0 per weight) already cut to the sub-block."""
    n, rows = W.shape
    sr, sc = U.strides
    if lib.BayesqGptqColumns(n, rows, W.ctypes.data, U.ctypes.data + c0 * (sr + sc), sr // 4, sc // 4, err.ctypes.data,
                             codes.ctypes.data, group.ctypes.data, kind, qmax_or_k, a.ctypes.data, b.ctypes.data,
                             None if keep is None else keep.ctypes.data):
        raise ValueError("GPTQ: the native column loop rejected its arguments")
