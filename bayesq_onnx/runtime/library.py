"""Where the built ``libbayesq_ops.so`` is (``custom_ops/``), without importing onnxruntime: the
custom ops (``custom_ops.py``) and the native codebook fit (``quantize/codebook_native.py``) both
load it; and ``libbayesq_cuda.so``, which ``cuda.py`` loads."""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

LIB_NAME = "libbayesq_ops.so"


def library_path(name: str = LIB_NAME, env: str = "BAYESQ_CUSTOM_OPS_LIB") -> Path | None:
    """A built library's path: ``name`` beside this file, or the build ``$env`` names; None when it
    was not built.  The CUDA kernels' (``runtime/cuda.py``) are found the same way."""
    named = os.environ.get(env)
    if named:
        return Path(named) if Path(named).is_file() else None
    p = Path(__file__).with_name(name)
    return p if p.is_file() else None


@functools.lru_cache(maxsize=None)
def load(path: Path) -> ctypes.CDLL:
    """The library loaded once per path (ctypes releases the GIL during each call into it)."""
    return ctypes.CDLL(str(path))
