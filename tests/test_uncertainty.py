"""Keeping the posterior (compress --keep-posterior, predict): the uncertainty decomposition and scores,
the log-quantizer against its definition, the in-graph sampler against numpy (moments, seeds), and the
command line end to end."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx.cli import main
from bayesq_onnx.formats import BayesqUniform, Float32
from bayesq_onnx.lower.sampling import (SAMPLE_INPUT, Layout, PosteriorWeight, SampleSets, SigmaStore, add_sampling,
                                        set_seed)
from bayesq_onnx.posterior.keep import affine_like, log_quantize, quantize_sample
from bayesq_onnx.runtime import custom_ops
from bayesq_onnx.runtime.session import make_session
from bayesq_onnx.validate.uncertainty import auroc, decompose, ece, entropy

LN2 = float(np.log(2))


# ----------------------------------------------------------------------------- decomposition and scores


def test_decomposition_known_answers():
    # two confident samples that disagree: all uncertainty is epistemic
    d = decompose(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert d.total[0] == pytest.approx(LN2) and d.aleatoric[0] == pytest.approx(0.0)
    assert d.epistemic[0] == pytest.approx(LN2)
    # samples that agree on a coin flip: all aleatoric
    d = decompose(np.full((5, 1, 2), 0.5))
    assert d.total[0] == pytest.approx(LN2) and d.aleatoric[0] == pytest.approx(LN2)
    assert d.epistemic[0] == pytest.approx(0.0, abs=1e-15)


def test_mutual_information_is_mean_kl_to_the_predictive():
    # I(y; w) = E_s KL(p_s || pbar): an independent formula for the same quantity
    p = np.random.default_rng(0).dirichlet(np.ones(7), size=(9, 20))
    d = decompose(p)
    kl = (p * (np.log(p) - np.log(d.mean[None]))).sum(-1).mean(0)
    np.testing.assert_allclose(d.epistemic, kl, rtol=1e-10, atol=1e-12)   # float64 rounding only
    np.testing.assert_allclose(d.total, entropy(d.mean))


def test_ece_and_auroc_against_direct_counts():
    mean = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    # bins of 1/15: 0.9 -> bin 13, 0.6 -> 8, 0.7 -> 10, 0.55 -> 8; per bin |confidence - accuracy|
    want = (abs(0.9 - 1) + 2 * abs((0.6 + 0.55) / 2 - 0.5) + abs(0.7 - 1)) / 4
    assert ece(mean, y) == pytest.approx(want)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(2, 8, 30).astype(float)   # many ties
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert auroc(a, b) == pytest.approx(pairs)


# ----------------------------------------------------------------------------- log quantizer


@pytest.mark.parametrize("bits,block", [(4, 16), (3, 32), (2, 64)])
def test_log_quantizer_matches_its_definition(bits, block):
    rng = np.random.default_rng(bits)
    sigma = np.exp(rng.normal(-5, 1.5, (3, 64))).astype(np.float32)
    fmt = BayesqUniform(bits, block, "float16")
    lc = log_quantize(sigma, fmt)
    # the definition, written out: u = log sigma - median; per group the min/max range widened to 0,
    # scale rounded to fp16, integer zero point, round to nearest; sigma^ = exp((q - zp) s + median)
    u = np.log(sigma.astype(np.float64))
    off = np.float32(np.median(u))
    v = (u - off).astype(np.float32).reshape(3, -1, block)
    lo, hi = np.minimum(v.min(-1), 0), np.maximum(v.max(-1), 0)
    qmax = 2 ** bits - 1
    s = ((hi - lo) / np.float32(qmax)).astype(np.float16).astype(np.float32)
    zp = np.clip(np.rint(-lo / s), 0, qmax)
    q = np.clip(np.rint(v / s[..., None]) + zp[..., None], 0, qmax)
    want = np.exp((q - zp[..., None]) * s[..., None] + np.float64(off)).reshape(3, 64)
    np.testing.assert_allclose(lc.dequantize(), want, rtol=1e-6)   # float32 output of exp
    assert np.array_equal(lc.codes.codes, q.reshape(3, 64).astype(np.uint8))
    # within half a step in log space: the grid spans every value (min/max), so nothing is clipped
    step = np.repeat(s, block, axis=1)
    assert (np.abs(np.log(lc.dequantize()) - u) <= step / 2 + 1e-5).all()   # 1e-5: fp32 rounding of the logs


def test_std_and_sample_formats_follow_the_mean():
    assert affine_like(BayesqUniform(3, 64, "float16"), 128) == BayesqUniform(3, 64, "float16")
    assert affine_like(BayesqUniform(4, 256, "float16"), 64).block == 64   # a group over the row: one per row
    assert isinstance(affine_like(Float32(), 64), Float32)


# ----------------------------------------------------------------------------- the sampler


K, N = 32, 16


def _identity_model():
    """``y = x @ W``: fed the identity, each run returns the weight it drew."""
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, N])],
                          [numpy_helper.from_array(np.zeros((K, N), np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _posterior(rng, rows):
    mu = rng.standard_normal((K, N)).astype(np.float32)
    sigma = np.exp(rng.normal(-1.5, 0.5, (rows, K))).astype(np.float32)   # view (rows, K) of W (K, N)
    return mu, sigma


def _draws(model, runs, portable=False):
    sess = make_session(model)
    x = np.eye(K, dtype=np.float32)
    return np.stack([sess.run(["y"], {"x": x})[0] for _ in range(runs)])


targets = [False, True] if custom_ops.available() else [True]


@pytest.mark.parametrize("portable", targets)
@pytest.mark.parametrize("rows", [1, N])
def test_vpq_draws_have_the_stored_moments_and_follow_the_seed(portable, rows):
    rng = np.random.default_rng(rows)
    mu, sigma = _posterior(rng, rows)
    fmt = BayesqUniform(4, 16, "float16")
    lc = log_quantize(sigma, fmt)
    m = _identity_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(mu, "W"))
    w = PosteriorWeight("W", Layout((K, N), 0), "p", sigma=SigmaStore(rows, fmt, fmt.pack(lc.codes), lc.offset))
    model = add_sampling(m, [w], "vpq", seed=5, portable=portable)
    S = 1500
    draws = _draws(model, S)
    sig_ref = np.broadcast_to(lc.dequantize(), (N, K)).T      # the numpy reference: dequantized log codes
    # the mean of S draws is within 5 standard errors everywhere (512 entries: a false alarm ~1e-4)
    assert (np.abs(draws.mean(0) - mu) <= 5 * sig_ref / np.sqrt(S)).all()
    # the sample std's relative standard error is 1/sqrt(2S): 5 of them
    assert (np.abs(draws.std(0, ddof=1) / sig_ref - 1) <= 5 / np.sqrt(2 * S)).all()
    # standardized draws look standard normal as a whole (n = 768k: tight)
    z = (draws - mu) / sig_ref
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01    # ~8 standard errors of each at n = 768k
    # same seed: the same sequence in a new session; another seed: another one
    again = _draws(model, 3)
    assert np.array_equal(again, draws[:3])
    other = _draws(set_seed(model, 6), 3)
    assert not np.array_equal(other, draws[:3])
    assert np.array_equal(_draws(set_seed(model, 5), 3), draws[:3])


def test_jq_draws_lie_on_a_grid_of_the_weights_bits():
    rng = np.random.default_rng(3)
    mu, sigma = _posterior(rng, 1)
    m = _identity_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(mu, "W"))
    w = PosteriorWeight("W", Layout((K, N), 0), "p", sigma=SigmaStore(1, values=sigma), bits=3)
    draws = _draws(add_sampling(m, [w], "jq", seed=1), 20)
    for d in draws:
        for col in d.T:                      # a view row (one output) holds at most 2^3 values
            assert len(np.unique(col)) <= 8
        # rounding moves each value by at most half a step of its row's range (widened to 0)
        assert np.abs(d - mu).max() < 10 * sigma.max()


@pytest.mark.parametrize("portable", targets)
def test_spq_picks_the_stored_sets(portable):
    rng = np.random.default_rng(4)
    views = [rng.standard_normal((N, K)).astype(np.float32) for _ in range(3)]
    fmt = BayesqUniform(4, 16, "float16")
    codes = [quantize_sample(v, fmt) for v in views]
    w = PosteriorWeight("W", Layout((K, N), 0), "p", sets=SampleSets(fmt, tuple(fmt.pack(c) for c in codes)))
    model = add_sampling(_identity_model(), [w], "spq", portable=portable)
    assert not any(t.name == "W" or t.name == "W__bq_mean" for t in model.graph.initializer)   # the mean is gone
    sess = make_session(model)
    for s, c in enumerate(codes):
        got = sess.run(["y"], {"x": np.eye(K, dtype=np.float32), SAMPLE_INPUT: np.array(s, np.int64)})[0]
        np.testing.assert_array_equal(got.T, c.dequantize())     # bit-exact decode of set s


# ----------------------------------------------------------------------------- command line


@pytest.mark.skipif(not custom_ops.available(), reason="the bayesq op library is not built")
def test_keep_posterior_end_to_end(tmp_path, mlp_path, capsys):
    data = models.mlp_data(n=96)
    np.savez(tmp_path / "c.npz", **data)
    labels = np.argmax(make_session(str(mlp_path)).run(["logits"], data)[0], 1)   # the model's own classes
    np.save(tmp_path / "y.npy", labels)
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    args = ["compress", str(mlp_path), "--calib", str(tmp_path / "c.npz"), "--quiet", "--keep-posterior",
            "--labels", str(tmp_path / "y.npy")]
    assert main([*args, "--bits", "5", "-o", str(out), "--report", str(rep)]) == 0
    r = json.loads(rep.read_text())
    p = r["posterior"]
    assert r["bits_per_weight"] <= 5 and p["posterior_bits_per_weight"] > 0
    assert r["bits_per_weight"] == pytest.approx(p["mean_bits_per_weight"] + p["posterior_bits_per_weight"])
    assert len(p["prior_tuning"]) == 7 and p["prior_precision"] in [t["prior_precision"] for t in p["prior_tuning"]]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    pred = ["predict", str(out), "--data", str(tmp_path / "c.npz"), "--samples", "4", "--quiet"]
    assert main([*pred, "--seed", "2", "-o", str(tmp_path / "a.npz")]) == 0
    assert main([*pred, "--seed", "2", "-o", str(tmp_path / "b.npz"), "--labels", str(tmp_path / "y.npy")]) == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as z:
        assert (z["epistemic"] > 0).any()
        np.testing.assert_allclose(z["total"], z["aleatoric"] + z["epistemic"], atol=1e-5)   # float32 storage
    assert "accuracy" in capsys.readouterr().out
    # spq: its sets within the budget, picked by bq_sample
    assert main([*args, "--bits", "12", "--sampling", "spq", "--sets", "3", "-o", str(tmp_path / "s.onnx")]) == 0
    assert main(["predict", str(tmp_path / "s.onnx"), "--data", str(tmp_path / "c.npz"), "--quiet"]) == 0
    assert "3 samples (sets)" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [
    (["--labels", "y.npy"], "need --keep-posterior"),
    (["--keep-posterior"], "give --labels"),
    (["--keep-posterior", "--prior-precision", "-1"], "positive"),
    (["--keep-posterior", "--labels", "float.npy"], "integer class"),
    (["--keep-posterior", "--labels", "short.npy"], "per calibration sample (32)"),
    (["--keep-posterior", "--labels", "missing.npy"], "cannot read labels"),
])
def test_keep_posterior_errors(tmp_path, mlp_path, capsys, monkeypatch, extra, msg):
    monkeypatch.chdir(tmp_path)
    np.save("float.npy", np.zeros(32))
    np.save("short.npy", np.zeros(31, np.int64))
    np.savez(tmp_path / "c.npz", **models.mlp_data(n=32))
    code = main(["compress", str(mlp_path), "--bits", "5", "--calib", str(tmp_path / "c.npz"), "--quiet",
                 "-o", str(tmp_path / "o.onnx"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
