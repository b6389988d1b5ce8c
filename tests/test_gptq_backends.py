"""GPTQ's factor and error feedback in float32 and on torch, against the float64 numpy path and plain
numpy references; same bytes on reruns and whatever the BLAS thread count; the device choice."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import models
from bayesq_onnx.cli import main
from bayesq_onnx.config import Recipe
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.quantize.backend import NUMPY, TorchBackend, backend
from bayesq_onnx.quantize.codebook import round_gptq_codebook
from bayesq_onnx.quantize.grid import minmax_grid
from bayesq_onnx.quantize import rounding_native
from bayesq_onnx.quantize.rounding import gptq_factor, round_gptq


def _problem(rows=48, L=300, seed=0):
    """Correlated inputs (GPTQ's case) with a dead input, and weights to round."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * L, 6)) @ rng.standard_normal((6, L)) + 0.3 * rng.standard_normal((2 * L, L))
    X[:, 11] = 0.0
    return rng.standard_normal((rows, L)).astype(np.float32), X.T @ X


def _layer_error(W, deq, H):
    e = deq.astype(np.float64) - W
    return float(np.einsum("rk,rk->", e @ H, e))


def _torch_cpu():
    pytest.importorskip("torch")
    return TorchBackend("cpu")


@pytest.mark.parametrize("act_order", [False, True])
def test_factor_is_the_upper_cholesky_factor_of_the_inverse(act_order):
    W, H = _problem()
    f64 = gptq_factor(H, 0.01, act_order, np.float64)
    # the textbook route, in plain numpy: damp, permute, invert, Cholesky
    Hd = H.copy()
    dead = np.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    perm = np.argsort(-np.diag(Hd), kind="stable") if act_order else np.arange(H.shape[0])
    Hd = Hd[np.ix_(perm, perm)]
    Hd[np.diag_indices_from(Hd)] += 0.01 * np.mean(np.diag(Hd))
    want = np.linalg.cholesky(np.linalg.inv(Hd)).T
    np.testing.assert_array_equal(f64.perm, perm)
    scale = np.abs(want).max()
    # both routes are backward stable: entries agree to cond(H) * eps (~1e3 * 1e-16 here); 1e-9 of
    # the largest entry leaves six orders of margin and still catches any algebraic slip
    np.testing.assert_allclose(f64.U, want, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(f64.diag, np.diag(want), rtol=1e-9)
    f32 = gptq_factor(H, 0.01, act_order)
    assert f32.U.dtype == np.float32
    # stored in float32: each entry rounded to 2^-24 of itself (6e-8), so within 1e-7 of the largest
    np.testing.assert_allclose(f32.U, want, rtol=0, atol=1e-7 * scale)
    tf = gptq_factor(H, 0.01, act_order, np.float64, backend=_torch_cpu())
    np.testing.assert_allclose(tf.U.numpy(), want, rtol=0, atol=1e-9 * scale)   # as the numpy route


def _round_all(W, f, rows_levels=None):
    """Codes and dequantized weights of a fixed grid, dynamic groups and a codebook, on factor ``f``."""
    scale, zp = minmax_grid(W, 3, 32)
    fixed = round_gptq(W, f, scale, zp, 3, 32)
    dyn = round_gptq(W, f, None, None, 4, 64)
    lev = (np.arange(8, dtype=np.float32)[None] - 3.5) * np.float32(0.3) * np.abs(W).max(axis=1, keepdims=True) / 4
    cb, _ = round_gptq_codebook(W, f, lev, W.shape[1])
    return [(fixed.codes, fixed.dequantize()), (dyn.codes, dyn.dequantize()),
            (cb, lev[np.arange(W.shape[0])[:, None], cb])]


def _agree(got, want, W, H):
    for (c, d), (c0, d0) in zip(got, want):
        # Float32 sums differ from float64 ones by ~1e-7 of the weights: only a weight that close to
        # a rounding threshold can take the other code (then its row's later feedback moves a little
        # too).  None did on these sizes; 0.1% of codes, and 0.1% of the layer error, leave room
        # for a few such ties while a wrong update (or RTN codes) misses both by far.
        assert np.mean(c == c0) >= 0.999
        assert abs(_layer_error(W, d, H) / _layer_error(W, d0, H) - 1) <= 1e-3


def test_float32_error_feedback_matches_float64():
    W, H = _problem()
    want = _round_all(W, gptq_factor(H, dtype=np.float64))
    _agree(_round_all(W, gptq_factor(H)), want, W, H)


def test_torch_backend_matches_numpy():
    W, H = _problem(seed=1)
    be = _torch_cpu()
    want = _round_all(W, gptq_factor(H))
    _agree(_round_all(W, gptq_factor(H, backend=be)), want, W, H)
    _agree(_round_all(W, gptq_factor(H, dtype=np.float64, backend=be)), want, W, H)


def test_same_bytes_on_reruns_at_one_blas_thread():
    """Reruns give the same bytes at the one BLAS thread the analysis's passes run it on
    (parallel.py).  Not at any thread count: on an AMD EPYC (OpenBLAS's Haswell kernels) two threads
    moved the error feedback's products in their last bits, and with them a dynamic group's range
    (tests/test_compress.py checks the whole analysis against the worker count instead)."""
    W, H = _problem(rows=200, L=260, seed=2)
    runs = []
    for _ in range(2):
        with threadpool_limits(limits=1, user_api="blas"):
            runs.append(_round_all(W, gptq_factor(H)))
    for (c, d), (c0, d0) in zip(runs[1], runs[0]):
        assert c.tobytes() == c0.tobytes() and d.tobytes() == d0.tobytes()


@pytest.mark.parametrize("act_order, lazy", [(False, 128), (False, 40), (True, 128)])
def test_native_column_loop_matches_numpy_bit_for_bit(monkeypatch, act_order, lazy):
    """The library's column loop (custom_ops/src/gptq.cpp) against the numpy loop it replaces: the
    same codes, grids and objective to the last bit, on fixed grids (3 and 8 bits, groups of 32 and
    of 100 over a 300-wide row: a short last group), dynamic groups (of 64, and of 8: several group
    starts inside one sub-block of 16), pruned weights, per-row and per-group codebooks; lazy batches
    of 128 and of 40 (not a multiple of the sub-block), act_order's column order, a dead input."""
    if rounding_native.library() is None:
        pytest.skip("libbayesq_ops.so with the native column loop is not built")
    W, H = _problem(rows=37, L=300, seed=4)
    W[5, :40] = 0.0                                            # an all-zero group
    f = gptq_factor(H, act_order=act_order)
    mask = np.random.default_rng(5).random(W.shape) < 0.6
    half = lambda s: s.astype(np.float16).astype(np.float32)   # noqa: E731 (scales as fp16 stores them)

    def both():
        out = []
        for bits, block in ((3, 32), (8, 100)):
            s, z = minmax_grid(W, bits, block)
            out.append(round_gptq(W, f, s, z, bits, block, lazy_block=lazy))
            out.append(round_gptq(W, f, s, z, bits, block, lazy_block=lazy, mask=mask))
        if not act_order:
            for block in (64, 8):
                out.append(round_gptq(W, f, None, None, 4, block, lazy_block=lazy, round_scale=half))
            out.append(round_gptq(W, f, None, None, 2, 32, lazy_block=lazy, mask=mask.copy()))
        amax = np.abs(W).max(axis=1, keepdims=True)
        for K, block, groups in ((8, 300, 1), (4, 64, 5)):
            lev = np.sort(np.random.default_rng(K).standard_normal((37 * groups, K)), axis=1)
            lev *= np.repeat(amax, groups, 0) / 2
            out.append(round_gptq_codebook(W, f, lev.astype(np.float32), block, lazy_block=lazy))
        return out

    with threadpool_limits(limits=1, user_api="blas"):   # the BLAS products repeat their bits at one thread
        got = both()
        monkeypatch.setattr(rounding_native, "library", lambda: None)
        want = both()
    for g, w in zip(got, want):
        if isinstance(g, tuple):
            assert g[0].tobytes() == w[0].tobytes() and g[1] == w[1]
        else:
            assert g.codes.tobytes() == w.codes.tobytes() and g.gptq_objective == w.gptq_objective
            assert g.scale.tobytes() == w.scale.tobytes() and g.zero_point.tobytes() == w.zero_point.tobytes()


@pytest.mark.skipif(not backend("auto").name.startswith("cuda"), reason="no GPU that torch sees")
def test_cuda_matches_numpy_and_repeats_itself():
    W, H = _problem(rows=512, L=384, seed=3)
    gpu = backend("cuda")
    first = _round_all(W, gptq_factor(H, backend=gpu))
    _agree(first, _round_all(W, gptq_factor(H)), W, H)
    again = _round_all(W, gptq_factor(H, backend=gpu))
    assert all(c.tobytes() == c0.tobytes() for (c, _), (c0, _) in zip(again, first))


def test_device_choice():
    assert backend("cpu") is NUMPY
    with pytest.raises(BayesQError, match="unknown device"):
        backend("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        Recipe(bits=3.0, device="tpu")
    if backend("auto") is NUMPY:        # no GPU: auto falls back, cuda says why
        with pytest.raises(BayesQError, match="--device cuda"):
            backend("cuda")


@pytest.mark.skipif(backend("auto") is not NUMPY, reason="a GPU is there")
def test_cli_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    import onnx
    p = tmp_path / "m.onnx"
    onnx.save(models.mlp(), p)
    out = tmp_path / "out.onnx"
    code = main(["compress", str(p), "--bits", "4", "--device", "cuda", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bayesq-onnx: error: --device cuda"), err
    assert not out.exists()


def test_shared_factor_pickles_with_its_backend():
    """Ray ships quantizers to its workers: the factor must keep its backend across a pickle."""
    import pickle

    from bayesq_onnx.quantize.site import SharedFactor
    W, H = _problem(rows=8, L=64)
    for be in (NUMPY, _torch_cpu()):
        f = pickle.loads(pickle.dumps(SharedFactor(H, 0.01, False, be)))
        assert type(f.backend) is type(be) and f.get().backend is f.backend
        np.testing.assert_array_equal(np.asarray(be.get(f.get().U)), np.asarray(be.get(gptq_factor(H, backend=be).U)))
