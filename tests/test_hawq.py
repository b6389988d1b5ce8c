"""The HAWQ baseline (``--method hawq``): its loss tables are the mean Fisher trace of each site times
the squared min/max rounding error, both recomputed here in numpy; it plans within budget, writes the
same bytes for the same inputs, and says in one line when torch is missing.  Also the report's
all-weights figure."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx import Analysis, Recipe, compress
from bayesq_onnx.cli import main
from bayesq_onnx.formats import Float32
from bayesq_onnx.plan.greedy import lower_hull

D, H = 32, 64   # x (n, D) -> W1 (D, H) -> Relu -> W2 (H, D) -> y: every view has <= 128 rows (summed exactly)


def _two_layer(seed=0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    W1 = (rng.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32)
    W2 = (rng.standard_normal((H, D)) / np.sqrt(H)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                          [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, {"x": rng.standard_normal((48, D)).astype(np.float32)}


def _fisher_traces(m, x) -> dict[str, float]:
    """Mean Fisher trace per weight of the unit Gaussian on y = relu(x W1) W2: the Fisher is J^T J, so
    its trace is the squared norm of the Jacobian, averaged over samples.  dy_j/dW2[i, j] = r_i;
    dy_j/dW1[k, i] = x_k [a_i > 0] W2[i, j]."""
    W1, W2 = (numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer)
    x = x.astype(np.float64)
    a = x @ W1
    t2 = D * np.square(np.maximum(a, 0)).sum(1)
    t1 = np.square(x).sum(1) * ((a > 0) * np.square(W2).sum(1)).sum(1)
    return {"W1": t1.mean() / W1.size, "W2": t2.mean() / W2.size}


def _minmax_error(view: np.ndarray, bits: int, block: int) -> float:
    """||W - Q(W)||^2 on per-group min/max ranges (widened to include 0), integer zero points, rounded to nearest."""
    qmax = 2 ** bits - 1
    total = 0.0
    for g in range(0, view.shape[1], block):
        w = view[:, g:g + block].astype(np.float64)
        lo = np.minimum(w.min(1, keepdims=True), 0).astype(np.float32)
        hi = np.maximum(w.max(1, keepdims=True), 0).astype(np.float32)
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32).astype(np.float64)
        zp = np.clip(np.rint(-lo / scale), 0, qmax)
        q = np.clip(np.rint(w / scale) + zp, 0, qmax)
        total += float(np.square((q - zp) * scale - w).sum())
    return total


# the Fisher is summed from float32 gradients (flushed to float64 every 64 rows, fisher.SquareSums) over
# 36 samples: ~1e-6 relative; the rounding errors agree to float64 summation order
RTOL = 1e-4


def test_hawq_tables_are_mean_fisher_trace_times_squared_minmax_error():
    pytest.importorskip("torch")
    m, data = _two_layer()
    # native formats only (affine min/max grids, no codebooks), groups of 16 and 32
    an = Analysis(m, Recipe(bits=4.0, method="hawq", custom_ops=False, blocks=(16, 32)), calib=data)
    losses = an.losses
    assert an.recipe.table_source == "hawq"
    traces = _fisher_traces(m, an.fit["x"])   # the trace is taken on the fitting samples, not the held-back ones
    W = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for s in an.sites:
        fs = an.candidates[s.name]
        view = W[s.name].T                                      # MatMul: one row per output, groups along inputs
        err = np.array([0.0 if isinstance(f, Float32) else _minmax_error(view, f.bits, f.block) for f in fs])
        want = traces[s.name] * err
        costs = np.array([f.stored_bits(s.rows, s.L) for f in fs], np.float64)
        hull = set(lower_hull(costs, err))                     # off the hull: never worth taking
        assert len(hull) >= 3 and any(isinstance(fs[j], Float32) for j in hull)
        for j, f in enumerate(fs):
            if j in hull:
                np.testing.assert_allclose(losses[s.name][j], want[j], rtol=RTOL, err_msg=f"{s.name} {f.name}")
            else:
                assert losses[s.name][j] == np.inf, (s.name, f.name)
    # the two sites' traces differ, so the product (not the error alone) decides between them
    assert not np.isclose(traces["W1"], traces["W2"], rtol=0.1)


def test_hawq_reads_the_trace_from_a_curvature_file(tmp_path):
    """With --curvature no torch is needed: the trace is the file's mean diagonal (times evidence)."""
    m, data = _two_layer()
    rng = np.random.default_rng(3)
    curv = {"W1": rng.random((D, H)).astype(np.float32), "W2": 5 * rng.random((H, D)).astype(np.float32)}
    np.savez(tmp_path / "c.npz", **curv)
    r = Recipe(bits=4.0, method="hawq", custom_ops=False, blocks=(16, 32), curvature=str(tmp_path / "c.npz"))
    an = Analysis(m, r, calib=data)
    W = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for s in an.sites:
        fs = an.candidates[s.name]
        j = min(range(len(fs)), key=lambda j: fs[j].stored_bits(s.rows, s.L))   # the cheapest: on every hull
        want = r.evidence * curv[s.name].astype(np.float64).mean() * _minmax_error(W[s.name].T, fs[j].bits,
                                                                                   fs[j].block)
        np.testing.assert_allclose(an.losses[s.name][j], want, rtol=RTOL)


def test_a_site_no_gradient_reaches_costs_nothing_and_stays_finite(tmp_path):
    """A trace of 0 (a curvature file of zeros for one weight) makes that weight's hull free, never
    NaN (0 * inf): found by tools/fuzz.py on all-zero calibration data."""
    import warnings

    m, data = _two_layer()
    curv = {"W1": np.zeros((D, H), np.float32), "W2": np.ones((H, D), np.float32)}
    np.savez(tmp_path / "c.npz", **curv)
    r = Recipe(bits=4.0, method="hawq", custom_ops=False, blocks=(16, 32), curvature=str(tmp_path / "c.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # numpy's "invalid value" warning fails the test
        an = Analysis(m, r, calib=data)
        t = an.losses["W1"]
    assert not np.isnan(t).any() and np.all(t[np.isfinite(t)] == 0) and np.isinf(t).any()


def test_hawq_runs_within_budget_and_writes_the_same_bytes(tmp_path):
    pytest.importorskip("torch")
    m, data = models.mlp(), models.mlp_data()
    a = compress(m, bits=3.5, method="hawq", calib=data)
    b = compress(m, bits=3.5, method="hawq", calib=data)
    rep = a.report
    assert rep["method"] == "hawq" and rep["tables"] == "hawq"
    assert rep["bits_per_weight"] <= 3.5
    assert all(l["table_loss"] is not None for l in rep["layers"])   # the knapsack planned on hawq's tables
    assert rep["plan_check"]["chosen"] in {c["plan"] for c in rep["plan_check"]["candidates"]}
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_hawq_without_torch_or_curvature_file_fails_in_one_line(tmp_path, mlp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)   # what importlib sees when torch is not installed
    out = tmp_path / "q.onnx"
    assert main(["compress", str(mlp_path), "--bits", "4", "--method", "hawq", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method hawq needs torch" in err[0] and "--curvature" in err[0], err
    assert not out.exists()


def test_report_counts_bits_over_all_weights():
    """bits_per_weight_all: quantized weights as stored plus every other float initializer (here the
    bias b0 and the weight 'small', below min_elements) at 32 bits."""
    m = models.mlp()
    rep = compress(m, bits=4.0, method="gptq", calib=models.mlp_data()).report
    others = {t.name: numpy_helper.to_array(t).size for t in m.graph.initializer if t.name in ("b0", "small")}
    assert {s["name"] for s in rep["skipped"]} == {"small"}
    n = rep["n_weights"] + sum(others.values())
    assert rep["n_weights_all"] == n
    stored = sum(l["stored_bits"] for l in rep["layers"])
    assert rep["bits_per_weight_all"] == pytest.approx((stored + 32 * sum(others.values())) / n, rel=1e-12)
    assert rep["bits_per_weight"] < rep["bits_per_weight_all"]   # fp32 leftovers raise the model's figure


def test_tables_option_is_ignored_with_hawq_and_says_so(tmp_path, mlp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)   # stop right after the recipe: no compression needed here
    main(["compress", str(mlp_path), "--bits", "4", "--method", "hawq", "--tables", "proxy",
          "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "bayesq-onnx: warning: --tables does nothing with --method hawq (its loss tables are always hawq)"
