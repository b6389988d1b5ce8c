"""Sequential mode (docs/design.md, "Sequential"): blocks rounded in graph order, each calibrated on
the outputs of the blocks already quantized, as the reference GPTQ pipeline does."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx import Analysis, Recipe, compress
from bayesq_onnx.plan.check import Contender
from bayesq_onnx.plan.planner import uniform_plans
from bayesq_onnx.quantize.rounding import round_gptq

BITS = 3.0   # a budget that takes a low-bit uniform format: errors large enough to feed forward


def _chain(seed=0, dims=(64, 128, 128, 64)) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> MatMul W1 -> Relu -> MatMul W2 -> Relu -> MatMul W3 -> y: three sites, three segments."""
    rng = np.random.default_rng(seed)
    ws = {f"W{i + 1}": (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
          for i, (a, b) in enumerate(zip(dims, dims[1:]))}
    nodes, x = [], "x"
    for i, name in enumerate(ws):
        nodes.append(helper.make_node("MatMul", [x, name], [f"a{i}"]))
        x = f"a{i}"
        if i + 1 < len(ws):
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dims[0]])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", dims[-1]])],
                          [numpy_helper.from_array(w, k) for k, w in ws.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, ws


def _gptq_codes(model, data, sequential: bool):
    """``--method gptq``'s codes per site, and the plan they are in."""
    an = Analysis(model, Recipe(bits=BITS, method="gptq", sequential=sequential), calib=data)
    assert len(an.stream) == 3                      # one segment per layer
    plan = uniform_plans(an.sites, an.candidates, BITS * an.n_weights)[0]
    packed, _, _ = an._round([Contender(plan)])
    return {s.name: plan.choice[s.name].unpack(packed[0][s.name], s.rows, s.L) for s in an.sites}, plan


def _reference_pipeline(ws, x, plan, sequential: bool):
    """The reference pipeline in numpy (IST-DASLab/gptq ``opt_sequential``): layer by layer, H = X^T X
    of the layer's input, GPTQ with dynamic groups, then the next layer's input from this layer's
    quantized weights (``sequential``) or from its fp32 weights."""
    codes = {}
    for i, (name, w) in enumerate(ws.items()):
        fmt = plan.choice[name]
        x64 = x.astype(np.float64)
        q = round_gptq(np.ascontiguousarray(w.T), x64.T @ x64, None, None, fmt.bits, fmt.block, damp=0.01,
                       round_scale=getattr(fmt, "round_scales", None))
        codes[name] = q
        x = x @ (q.dequantize().T if sequential else w)
        if i + 1 < len(ws):
            x = np.maximum(x, 0)
    return codes


@pytest.fixture(scope="module")
def chain():
    m, ws = _chain()
    data = models.mlp_data(n=256)
    seq, plan = _gptq_codes(m, data, True)
    plain, plan2 = _gptq_codes(m, data, False)
    assert plan.choice == plan2.choice
    return m, ws, data, plan, seq, plain


def test_sequential_gptq_equals_the_reference_pipeline(chain):
    m, ws, data, plan, seq, plain = chain
    ref = _reference_pipeline(ws, data["x"], plan, sequential=True)
    for name in ws:
        # The layer inputs here come from onnxruntime's float32 MatMul, the reference's from numpy's:
        # the same products summed in another order (last-bit differences), so H differs by ~1e-7
        # relative and a weight whose GPTQ-updated value sits that close to a rounding boundary can take
        # the neighbouring code (and GPTQ carries the change along its row).  Measured: 0 such codes
        # here; 0.5% allows a few without letting a wrong pipeline through (the non-sequential
        # codes below differ from these in over 10%).
        same = np.mean(seq[name].codes == ref[name].codes)
        assert same >= 0.995, (name, same)
        if name == "W1":   # the first layer reads the graph input: the same H, the same codes exactly
            np.testing.assert_array_equal(seq[name].codes, ref[name].codes)


def test_sequential_differs_from_the_fp32_calibrated_pipeline_after_the_first_layer(chain):
    m, ws, data, plan, seq, plain = chain
    ref_plain = _reference_pipeline(ws, data["x"], plan, sequential=False)
    np.testing.assert_array_equal(seq["W1"].codes, plain["W1"].codes)
    for name in ("W2", "W3"):
        # the non-sequential codes are the fp32-calibrated reference's ...
        assert np.mean(plain[name].codes == ref_plain[name].codes) >= 0.995   # tolerance: as above
        # ... and the sequential ones are not (the input statistics moved with layer 1's errors)
        assert np.mean(seq[name].codes == plain[name].codes) < 0.9


@pytest.mark.parametrize("sequential", [False, True])
def test_the_plan_checks_gptq_contender_is_method_gptq_on_the_fitting_data(chain, monkeypatch, sequential):
    """The plan check's reference GPTQ contender ships the codes ``--method gptq`` (sequential by
    default) rounds from the same fitting data, whether bayesq itself runs sequentially or not."""
    import bayesq_onnx.api as api
    m, ws, data, plan, seq, plain = chain
    seen = {}
    real = api.check_plans

    def keep(contenders, packed, sites, *args):
        seen.update(contenders=contenders, packed=packed, sites=sites)
        return real(contenders, packed, sites, *args)

    monkeypatch.setattr(api, "check_plans", keep)
    an = Analysis(m, Recipe(bits=BITS, sequential=sequential), calib=data)
    an.compress(BITS)
    j = next(k for k, c in enumerate(seen["contenders"]) if c.reference)
    ref = seen["contenders"][j].plan
    want, gptq_plan = _gptq_codes(m, an.fit, sequential=True)
    assert ref.choice == gptq_plan.choice
    for s in seen["sites"]:
        got = ref.choice[s.name].unpack(seen["packed"][j][s.name], s.rows, s.L)
        np.testing.assert_array_equal(got.codes, want[s.name].codes)
    # not the fp32-calibrated codes after the first layer (what the contender was before)
    fp32, _ = _gptq_codes(m, an.fit, sequential=False)
    assert np.mean(fp32["W3"].codes == want["W3"].codes) < 0.9


def test_a_gptq_plan_that_wins_the_check_ships_method_gptqs_bytes(chain, reference_wins):
    """The check picks gptq's plan on held-back samples; what ships is then fitted on all of them:
    the initializers ``--method gptq`` writes from the same calibration data, bit for bit."""
    m, ws, data, plan, seq, plain = chain
    ours = compress(m, Recipe(bits=BITS), calib=data)
    gptq = compress(m, Recipe(bits=BITS, method="gptq"), calib=data)
    assert ours.report["plan"].startswith("gptq ") and ours.report["plan_check"]["refit_on_all_samples"]
    assert ours.report["plan"] == "gptq " + gptq.report["plan"]
    init = {t.name: numpy_helper.to_array(t) for t in gptq.model.graph.initializer}
    assert {t.name for t in ours.model.graph.initializer} == init.keys()
    for t in ours.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), init[t.name], err_msg=t.name)


@pytest.mark.parametrize("build, data, passes", [(models.loop, models.loop_data, 1),
                                                 (models.residual, models.residual_data, 2)])
def test_gptqs_contender_gets_a_pass_of_its_own_only_where_blocks_feed_forward(monkeypatch, build, data, passes):
    """A model that cannot be cut has nothing to feed forward, even under --sequential: every
    contender is rounded in one pass; one that can be cut rounds gptq's plan on its own stream."""
    calls = []
    real = Analysis._round_pass
    monkeypatch.setattr(Analysis, "_round_pass", lambda self, contenders, *a: (calls.append(len(contenders)),
                                                                              real(self, contenders, *a))[1])
    compress(build(), Recipe(bits=3.0, sequential=True), calib=data())
    assert len(calls) == passes


def test_gptqs_pass_runs_beside_the_tables_on_the_first_budget_with_the_same_bytes(monkeypatch):
    """The reference GPTQ contender's own pass needs no loss table: on an analysis's first budget it
    runs beside the tables' pass (its blocks within their budget), on a later one beside the
    knapsack's rounding; the bytes are the same either way."""
    started = []   # per reference pass: were the tables still to come when it started?
    real = Analysis._round_pass

    def spy(self, contenders, *a):
        if all(c.reference for c in contenders):
            started.append(self._tables is None)
        return real(self, contenders, *a)

    monkeypatch.setattr(Analysis, "_round_pass", spy)
    fresh = Analysis(models.residual(), Recipe(bits=3.0), calib=models.residual_data()).compress(3.0)
    later = Analysis(models.residual(), Recipe(bits=3.0), calib=models.residual_data())
    later.losses
    assert started == [True]
    tables_first = later.compress(3.0)
    assert started == [True, False]
    assert fresh.model.SerializeToString() == tables_first.model.SerializeToString()


def test_sequential_output_is_deterministic_and_reported(tmp_path):
    m, _ = _chain(seed=3)
    data = models.mlp_data(n=128)
    outs = []
    for i in range(2):
        res = compress(m, Recipe(bits=BITS, sequential=True), calib=data, output=tmp_path / f"q{i}.onnx")
        outs.append((tmp_path / f"q{i}.onnx").read_bytes())
    assert outs[0] == outs[1]
    assert res.report["sequential"] == {"on": True, "segments": 3}
    assert res.report["recipe"]["sequential"] is True
    plain = compress(m, Recipe(bits=BITS), calib=data)
    assert plain.report["sequential"]["on"] is False


@pytest.mark.parametrize("build, data", [(models.residual, models.residual_data), (models.tied, models.tied_data),
                                         (models.cnn, models.cnn_data)])
def test_sequential_stays_streamed(monkeypatch, build, data):
    """Still one segment at a time: each segment runs again once its own sites are rounded, on
    exactly those sites' quantized weights (nothing of another segment's is decoded or held), before
    the next segment starts; every other run is as without --sequential."""
    from bayesq_onnx.runtime.stream import Stream
    an = Analysis(build(), Recipe(bits=3.0, sequential=True), calib=data())
    an.losses                                 # the tables' pass first (fp32, as without --sequential)
    runs = []
    advance = Stream.advance
    caller = threading.get_ident()
    monkeypatch.setattr(Stream, "advance", lambda self, k, states, overrides=None, keep=None: (
        self is an.stream and threading.get_ident() == caller and runs.append((k, sorted(overrides or ()))),
        advance(self, k, states, overrides, keep))[1])
    an.compress(3.0)
    # the knapsack's rounding pass, in the caller's thread (the reference GPTQ's runs beside it, in a
    # thread of its own: parallel.side_by_side; the plan check's passes follow)
    ours = runs[:next(i for i, r in enumerate(runs) if r[0] == len(an.stream) - 1) + 1]
    quantized = {s.name for s in an.sites}    # every site takes a quantized format at 3 bits here
    want = []
    for k in range(len(an.stream)):
        want.append((k, []))
        here = sorted(s.name for s in an.sites if an.stream.last_reader(s.name) == k and s.name in quantized)
        if here and k + 1 < len(an.stream):
            want.append((k, here))
    assert ours == want


def test_a_model_that_cannot_be_cut_warns_and_reports_it(caplog, monkeypatch):
    import logging
    monkeypatch.setattr(logging.getLogger("bayesq_onnx"), "propagate", True)   # the CLI's tests turn it off
    res = compress(models.loop(), Recipe(bits=3.0, sequential=True), calib=models.loop_data())
    assert "--sequential does nothing here" in caplog.text
    assert res.report["sequential"] == {"on": False, "segments": 1}


@pytest.mark.parametrize("flag, method, on", [("--sequential", "bayesq", True), ("--no-sequential", "gptq", False)])
def test_cli_flag(tmp_path, mlp_path, flag, method, on):
    import json
    from bayesq_onnx.cli import main
    np.savez(tmp_path / "c.npz", **models.mlp_data())
    rep = tmp_path / "r.json"
    assert main(["compress", str(mlp_path), "--bits", "3", "--method", method, flag, "--calib",
                 str(tmp_path / "c.npz"), "-o", str(tmp_path / "q.onnx"), "--report", str(rep), "--quiet"]) == 0
    r = json.loads(rep.read_text())
    assert r["recipe"]["sequential"] is on and r["sequential"]["on"] is on


@pytest.mark.parametrize("build, data, budgets", [(models.residual, models.residual_data, (3.0, 4.0, 2.5)),
                                                  # convolutions: grids chosen end to end per budget
                                                  (models.cnn, models.cnn_data, (2.6, 3.0, 4.5))])
def test_an_analysis_used_for_several_budgets_gives_the_bytes_of_separate_runs(tmp_path, build, data, budgets):
    """What an analysis keeps from one budget's rounding for the next (only the first block's codes
    and measured grids: no quantized weight reaches it) leaves every budget's bytes as a fresh run's."""
    r = Recipe(bits=3.0, sequential=True)
    an = Analysis(build(), r, calib=data())
    an.losses
    from_tables = set(an.grids)
    for bits in budgets:
        an.compress(bits, output=tmp_path / f"a{bits}.onnx")
        compress(build(), r, bits=bits, calib=data(), output=tmp_path / f"b{bits}.onnx")
        assert (tmp_path / f"a{bits}.onnx").read_bytes() == (tmp_path / f"b{bits}.onnx").read_bytes(), bits
    assert an._rounded    # the first block's results were kept
    # and the grids measured for it, for no later site (on Fashion-MNIST's CNN a conv's grid measured at
    # 2.87 bits and reused at 3.0 cost 1.2 points of accuracy against a fresh run at 3.0)
    first = min(an.stream.last_reader(s.name) for s in an.sites)
    assert {name for name, _ in set(an.grids) - from_tables} <= \
        {s.name for s in an.sites if an.stream.last_reader(s.name) == first}


def test_defaults_per_method_and_where_it_changes_nothing():
    """On by default for gptq only (README, "Measured"); codes rounded to nearest never read the
    statistics, so rtn and hqq-int never run sequentially."""
    assert Recipe(bits=3.0, method="gptq").rounds_sequentially
    assert not Recipe(bits=3.0, method="gptq", sequential=False).rounds_sequentially
    assert not Recipe(bits=3.0).rounds_sequentially and Recipe(bits=3.0, sequential=True).rounds_sequentially
    assert not Recipe(bits=3.0, method="rtn", sequential=True).rounds_sequentially
    with pytest.raises(ValueError, match="sequential must be"):
        Recipe(bits=3.0, sequential="yes")
    m, _ = _chain(seed=1)
    assert compress(m, Recipe(bits=BITS, method="gptq"), calib=models.mlp_data()).report["sequential"]["on"]


def test_cli_warns_where_sequential_does_nothing(tmp_path, mlp_path, capsys):
    from bayesq_onnx.cli import main
    assert main(["compress", str(mlp_path), "--bits", "3", "--method", "rtn", "--sequential",
                 "-o", str(tmp_path / "q.onnx")]) == 0
    assert "--sequential does nothing with --method rtn" in capsys.readouterr().err
