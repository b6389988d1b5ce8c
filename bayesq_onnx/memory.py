"""Giving freed memory back to the system.  glibc's malloc keeps what a thread frees in that
thread's arena for reuse, and with onnxruntime's threads and ours each holding an arena, a pass
that makes and drops large tensors (a language model's logits, a block's activations) leaves
hundreds of MB resident that nothing uses: on SmolLM2, 0.9 of the 1.6 GB RssAnon after the
reference outputs of the loss tables were made.  ``malloc_trim`` returns it; the passes call
:func:`release` between blocks.  Elsewhere (no glibc) this does nothing."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):   # musl and other libcs have no malloc_trim
        _trim = None


def release() -> None:
    """Return the free memory of every malloc arena to the system (a few ms)."""
    if _trim is not None:
        _trim(0)
