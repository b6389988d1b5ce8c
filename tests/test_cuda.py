"""The CUDA kernels (custom_ops/cuda/, bayesq_onnx/runtime/cuda.py) against the packers' numpy decode.

On any machine where the library was built (nvcc found at install): their decode functions, run on
the host, give every weight bit-exactly.  With a GPU (torch sees one): the kernels themselves.
Imports nothing but numpy and torch (tools/gpu_check.sh runs this file where onnx may be missing,
with --noconftest).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import packed_weights
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.runtime import cuda

EPS32 = float(np.finfo(np.float32).eps)

built = pytest.mark.skipif(cuda.library_path() is None,
                           reason="libbayesq_cuda.so not built (no nvcc when the package was installed)")


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not _gpu() or cuda.library_path() is None,
                         reason="no CUDA GPU visible to torch, or libbayesq_cuda.so not built")

# (K, N, block): full chunks, partial-lane chunks (8, 9 and 15 lanes; the last two straddle groups of
# 16), a K % 8 tail, K < 8, odd N, one codebook per row (block 0, LUT only), groups of 48 across the
# 128-code chunks (the kernels follow a lane's group step by step from one division)
CASES = [(203, 13, 16), (576, 9, 32), (255, 5, 64), (136, 4, 0), (5, 3, 16), (1000, 7, 128), (1024, 3, 48)]


def weight(kind, bits, K, N, block, seed, scale_dtype="float32"):
    """(packed arrays, V (N, K) float32 as the packers decode them)."""
    _, packed, V, _ = packed_weights.weight(kind, bits, K, N, block, seed, scale_dtype)
    return packed, V


def cases(kind):
    return [c for c in CASES if kind == "lut" or c[2] > 0]     # affine groups are multiples of 16


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_built_wherever_nvcc_is():
    """An install on a machine with nvcc builds the CUDA libraries and puts them beside the CPU one
    (setup.py: setuptools copies one file per extension unless told of the others)."""
    from bayesq_onnx.runtime import custom_ops
    if custom_ops.library_path() is None:
        pytest.skip("installed without the custom-op library (BAYESQ_BUILD_CUSTOM_OPS=0)")
    assert cuda.library_path() is not None and custom_ops.cuda_library_path() is not None


@built
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_host_decode_bit_exact(kind, bits, scale_dtype):
    for K, N, block in cases(kind):
        packed, V = weight(kind, bits, K, N, block, 100 * bits + K, scale_dtype)
        got = cuda.decode_host(packed, K=K, N=N, bits=bits, block=block)
        assert np.array_equal(got.view(np.uint32), V.view(np.uint32)), (K, N, block)


@built
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_gemv_walk_on_the_host_within_fp32_bound(kind, bits):
    """The GEMV kernel's walk (a warp's threads over chunks, 4 full chunks' words read ahead, K split for
    narrow N) run on the host covers every code once: every shape, rows 1..8, split or not."""
    rng = np.random.default_rng(bits)
    for K, N, block in cases(kind) + [(4096, 6, 32), (3000, 5, 64)]:
        packed, V = weight(kind, bits, K, N, block, K + bits, "float16")
        for M in (1, 3, 8):
            A = rng.standard_normal((M, K)).astype(np.float32)
            ref = A.astype(np.float64) @ V.T.astype(np.float64)
            for sms in (1, 132):      # one SM: no split; 132 (an H100): narrow N splits K
                Y = cuda.gemv_host(packed, A, K=K, N=N, bits=bits, block=block, sms=sms)
                assert np.all(np.abs(Y - ref) <= fp32_bound(A, V)), (K, N, M, sms)


@built
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_gemm_tiles_on_the_host_within_fp16_bound(kind):
    """The GEMM kernel's tiles, filled on the host as its threads fill them (full chunks by lanes, the tail
    code by code, zeros past M, N and K): partial tiles of rows and columns, every tail shape."""
    rng = np.random.default_rng(5)
    for K, N, block in cases(kind):
        packed, V = weight(kind, 3, K, N, block, K * 3, "float16")
        for M in (9, 70):
            A = rng.standard_normal((M, K)).astype(np.float32)
            Y = cuda.gemm_host(packed, A, K=K, N=N, bits=3, block=block)
            ref = A.astype(np.float64) @ V.T.astype(np.float64)
            assert np.all(np.abs(Y - ref) <= fp16_bound(A, V)), (K, N, M)


@built
@pytest.mark.parametrize("keep, of", [(2, 4), (1, 4), (4, 8), (6, 8), (1, 2)])
def test_sparse_host_decode_bit_exact(keep, of):
    """N:M weights: every pattern table, a corrupt pattern index (past the last) keeping nothing."""
    for bits, K, N, block, sd in ((3, 256, 5, 64, "float16"), (4, 96, 3, 32, "float32")):
        if (block * keep // of) % 16:
            continue
        _, _, packed, V = packed_weights.sparse_weight(keep, of, bits, block, N, K, K + keep, sd)
        got = cuda.sparse_decode_host(packed, K=K, N=N, bits=bits, block=block, keep=keep, of=of)
        assert np.array_equal(got.view(np.uint32), V.astype(np.float32).view(np.uint32)), (keep, of, bits)
    if keep == 2 and of == 4:        # pattern bits 3: index 7 is past the 6 patterns of 2:4
        packed = {**packed, "mask": packed["mask"].copy()}
        packed["mask"][0, 0] |= 0b111                      # row 0's first run
        got = cuda.sparse_decode_host(packed, K=K, N=N, bits=bits, block=block, keep=keep, of=of)
        assert not got[0, :of].any() and np.array_equal(got[0, of:], V[0, of:].astype(np.float32))


@built
def test_host_decode_refuses_bad_arguments():
    packed, _ = weight("affine", 3, 64, 2, 16, 0)
    with pytest.raises(BayesQError, match="bits must be 1..8, got 9"):
        cuda.decode_host(packed, K=64, N=2, bits=9, block=16)
    with pytest.raises(BayesQError, match="K and N must be positive"):
        cuda.decode_host(packed, K=0, N=2, bits=3, block=16)


@built
def test_gather_checks_its_indices_on_the_host_before_any_launch():
    import ctypes
    packed, _ = weight("affine", 3, 64, 5, 16, 0)
    w, packed = cuda._host_weight(packed, 64, 5, 3, 16)
    for bad, itype in ((5, np.int64), (-6, np.int32)):
        idx = np.array([0, bad, 1], itype)
        Y = np.empty((3, 64), np.float32)       # never written: the check fails first
        rc = cuda.lib().bq_cuda_gather(ctypes.byref(w), idx.ctypes.data, int(itype == np.int64), 3, Y.ctypes.data, 0, None)
        assert rc == 1 and cuda.lib().bq_cuda_last_error().decode() == f"index {bad} out of range for 5 rows"


# ---- on a GPU -----------------------------------------------------------------------------------

def _dev(packed):
    import torch
    return {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in packed.items() if v is not None}


def fp32_bound(A, V):
    """Rounding bound of y = sum_k a_k v_k in fp32 in any order (Higham's gamma_K), for the kernel and
    for the float64 reference alike: 2 K eps sum_k |a_k v_k|."""
    return 2 * A.shape[-1] * EPS32 * (np.abs(A) @ np.abs(V).T) + 1e-30


def fp16_bound(A, V):
    """The GEMM rounds A and V to fp16 (relative 2^-11 each) and accumulates in fp32: per product
    2 * 2^-11 + its square, plus the fp32 sum's own bound."""
    return (2 * 2.0 ** -11 + 2.0 ** -22 + 2 * A.shape[-1] * EPS32) * (np.abs(A) @ np.abs(V).T) + 1e-30


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_dequantize_bit_exact_in_every_layout(kind, bits):
    import torch
    for K, N, block in cases(kind) + [(4096, 12, 32)]:
        packed, V = weight(kind, bits, K, N, block, bits + K, "float16")
        d = _dev(packed)
        got = cuda.dequantize(d, K=K, N=N, bits=bits, block=block).cpu().numpy()
        assert np.array_equal(got.view(np.uint32), V.view(np.uint32))
        W = cuda.dequantize(d, K=K, N=N, bits=bits, block=block, inner=N).cpu().numpy()
        assert np.array_equal(W, V.T)
        if N % 3 == 0:   # a conv-like layout: (N / 3, K, 3), V's rows enumerating the outer and inner axes
            C = cuda.dequantize(d, K=K, N=N, bits=bits, block=block, inner=3).cpu().numpy()
            assert np.array_equal(C, V.reshape(N // 3, 3, K).transpose(0, 2, 1))
        h = cuda.dequantize(d, K=K, N=N, bits=bits, block=block, dtype=torch.float16).cpu().numpy()
        assert np.array_equal(h, V.astype(np.float16))


@gpu
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_gather_bit_exact_and_checks_indices(kind):
    import torch
    for K, N, block in cases(kind):
        packed, V = weight(kind, 3, K, N, block, K + 1, "float16")
        d = _dev(packed)
        idx = np.array([[0, N - 1, -1], [2 % N, -N, 1 % N]], np.int64)
        for itype in (np.int64, np.int32):
            got = cuda.gather(d, idx.astype(itype), K=K, N=N, bits=3, block=block).cpu().numpy()
            assert got.shape == (2, 3, K) and np.array_equal(got, V[idx % N])
        h = cuda.gather(d, idx, K=K, N=N, bits=3, block=block, dtype=torch.float16).cpu().numpy()
        assert np.array_equal(h, V[idx % N].astype(np.float16))
        with pytest.raises(BayesQError, match=f"index {N} out of range for {N} rows"):
            cuda.gather(d, np.array([0, N]), K=K, N=N, bits=3, block=block)


@gpu
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_gemv_within_fp32_bound(kind, bits):
    import torch
    rng = np.random.default_rng(bits)
    for K, N, block in cases(kind) + [(4096, 10, 32), (1024, 4096, 64)]:   # the last two split K / not
        packed, V = weight(kind, bits, K, N, block, K + N, "float32")
        d = _dev(packed)
        for M in (1, 2, 3, 5, 8):
            A = rng.standard_normal((M, K)).astype(np.float32)
            bias = rng.standard_normal(N).astype(np.float32)
            Y = cuda.matmul(d, torch.from_numpy(A).cuda(), K=K, N=N, bits=bits, block=block,
                            bias=torch.from_numpy(bias).cuda(), path="gemv").cpu().numpy()
            ref = A.astype(np.float64) @ V.T.astype(np.float64) + bias
            assert np.all(np.abs(Y - ref) <= fp32_bound(A, V) + np.abs(bias) * EPS32), (K, N, M)


@gpu
def test_gemv_split_over_k_gives_the_same_bytes_every_run():
    import torch
    packed, V = weight("affine", 3, 8192, 6, 32, 1, "float32")     # 6 columns: K split over many blocks
    d = _dev(packed)
    A = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 8192)).astype(np.float32)).cuda()
    runs = [cuda.matmul(d, A, K=8192, N=6, bits=3, block=32, path="gemv").cpu().numpy() for _ in range(3)]
    assert all(np.array_equal(r.view(np.uint32), runs[0].view(np.uint32)) for r in runs)


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_gemm_within_fp16_bound(kind, bits):
    import torch
    rng = np.random.default_rng(bits)
    for K, N, block in cases(kind) + [(1024, 200, 64)]:
        packed, V = weight(kind, bits, K, N, block, K * N, "float16")
        d = _dev(packed)
        for M in (9, 64, 130):     # partial tiles of 64 rows
            A = rng.standard_normal((M, K)).astype(np.float32)
            Y = cuda.matmul(d, torch.from_numpy(A).cuda(), K=K, N=N, bits=bits, block=block, path="gemm")
            ref = A.astype(np.float64) @ V.T.astype(np.float64)
            assert np.all(np.abs(Y.cpu().numpy() - ref) <= fp16_bound(A, V)), (K, N, M)


@gpu
@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_cublas_path_within_its_bounds(kind):
    import torch
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")   # torch loads cuBLAS into the process
    rng = np.random.default_rng(3)
    for K, N, block in cases(kind):
        packed, V = weight(kind, 4, K, N, block, K, "float16")
        d = _dev(packed)
        A = rng.standard_normal((37, K)).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        ref = A.astype(np.float64) @ V.T.astype(np.float64) + bias
        Y = cuda.matmul(d, torch.from_numpy(A).cuda(), K=K, N=N, bits=4, block=block,
                        bias=torch.from_numpy(bias).cuda(), path="cublas").cpu().numpy()
        # float32 stays float32 there (cuBLAS's default math: no TF32), the bias added in the same sum
        assert np.all(np.abs(Y - ref) <= fp32_bound(A, V) + np.abs(bias) * 2 * EPS32), (K, N)
        A16 = A.astype(np.float16)
        Y16 = cuda.matmul(d, torch.from_numpy(A16).cuda(), K=K, N=N, bits=4, block=block, path="cublas")
        ref16 = A16.astype(np.float64) @ V.T.astype(np.float64)
        # V rounded to fp16 (2^-11 relative), fp32 accumulation, the output rounded to fp16
        tol = fp16_bound(A16.astype(np.float32), V) + np.abs(ref16) * 2.0 ** -11
        assert np.all(np.abs(Y16.float().cpu().numpy() - ref16) <= tol), (K, N)


@gpu
def test_sparse_dequantize_and_matmul_on_the_gpu():
    import torch
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")   # torch loads cuBLAS into the process
    rng = np.random.default_rng(4)
    for keep, of in ((2, 4), (4, 8)):
        _, _, packed, V = packed_weights.sparse_weight(keep, of, 3, 64, 12, 256, keep, "float16")
        V = V.astype(np.float32)
        d = _dev(packed)
        kw = dict(K=256, N=12, bits=3, block=64, keep=keep, of=of)
        assert np.array_equal(cuda.sparse_dequantize(d, **kw).cpu().numpy(), V)
        assert np.array_equal(cuda.sparse_dequantize(d, inner=12, **kw).cpu().numpy(), V.T)
        A = rng.standard_normal((5, 256)).astype(np.float32)
        Y = cuda.sparse_matmul(d, torch.from_numpy(A).cuda(), **kw).cpu().numpy()
        assert np.all(np.abs(Y - A.astype(np.float64) @ V.T) <= fp32_bound(A, V))   # fp32 through cuBLAS


@gpu
def test_half_io_and_the_automatic_path():
    import torch
    K, N, block = 512, 96, 32
    packed, V = weight("affine", 4, K, N, block, 7, "float16")
    d = _dev(packed)
    rng = np.random.default_rng(1)
    for M in (1, 4, cuda.lib().bq_cuda_gemm_min_rows(), 100):
        A = rng.standard_normal((2, M, K)).astype(np.float16)        # batched: rows are its leading axes
        Y = cuda.matmul(d, torch.from_numpy(A).cuda(), K=K, N=N, bits=4, block=block)
        assert Y.dtype == torch.float16 and Y.shape == (2, M, N)
        A32 = A.reshape(-1, K).astype(np.float32)
        ref = A32.astype(np.float64) @ V.T.astype(np.float64)
        # fp16 output rounding (2^-11 relative) on top of the GEMM's bound
        tol = fp16_bound(A32, V) + np.abs(ref) * 2.0 ** -11
        assert np.all(np.abs(Y.reshape(-1, N).float().cpu().numpy() - ref) <= tol), M


@gpu
def test_bad_calls_fail_with_a_message():
    import torch
    packed, _ = weight("affine", 3, 64, 4, 16, 0)
    d = _dev(packed)
    A = torch.zeros((20, 64), device="cuda")
    with pytest.raises(BayesQError, match="the GEMV takes at most 8 rows"):
        cuda.matmul(d, A, K=64, N=4, bits=3, block=16, path="gemv")
    with pytest.raises(BayesQError, match="must be a float32/float16 GPU tensor"):
        cuda.matmul(d, A[:, :32], K=64, N=4, bits=3, block=16)
    with pytest.raises(BayesQError, match="not in GPU memory"):
        cuda.matmul({k: v.cpu() for k, v in d.items()}, A, K=64, N=4, bits=3, block=16)
