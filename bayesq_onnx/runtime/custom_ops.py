"""The `bayesq` custom-op library (``custom_ops/``, built by the package install): where it is and
how a session gets it.

    register(so)    # session.session_options() (and so make_session) does this for every session

``$BAYESQ_CUSTOM_OPS_LIB`` names another build (a path to ``libbayesq_ops.so``).  Without the
library, models with ``bayesq`` ops do not load; models lowered with ``--target portable`` and all
native formats still do.  Where nvcc built the CUDA kernels too, ``libbayesq_ops_cuda.so`` beside it
has the same CPU ops plus all of them for onnxruntime's ``CUDAExecutionProvider``: sessions
whose providers include that one register it instead (``register(so, providers)``).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import onnxruntime as ort

from ..errors import BayesQError
from .library import LIB_NAME, library_path, load

DOMAIN = "bayesq"
CUDA_LIB_NAME = "libbayesq_ops_cuda.so"
CUDA_PROVIDER = "CUDAExecutionProvider"


def unavailable_reason() -> str | None:
    """None when the library is there; else one line saying why not."""
    env = os.environ.get("BAYESQ_CUSTOM_OPS_LIB")
    if env:
        return None if Path(env).is_file() else f"BAYESQ_CUSTOM_OPS_LIB={env} is not a file"
    if library_path() is None:
        return (f"{Path(__file__).with_name(LIB_NAME)} was not built (reinstall with `pip install -e .`; "
                f"needs cmake and a C++ compiler)")
    return None


def available() -> bool:
    return library_path() is not None


def cuda_library_path() -> Path | None:
    """``libbayesq_ops_cuda.so`` of the same build as :func:`library_path`'s library (beside it), or None
    where it was not built (no nvcc)."""
    p = library_path()
    p = p.with_name(CUDA_LIB_NAME) if p is not None else None
    return p if p is not None and p.is_file() else None


def wants_cuda(providers) -> bool:
    """Whether ``providers`` (names or ``(name, options)`` pairs, as onnxruntime takes them) include CUDA's."""
    return any((q[0] if isinstance(q, (tuple, list)) else q) == CUDA_PROVIDER for q in providers or ())


def register(so: ort.SessionOptions, providers=None) -> bool:
    """Register the library with ``so`` if it was built; returns whether it was.  Where ``providers``
    want CUDA (:func:`wants_cuda`), the build with the CUDA ops if there is one: its CPU ops serve nodes
    left on the CPU."""
    p = (wants_cuda(providers) and cuda_library_path()) or library_path()
    if p is None:
        return False
    so.register_custom_ops_library(str(p))
    return True


def require() -> Path:
    """The library's path, or a BayesQError saying why there is none."""
    p = library_path()
    if p is None:
        raise BayesQError(f"the bayesq custom-op library is needed: {unavailable_reason()}")
    return p


def kernel_isa() -> str:
    """The kernels a session created now uses: ``avx512``, ``avx2``, ``neon`` or ``scalar`` (``$BAYESQ_ISA``
    forces one; the library reads it when a session creates its kernels)."""
    lib = load(require())
    lib.BayesqKernelIsa.restype = ctypes.c_char_p
    return lib.BayesqKernelIsa().decode()
