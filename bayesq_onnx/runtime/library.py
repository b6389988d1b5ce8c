"""Where the built ``libbayesq_ops.so`` is (``custom_ops/``), without importing onnxruntime: the
custom ops (``custom_ops.py``) and the native codebook fit (``quantize/codebook_native.py``) both
load it."""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

LIB_NAME = "libbayesq_ops.so"


def library_path() -> Path | None:
    """The library's path (``$BAYESQ_CUSTOM_OPS_LIB`` names another build), or None when it was
    not built."""
    env = os.environ.get("BAYESQ_CUSTOM_OPS_LIB")
    if env:
        return Path(env) if Path(env).is_file() else None
    p = Path(__file__).with_name(LIB_NAME)
    return p if p.is_file() else None


@functools.lru_cache(maxsize=None)
def load(path: Path) -> ctypes.CDLL:
    """The library loaded once per path (ctypes releases the GIL during each call into it)."""
    return ctypes.CDLL(str(path))
