"""The CUDA kernels (``libbayesq_cuda.so``, built from ``custom_ops/cuda/`` where nvcc is found) from
Python, on torch tensors in GPU memory; and their decode run on the host, which is how the CPU-only
tests check it.

    packed = {k: torch.from_numpy(v).cuda() for k, v in fmt.pack(q).items()}   # B, scales / lut, zero_points
    Y = cuda.matmul(packed, A, K=K, N=N, bits=3, block=32)                       # A @ W (+ bias)
    W = cuda.dequantize(packed, K=K, N=N, bits=3, block=32, inner=N)            # W (K, N)
    E = cuda.gather(packed, token_ids, K=K, N=N, bits=3, block=32)               # rows of a table

The packed arrays are those of ``BayesqUniform.pack`` / ``BayesqLut.pack`` (the ops' inputs).
Calls run on torch's current stream.  ``$BAYESQ_CUDA_LIB`` names another build.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from ..errors import BayesQError
from . import library

LIB_NAME = "libbayesq_cuda.so"
PATHS = {"auto": 0, "gemv": 1, "gemm": 2, "cublas": 3}   # bayesq/cuda.h


class _Weight(ctypes.Structure):
    # bq_cuda_weight of custom_ops/include/bayesq/cuda.h, field for field
    _fields_ = [("B", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zp", ctypes.c_void_p),
                ("lut", ctypes.c_void_p), ("K", ctypes.c_int64), ("N", ctypes.c_int64),
                ("block", ctypes.c_int64), ("bits", ctypes.c_int), ("is_lut", ctypes.c_int),
                ("s_half", ctypes.c_int)]


class _SparseWeight(ctypes.Structure):
    # bq_cuda_sparse_weight: the survivors' dense weight, the pattern indices, K, keep, of
    _fields_ = [("inner", _Weight), ("mask", ctypes.c_void_p), ("K", ctypes.c_int64), ("keep", ctypes.c_int),
                ("of", ctypes.c_int)]


def library_path() -> Path | None:
    return library.library_path(LIB_NAME, "BAYESQ_CUDA_LIB")


@functools.lru_cache(maxsize=None)
def _lib(path: Path) -> ctypes.CDLL:
    lib = library.load(path)
    W = ctypes.POINTER(_Weight)
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bq_cuda_matmul.argtypes = [W, vp, i64, vp, vp, i32, i32, vp]
    lib.bq_cuda_dequantize.argtypes = [W, i64, vp, i32, vp]
    lib.bq_cuda_gather.argtypes = [W, vp, i32, i64, vp, i32, vp]
    lib.bq_cuda_decode_host.argtypes = [W, vp]
    lib.bq_cuda_gemv_host.argtypes = [W, vp, i64, i32, vp]
    lib.bq_cuda_gemm_host.argtypes = [W, vp, i64, vp]
    SW = ctypes.POINTER(_SparseWeight)
    lib.bq_cuda_sparse_dequantize.argtypes = [SW, i64, vp, i32, vp]
    lib.bq_cuda_sparse_matmul.argtypes = [SW, vp, i64, vp, vp, i32, vp]
    lib.bq_cuda_sparse_decode_host.argtypes = [SW, vp]
    lib.bq_cuda_last_error.restype = ctypes.c_char_p
    return lib


def lib() -> ctypes.CDLL:
    p = library_path()
    if p is None:
        raise BayesQError(f"{Path(__file__).with_name(LIB_NAME)} was not built (needs nvcc when the package "
                          f"is installed: `pip install -e .` with CUDA's compiler on PATH)")
    return _lib(p)


def _call(rc: int) -> None:
    if rc != 0:
        raise BayesQError(f"bayesq CUDA: {lib().bq_cuda_last_error().decode()}")


def _weight(packed: dict, ptr, half, K: int, N: int, bits: int, block: int) -> _Weight:
    is_lut = "lut" in packed
    s = packed["lut" if is_lut else "scales"]
    zp = packed.get("zero_points")
    return _Weight(B=ptr(packed["B"]), scales=None if is_lut else ptr(s), zp=None if zp is None else ptr(zp),
                   lut=ptr(s) if is_lut else None, K=K, N=N, block=block, bits=bits, is_lut=int(is_lut),
                   s_half=int(half(s)))


def _host_weight(packed: dict, K: int, N: int, bits: int, block: int) -> tuple[_Weight, dict]:
    """The weight of host arrays, and the contiguous arrays it points into (alive as long as they)."""
    packed = {k: np.ascontiguousarray(v) for k, v in packed.items() if v is not None}
    return _weight(packed, lambda a: a.ctypes.data, lambda a: a.dtype == np.float16, K, N, bits, block), packed


def sparse_args(K: int, block: int, keep: int, of: int) -> tuple[int, int]:
    """The survivors' (K, block) of an N:M sparse weight of K codes in groups of ``block`` weights."""
    return K * keep // of, block * keep // of


def sparse_decode_host(packed: dict[str, np.ndarray], *, K: int, N: int, bits: int, block: int, keep: int,
                       of: int) -> np.ndarray:
    """W's view (N, K) float32 of a sparse weight (``BayesqSparse.pack``'s arrays), by the CUDA kernels'
    decode compiled for the host."""
    Kc, bc = sparse_args(K, block, keep, of)
    w, packed = _host_weight(packed, Kc, N, bits, bc)
    V = np.empty((N, K), np.float32)
    sw = _SparseWeight(w, packed["mask"].ctypes.data, K, keep, of)
    _call(lib().bq_cuda_sparse_decode_host(ctypes.byref(sw), V.ctypes.data))
    return V


def decode_host(packed: dict[str, np.ndarray], *, K: int, N: int, bits: int, block: int) -> np.ndarray:
    """V (N, K) float32 from host arrays, by the CUDA kernels' decode compiled for the host."""
    w, packed = _host_weight(packed, K, N, bits, block)
    V = np.empty((N, K), np.float32)
    _call(lib().bq_cuda_decode_host(ctypes.byref(w), V.ctypes.data))
    return V


def gemv_host(packed: dict[str, np.ndarray], A: np.ndarray, *, K: int, N: int, bits: int, block: int,
              sms: int) -> np.ndarray:
    """A (M <= 8, K) @ V^T float32 on the host by the GEMV kernel's own walk over the codes, K split as
    on a GPU of ``sms`` SMs (bayesq/cuda.h): the CPU-side test of that walk."""
    w, packed = _host_weight(packed, K, N, bits, block)
    A = np.ascontiguousarray(A, np.float32)
    Y = np.empty((A.shape[0], N), np.float32)
    _call(lib().bq_cuda_gemv_host(ctypes.byref(w), A.ctypes.data, A.shape[0], sms, Y.ctypes.data))
    return Y


def gemm_host(packed: dict[str, np.ndarray], A: np.ndarray, *, K: int, N: int, bits: int, block: int) -> np.ndarray:
    """A (M, K) @ V^T on the host from the GEMM kernel's own fp16 tiles (bayesq/cuda.h): the CPU-side
    test of how they are filled."""
    w, packed = _host_weight(packed, K, N, bits, block)
    A = np.ascontiguousarray(A, np.float32)
    Y = np.empty((A.shape[0], N), np.float32)
    _call(lib().bq_cuda_gemm_host(ctypes.byref(w), A.ctypes.data, A.shape[0], Y.ctypes.data))
    return Y


def _device_weight(packed: dict, K: int, N: int, bits: int, block: int) -> tuple[_Weight, dict]:
    import torch
    packed = {k: v.contiguous() for k, v in packed.items() if v is not None}
    for k, v in packed.items():
        if not v.is_cuda:
            raise BayesQError(f"bayesq CUDA: packed input {k} is not in GPU memory")
    return _weight(packed, lambda t: t.data_ptr(), lambda t: t.dtype == torch.float16, K, N, bits, block), packed


def _stream():
    import torch
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def matmul(packed: dict, A, *, K: int, N: int, bits: int, block: int, bias=None, path: str = "auto"):
    """A (..., K) @ W (+ bias) on the GPU; A float32 or float16 (Y and bias alike).  ``path``: auto,
    gemv, gemm (fused, tensor cores) or cublas (dequantize, then the cuBLAS this process loaded)."""
    import torch
    w, packed = _device_weight(packed, K, N, bits, block)   # contiguous copies live to the launch
    A2, Y, b = _matmul_io(A, K, N, bias)
    _call(lib().bq_cuda_matmul(ctypes.byref(w), A2.data_ptr(), A2.shape[0], None if b is None else b.data_ptr(),
                               Y.data_ptr(), int(A.dtype == torch.float16), PATHS[path], _stream()))
    return Y.reshape(*A.shape[:-1], N)


def _matmul_io(A, K: int, N: int, bias):
    """A as (M, K) rows, Y (M, N) of A's type and the bias in A's type (or None), A checked."""
    import torch
    if A.dtype not in (torch.float32, torch.float16) or A.shape[-1] != K or not A.is_cuda:
        raise BayesQError(f"bayesq CUDA: A must be a float32/float16 GPU tensor of last axis {K}, got "
                          f"{A.dtype} {tuple(A.shape)}")
    A2 = A.reshape(-1, K).contiguous()
    Y = torch.empty((A2.shape[0], N), dtype=A.dtype, device=A.device)
    return A2, Y, None if bias is None else bias.to(A.dtype).contiguous()


def _dequantized(N: int, K: int, inner: int, dtype, device):
    """The output of a dequantization into layout ``inner`` (bayesq/cuda.h): V (N, K) for 1, W (K, N) for
    N, (N / inner, K, inner) between."""
    import torch
    shape = (N, K) if inner == 1 else (K, N) if inner == N else (N // inner, K, inner)
    return torch.empty(shape, dtype=dtype, device=device)


def dequantize(packed: dict, *, K: int, N: int, bits: int, block: int, inner: int = 1, dtype=None):
    """The weight decoded on the GPU: V (N, K) for inner 1, W (K, N) for inner N (bayesq/cuda.h)."""
    import torch
    dtype = dtype or torch.float32
    w, packed = _device_weight(packed, K, N, bits, block)   # contiguous copies live to the launch
    out = _dequantized(N, K, inner, dtype, packed["B"].device)
    _call(lib().bq_cuda_dequantize(ctypes.byref(w), inner, out.data_ptr(), int(dtype == torch.float16), _stream()))
    return out


def gather(packed: dict, indices, *, K: int, N: int, bits: int, block: int, dtype=None):
    """Rows of the packed table (an embedding lookup) on the GPU: (*indices.shape, K).  ``indices``:
    integers on the host (numpy or a CPU tensor), checked there as the CPU op checks them."""
    import torch
    dtype = dtype or torch.float32
    w, packed = _device_weight(packed, K, N, bits, block)   # contiguous copies live to the launch
    idx = np.ascontiguousarray(np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices))
    if idx.dtype not in (np.int64, np.int32):
        raise BayesQError(f"bayesq CUDA: indices must be int32 or int64, got {idx.dtype}")
    Y = torch.empty((*idx.shape, K), dtype=dtype, device=packed["B"].device)
    _call(lib().bq_cuda_gather(ctypes.byref(w), idx.ctypes.data, int(idx.dtype == np.int64), idx.size, Y.data_ptr(),
                               int(dtype == torch.float16), _stream()))
    return Y


def sparse_dequantize(packed: dict, *, K: int, N: int, bits: int, block: int, keep: int, of: int, inner: int = 1,
                      dtype=None):
    """A sparse weight decoded on the GPU, in the layout ``inner`` gives (as :func:`dequantize`)."""
    import torch
    dtype = dtype or torch.float32
    Kc, bc = sparse_args(K, block, keep, of)
    w, packed = _device_weight(packed, Kc, N, bits, bc)
    out = _dequantized(N, K, inner, dtype, packed["B"].device)
    sw = _SparseWeight(w, packed["mask"].data_ptr(), K, keep, of)
    _call(lib().bq_cuda_sparse_dequantize(ctypes.byref(sw), inner, out.data_ptr(), int(dtype == torch.float16), _stream()))
    return out


def sparse_matmul(packed: dict, A, *, K: int, N: int, bits: int, block: int, keep: int, of: int, bias=None):
    """A (..., K) @ W (+ bias) for a sparse weight on the GPU: W decoded, then cuBLAS (bayesq/cuda.h)."""
    import torch
    Kc, bc = sparse_args(K, block, keep, of)
    w, packed = _device_weight(packed, Kc, N, bits, bc)
    A2, Y, b = _matmul_io(A, K, N, bias)
    sw = _SparseWeight(w, packed["mask"].data_ptr(), K, keep, of)
    _call(lib().bq_cuda_sparse_matmul(ctypes.byref(sw), A2.data_ptr(), A2.shape[0], None if b is None else b.data_ptr(),
                                      Y.data_ptr(), int(A.dtype == torch.float16), _stream()))
    return Y.reshape(*A.shape[:-1], N)
