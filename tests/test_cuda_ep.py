"""The bayesq ops for onnxruntime's CUDAExecutionProvider (custom_ops/cuda/ort_ops.cpp, in
libbayesq_ops_cuda.so beside libbayesq_ops.so where nvcc was found at install).

On any machine where it was built: the library loads in a CPU session, its CPU ops give the CPU
library's bytes, and make_session registers it exactly when the providers include CUDA.  With
onnxruntime-gpu and a GPU: the same graphs run on CUDAExecutionProvider (no CPU fallback allowed)
against the CPU ops.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.lower.bayesq_nodes import BAYESQ_OPSET, bayesq_dequantize_node, bayesq_gather_node, bayesq_matmul_node
from bayesq_onnx.runtime import custom_ops
from bayesq_onnx.runtime.session import make_session
from packed_weights import sparse_weight, weight

CUDA = custom_ops.CUDA_PROVIDER
EPS32 = float(np.finfo(np.float32).eps)

pytestmark = pytest.mark.skipif(custom_ops.cuda_library_path() is None,
                                reason=f"{custom_ops.CUDA_LIB_NAME} not built (no nvcc when the package was installed)")
gpu = pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                         reason="onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu and a GPU needed)")


def matmul_model(fmt, packed, K, N, bias, fp16=False):
    T = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    node, inits = bayesq_matmul_node("A", "Y", "w", fmt, packed, K, N, bias="bias")
    inits.append(numpy_helper.from_array(bias.astype(np.float16 if fp16 else np.float32), "bias"))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", T, [None, K])],
                          [helper.make_tensor_value_info("Y", T, [None, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])


def dequantize_model(fmt, packed, shape, axis):
    node, inits = bayesq_dequantize_node("W", "w", fmt, packed, shape, axis)
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, list(shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])


def gather_model(fmt, packed, N, K, itype):
    node, inits = bayesq_gather_node("I", "Y", "w", fmt, packed, N, K)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("I", itype, [None, None])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, K])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), BAYESQ_OPSET])


GATHER_INDICES = np.array([[0, 5, -1], [12, -13, 7]])   # N = 13 rows: the ends, negative ones from the end


def run(m, lib, providers, feeds, strict=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    if strict:   # every node on CUDA (providers: CUDA alone), or the session is not created
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(m.SerializeToString(), so, providers=providers).run(None, feeds)[0]


# (kind, bits, K, N, block): an affine weight with a K % 8 tail and odd N, a codebook with one table per row
WEIGHTS = [("affine", 3, 203, 13, 16), ("lut", 4, 256, 24, 0)]


def test_registered_for_cuda_providers_only():
    seen = []

    class Options:
        def register_custom_ops_library(self, path):
            seen.append(path)

    for providers in (None, ["CPUExecutionProvider"], [CUDA, "CPUExecutionProvider"],
                      [(CUDA, {"device_id": 0}), "CPUExecutionProvider"]):
        assert custom_ops.register(Options(), providers)
    lib, cuda_lib = str(custom_ops.library_path()), str(custom_ops.cuda_library_path())
    assert seen == [lib, lib, cuda_lib, cuda_lib]


@pytest.mark.parametrize("kind, bits, K, N, block", WEIGHTS)
@pytest.mark.parametrize("fp16", [False, True])
def test_cpu_ops_of_the_cuda_library_equal_the_cpu_library(kind, bits, K, N, block, fp16):
    """libbayesq_ops_cuda.so loads where onnxruntime has no CUDA, and its CPU ops are libbayesq_ops.so's."""
    rng = np.random.default_rng(bits)
    fmt, p, _, _ = weight(kind, bits, K, N, block, seed=K)
    m = matmul_model(fmt, p, K, N, rng.standard_normal(N), fp16)
    cpu = ["CPUExecutionProvider"]
    for M in (1, 3, 40):   # the GEMV and the GEMM
        A = rng.standard_normal((M, K)).astype(np.float16 if fp16 else np.float32)
        want = run(m, custom_ops.library_path(), cpu, {"A": A})
        assert run(m, custom_ops.cuda_library_path(), cpu, {"A": A}).tobytes() == want.tobytes(), M
    d = dequantize_model(fmt, p, (N, K), 1)
    assert (run(d, custom_ops.cuda_library_path(), cpu, {}).tobytes()
            == run(d, custom_ops.library_path(), cpu, {}).tobytes())


@pytest.mark.parametrize("itype", [TensorProto.INT64, TensorProto.INT32])
def test_cpu_gather_of_the_cuda_library_equals_the_cpu_library(itype):
    fmt, p, _, _ = weight("affine", 3, 203, 13, 16, seed=1)
    g = gather_model(fmt, p, 13, 203, itype)
    I = GATHER_INDICES.astype(np.int64 if itype == TensorProto.INT64 else np.int32)
    cpu = ["CPUExecutionProvider"]
    want = run(g, custom_ops.library_path(), cpu, {"I": I})
    assert run(g, custom_ops.cuda_library_path(), cpu, {"I": I}).tobytes() == want.tobytes()


def sparse_models(keep=2, of=4):
    """MatMulSparseAffine and DequantizeSparseAffine of one 2:4 weight (K 256, N 12, 3 bits, groups of 64)."""
    fmt, _, p, V = sparse_weight(keep, of, 3, 64, 12, 256, seed=3)
    return (matmul_model(fmt, p, 256, 12, np.random.default_rng(0).standard_normal(12)),
            dequantize_model(fmt, p, (256, 12), 0), V.astype(np.float32))


def test_cpu_sparse_ops_of_the_cuda_library_equal_the_cpu_library():
    m, d, _ = sparse_models()
    A = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    cpu = ["CPUExecutionProvider"]
    assert (run(m, custom_ops.cuda_library_path(), cpu, {"A": A}).tobytes()
            == run(m, custom_ops.library_path(), cpu, {"A": A}).tobytes())
    assert run(d, custom_ops.cuda_library_path(), cpu, {}).tobytes() == run(d, custom_ops.library_path(), cpu, {}).tobytes()


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="onnxruntime has CUDA: the GPU tests below")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_make_session_with_cuda_providers_falls_back_to_the_cpu(monkeypatch):
    """Asked for CUDA where onnxruntime has none, make_session registers the CUDA build (which
    register() picks for these providers: above) and runs its CPU ops."""
    asked = []
    real = custom_ops.register
    monkeypatch.setattr(custom_ops, "register", lambda so, providers=None: asked.append(providers) or real(so, providers))
    fmt, p, _, _ = weight("affine", 3, 203, 13, 16, seed=0)
    m = matmul_model(fmt, p, 203, 13, np.ones(13))
    A = np.random.default_rng(0).standard_normal((3, 203)).astype(np.float32)
    got = make_session(m, providers=[CUDA, "CPUExecutionProvider"], unpack="never").run(None, {"A": A})[0]
    assert got.tobytes() == make_session(m, unpack="never").run(None, {"A": A})[0].tobytes()
    assert asked == [[CUDA, "CPUExecutionProvider"], ["CPUExecutionProvider"]]


def gpu_bound(A, V, zs, want, fp16):
    """|Y_cuda - Y_cpu| allowed per element.  Both sum K fp32 products in different orders, each within
    2 K eps32 sum_k |a_k| (|w_k| + |zp_k s_k|) (Higham's gamma_K, doubled as in test_custom_ops for the CPU's
    group sums), so twice that between them, plus the bias's rounding.  Beyond the GEMV's 8 rows the GEMM
    rounds A and W to fp16 (2^-11 relative each) for tensor cores with fp32 accumulation: 3 * 2^-11
    sum_k |a_k w_k| more.  float16 Y: both round their fp32 result to fp16, half an fp16 ulp each.  All of it
    stays well below a layout error's (a wrong weight: O(1) relative to Y)."""
    a = np.abs(A.astype(np.float64))
    V = np.abs(V.astype(np.float64))
    bound = 4 * A.shape[-1] * EPS32 * (a @ (V + zs).T) + 2 * EPS32 * np.abs(want)
    if A.shape[0] > 8:
        bound += 3 * 2.0 ** -11 * (a @ V.T)
    if fp16:
        bound += 2 * 2.0 ** -11 * np.abs(want) + 2.0 ** -24
    return bound + 1e-30


@gpu
@pytest.mark.parametrize("kind, bits, K, N, block", WEIGHTS)
@pytest.mark.parametrize("fp16", [False, True])
def test_cuda_matmul_against_the_cpu_ops(kind, bits, K, N, block, fp16):
    rng = np.random.default_rng(bits)
    fmt, p, V, zs = weight(kind, bits, K, N, block, seed=K)
    m = matmul_model(fmt, p, K, N, rng.standard_normal(N), fp16)
    for M in (1, 3, 8, 9, 12, 40):   # the GEMV up to 8 rows, the GEMM from 9
        A = rng.standard_normal((M, K)).astype(np.float16 if fp16 else np.float32)
        want = run(m, custom_ops.library_path(), ["CPUExecutionProvider"], {"A": A}).astype(np.float64)
        got = run(m, custom_ops.cuda_library_path(), [CUDA], {"A": A}, strict=True).astype(np.float64)
        bound = gpu_bound(A, V, zs, want, fp16)
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= bound), (M, float(np.max(np.abs(got - want) - bound)))


@gpu
@pytest.mark.parametrize("kind, bits, K, N, block", WEIGHTS)
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_cuda_dequantize_bit_exact(kind, bits, K, N, block, scale_dtype):
    """The decode is the same fp32 arithmetic on both: bit for bit, in a MatMul's (K, N) layout and in a
    Conv weight's (O, I, kh, kw) quantized along I."""
    fmt, p, _, _ = weight(kind, bits, K, N, block, seed=bits, scale_dtype=scale_dtype)
    for shape, axis in (((K, N), 0), ((N // 4, K, 2, 2) if N % 4 == 0 else (N, K, 1, 1), 1)):
        d = dequantize_model(fmt, p, shape, axis)
        want = run(d, custom_ops.library_path(), ["CPUExecutionProvider"], {})
        assert run(d, custom_ops.cuda_library_path(), [CUDA], {}, strict=True).tobytes() == want.tobytes(), shape


@gpu
@pytest.mark.parametrize("kind, bits, K, N, block", WEIGHTS)
def test_cuda_gather_bit_exact_and_checks_indices(kind, bits, K, N, block):
    """Rows decode bit for bit; the indices are read on the host (OrtMemTypeCPUInput) and a bad one is an
    error, as on the CPU."""
    fmt, p, _, _ = weight(kind, bits, K, N, block, seed=2)
    g = gather_model(fmt, p, N, K, TensorProto.INT64)
    I = GATHER_INDICES % N
    want = run(g, custom_ops.library_path(), ["CPUExecutionProvider"], {"I": I})
    assert run(g, custom_ops.cuda_library_path(), [CUDA], {"I": I}, strict=True).tobytes() == want.tobytes()
    with pytest.raises(Exception, match=f"index {N} out of range"):
        run(g, custom_ops.cuda_library_path(), [CUDA], {"I": np.array([[0, N]])}, strict=True)


@gpu
def test_cuda_sparse_ops_against_the_cpu_ops():
    """The sparse Dequantize bit for bit; the MatMul (cuBLAS on the decoded weight, fp32) within the two
    summation orders' bound."""
    m, d, V = sparse_models()
    want = run(d, custom_ops.library_path(), ["CPUExecutionProvider"], {})
    assert run(d, custom_ops.cuda_library_path(), [CUDA], {}, strict=True).tobytes() == want.tobytes()
    A = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    want = run(m, custom_ops.library_path(), ["CPUExecutionProvider"], {"A": A}).astype(np.float64)
    got = run(m, custom_ops.cuda_library_path(), [CUDA], {"A": A}, strict=True)
    assert np.all(np.abs(got - want) <= gpu_bound(A, V, np.zeros_like(V), want, False))


@gpu
def test_make_session_runs_on_cuda():
    """make_session(providers=[CUDA, ...]) registers the CUDA build; the bayesq node runs on the GPU (CPU
    fallback disabled in the options it is given)."""
    from bayesq_onnx.runtime.session import session_options
    fmt, p, V, zs = weight("affine", 3, 203, 13, 16, seed=0)
    m = matmul_model(fmt, p, 203, 13, np.zeros(13))
    A = np.random.default_rng(0).standard_normal((3, 203)).astype(np.float32)
    providers = [CUDA]   # CPU listed too would conflict with disabling the fallback to it
    so = session_options(providers, **{"session.disable_cpu_ep_fallback": "1"})
    sess = make_session(m, providers=providers, sess_options=so, unpack="never")
    assert sess.get_providers()[0] == CUDA
    want = make_session(m, unpack="never").run(None, {"A": A})[0].astype(np.float64)
    got = sess.run(None, {"A": A})[0]
    assert np.all(np.abs(got - want) <= gpu_bound(A, V, zs, want, False))
