"""End to end on small graphs built here: compress, lower, run in onnxruntime, check the report."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import models
from bayesq_onnx import Analysis, Recipe, compress, make_session
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS
from bayesq_onnx.runtime.session import _foldable, session_options

CASES = {"mlp": (models.mlp, models.mlp_data), "embed": (models.embed, models.embed_data),
         "cnn": (models.cnn, models.cnn_data), "tied": (models.tied, models.tied_data)}


def _save(tmp_path, name, model):
    p = tmp_path / f"{name}.onnx"
    onnx.save(model, p)
    return p


def _run(path, data):
    s = make_session(str(path))
    return s.run(None, data)


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bits", [3.0, 4.5])
@pytest.mark.parametrize("offer", [{}, {"scaled_lut_bits": ()}], ids=["default", "no-scaled"])
def test_compress_runs_within_budget(tmp_path, case, bits, offer):
    build, data_fn = CASES[case]
    src = _save(tmp_path, case, build())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    data = data_fn()
    out = tmp_path / "q.onnx"
    res = compress(src, Recipe(bits=bits, **offer), calib=data, output=out, report=tmp_path / "r.json")
    rep = res.report
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest, "input model was modified"
    assert rep["bits_per_weight"] <= bits
    assert rep["code_bits_per_weight"] <= rep["bits_per_weight"]
    assert rep["output_bytes"] == out.stat().st_size
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600
    assert (tmp_path / "r.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "q.onnx", "r.json"])  # no temp files left

    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: t for t in q.graph.initializer}
    stored = 0
    for layer in rep["layers"]:
        if layer["format"] == "float32":
            assert layer["name"] in inits
            continue
        assert layer["name"] not in inits, f"fp32 copy of quantized {layer['name']} remains"
        prefix = "bq_" + layer["name"] + "_"
        # (a tied head's Reshape target shape is graph plumbing, like the Transpose it replaces)
        mine = [t for t in q.graph.initializer if t.name.startswith(prefix) and not t.name.endswith("_head_shape")]
        # stored_bits in the report is exactly what the file holds for this weight
        assert sum(8 * len(t.raw_data) for t in mine) == layer["stored_bits"], layer["name"]
        stored += layer["stored_bits"]
    assert stored > 0

    # what the plan check measured (dequantized weights in fp32 on held-back data) is what the
    # lowered model computes with onnxruntime's kernels
    held = {k: v[-len(v) // 4:] for k, v in data.items()}
    ref, got = _run(src, held), _run(out, held)
    measured = np.mean([np.sum((g - r) ** 2) / np.sum(r ** 2) for r, g in zip(ref, got)])
    chosen = [c for c in rep["plan_check"]["candidates"] if c["plan"] == rep["plan"]][0]
    # accuracy level 0 kernels compute in fp32 like the probe; only summation order differs
    assert measured == pytest.approx(chosen["distortion"], rel=1e-3)
    assert measured < 1.0  # the model still carries signal
    got = _run(out, data)
    # onnxruntime's kernels agree with the numpy reference ops on the lowered graph
    refeval = ReferenceEvaluator(q, new_ops=REFERENCE_OPS).run(None, data)
    for a, b in zip(got, refeval):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # fp32 summation order differs between kernels


NATIVE = {"custom_ops": False}  # onnxruntime's own formats only


def test_opset_raised_only_for_blocked_dequantize(tmp_path):
    out = tmp_path / "q.onnx"
    for bits, method in ((3.0, "bayesq"), (6.5, "rtn")):
        rep = compress(_save(tmp_path, "cnn", models.cnn()), Recipe(bits=bits, method=method, **NATIVE),
                       calib=models.cnn_data(), output=out).report
        q = onnx.load(out)
        used = {l["format"] for l in rep["layers"]}
        assert "DequantizeLinear" in {n.op_type for n in q.graph.node}
        # INT2 needs DequantizeLinear-25; INT4/INT8 with block_size need 21
        want = 25 if any(f.startswith("dq-uint2") for f in used) else 21
        assert {o.domain: o.version for o in q.opset_import}[""] == want, used
        assert q.ir_version == {21: 10, 25: 13}[want]
    out2 = tmp_path / "q2.onnx"
    compress(_save(tmp_path, "mlp", models.mlp()), Recipe(bits=4.5, **NATIVE), calib=models.mlp_data(), output=out2)
    q2 = onnx.load(out2)
    assert {o.domain: o.version for o in q2.opset_import}[""] == models.OPSET
    assert "MatMulNBits" in {n.op_type for n in q2.graph.node}


@pytest.mark.parametrize("native", [False, True])
def test_tied_embedding_is_one_site_stored_once(tmp_path, native):
    """One table for the Gather and the output head: bayesq.GatherAffine/GatherLut and MatMulAffine/
    MatMulLut read the same packed tensors; natively GatherBlockQuantized's, reshaped for MatMulNBits."""
    out = tmp_path / "q.onnx"
    rep = compress(_save(tmp_path, "tied", models.tied()), Recipe(bits=4.5, **(NATIVE if native else {})),
                   calib=models.tied_data(), output=out).report
    layer = {l["name"]: l for l in rep["layers"]}["E"]
    assert layer["op_type"] == "Gather/MatMul" and layer["format"].startswith("gbq-" if native else "bq-")
    q = onnx.load(out)
    ops = [n.op_type for n in q.graph.node]
    assert "Transpose" not in ops
    if native:
        assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    else:
        gather = next(n for n in q.graph.node if n.op_type.startswith("Gather"))
        head = next(n for n in q.graph.node if n.op_type.startswith("MatMul") and "bq_E_B" in n.input)
        assert gather.domain == head.domain == "bayesq" and list(gather.input[1:]) == list(head.input[1:len(gather.input)])
    # the table's bytes appear once: both ops read the same initializers
    assert sum(8 * len(t.raw_data) for t in q.graph.initializer
               if t.name.startswith("bq_E_") and t.name != "bq_E_head_shape") == layer["stored_bits"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_uniform_baselines_give_embeddings_the_same_bits(tmp_path, method):
    """With the bayesq ops an embedding takes any width, so a uniform 3-bit plan is 3 bits on the
    Gather too; GatherBlockQuantized (2/4/8 bits only) forces the plan down to 2 bits everywhere.
    The 3-bit model runs as its reference ops say and is closer to fp32 than the 2-bit one."""
    src = _save(tmp_path, "embed", models.embed())
    data = models.embed_data()
    bits = 3.4    # rows of 64: b3-g64 stores 3 + 16/64 (fp16 scale) + 8/64 (a zero-point byte) = 3.375
    out, out2 = tmp_path / "q.onnx", tmp_path / "q2.onnx"
    ours = {l["name"]: l for l in compress(src, Recipe(bits=bits, method=method), calib=data, output=out).report["layers"]}
    assert ours["E"]["format"] == "bq-u3-g64-f16" and {l["bits"] for l in ours.values()} == {3}
    native = compress(src, Recipe(bits=bits, method=method, **NATIVE), calib=data, output=out2).report["layers"]
    assert {l["name"]: l["bits"] for l in native} == {"E": 2, "W": 2, "Wout": 2}
    assert "GatherAffine" in {n.op_type for n in onnx.load(out).graph.node}
    y, y2, ref = (make_session(m).run(None, data)[0] for m in (out, out2, src))
    want = ReferenceEvaluator(str(out), new_ops=REFERENCE_OPS).run(None, data)[0]
    # two fp32 matmuls of width 64 after the lookup: 1e-5 relative is far above their rounding and
    # far below a wrong row or table (O(1))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.square(y - ref).mean() < np.square(y2 - ref).mean()


def test_same_seed_same_bytes(tmp_path):
    src = _save(tmp_path, "mlp", models.mlp())
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    compress(src, Recipe(bits=3.0, seed=3), calib=None, output=a)
    compress(src, Recipe(bits=3.0, seed=3), calib=None, output=b)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_same_bytes_for_any_number_of_worker_threads(tmp_path, monkeypatch, case):
    """Sites are analysed, measured and packed on a thread pool (bayesq_onnx/parallel.py): the
    output must not depend on how many threads there are."""
    build, data = CASES[case]
    src = _save(tmp_path, case, build())
    out = []
    for n in ("1", "3"):
        monkeypatch.setenv("BAYESQ_WORKERS", n)
        out.append(tmp_path / f"w{n}.onnx")
        compress(src, Recipe(bits=3.0), calib=data(), output=out[-1])
    assert out[0].read_bytes() == out[1].read_bytes()


def test_same_bytes_for_any_number_of_worker_threads_where_blas_threads_too(tmp_path, monkeypatch):
    """As above on matrices large enough for OpenBLAS to split its work over the cores (768 x 1024
    weights, 256 rows): its sums depend on how many threads it takes, so every pass runs it on one,
    one worker or several.  Before, one worker left BLAS on all cores and the bytes differed (on 2
    cores; on one core BLAS never splits and this cannot fail)."""
    src = _save(tmp_path, "wide", models.residual(d=768, h=1024, blocks=2))
    out = []
    for n in ("1", "3"):
        monkeypatch.setenv("BAYESQ_WORKERS", n)
        out.append(tmp_path / f"w{n}.onnx")
        compress(src, Recipe(bits=3.0), calib=models.mlp_data(n=256, d=768), output=out[-1])
    assert out[0].read_bytes() == out[1].read_bytes()


@pytest.mark.parametrize("method", ["bayesq", "gptq"])
def test_analysis_reused_across_budgets_gives_the_same_bytes(tmp_path, method):
    """One analysis (statistics, grids, codes, tables) serves several budgets exactly as separate
    compress calls do."""
    src, calib = _save(tmp_path, "mlp", models.mlp()), models.mlp_data()
    analysis = Analysis(src, Recipe(bits=1.0, method=method), calib=calib)
    for bits in (3.0, 4.5):
        a, b = tmp_path / f"a{bits}.onnx", tmp_path / f"b{bits}.onnx"
        ra = analysis.compress(bits, output=a).report
        rb = compress(src, Recipe(bits=bits, method=method), calib=calib, output=b).report
        assert a.read_bytes() == b.read_bytes()
        assert ra["plan"] == rb["plan"] and ra["bits_per_weight"] <= bits


def test_report_contract(tmp_path):
    res = compress(_save(tmp_path, "mlp", models.mlp()), Recipe(bits=3.0), calib=models.mlp_data())
    r = res.report
    for key in ("bits_per_weight", "code_bits_per_weight", "budget", "n_weights", "seconds", "layers", "skipped"):
        assert key in r
    for layer in r["layers"]:
        assert set(layer) >= {"name", "op_type", "shape", "format", "bits", "block_size", "expected_loss"}
    assert {s["name"] for s in r["skipped"]} == {"small"}
    assert r["n_weights"] == 64 * 128 + 128 * 128 + 64 * 128 + 64 * 32
    assert r["plan_check"]["chosen"] in [c["plan"] for c in r["plan_check"]["candidates"]]


def test_uniform_plans_report_no_expected_loss(tmp_path, request):
    """No expected loss chose a uniform plan: where one ships -- the reference GPTQ plan winning the
    check, or a uniform method's -- its layers carry none (None), while the knapsack's layers do."""
    src, calib = _save(tmp_path, "mlp", models.mlp()), models.mlp_data()
    knapsack = compress(src, Recipe(bits=3.0), calib=calib).report
    assert knapsack["plan"] == "knapsack"
    assert all(isinstance(l["expected_loss"], float) for l in knapsack["layers"])
    for method in ("gptq", "rtn"):
        uniform = compress(src, Recipe(bits=3.0, method=method), calib=calib).report
        assert uniform["plan"].startswith("uniform ")
        assert all(l["expected_loss"] is None for l in uniform["layers"])
    request.getfixturevalue("reference_wins")
    reference = compress(src, Recipe(bits=3.0), calib=calib).report
    assert reference["plan"].startswith("gptq ")
    assert all(l["expected_loss"] is None for l in reference["layers"])


def test_an_analysis_keeps_the_knapsacks_expected_losses_across_budgets(tmp_path):
    """A later budget reuses an earlier one's rounding: a format the knapsack shares with a uniform
    plan the check rates (which gets no expected loss) still has its own expected loss there."""
    src, calib = _save(tmp_path, "mlp", models.mlp()), models.mlp_data()
    # closed-form tables: the check rates three uniform plans with our grids; at 3.0 bits one is
    # 2-bit groups of 128, which the knapsack gives one of the weights where no scaled codebook is
    # offered (offered, they take the others' place)
    analysis = Analysis(src, Recipe(bits=3.0, tables="closed_form", scaled_lut_bits=()), calib=calib)
    for bits in (3.0, 4.0, 3.0):
        r = analysis.compress(bits).report
        assert r["plan"] == "knapsack"
        assert all(isinstance(l["expected_loss"], float) for l in r["layers"]), bits
    assert "bq-u2-g128-f16" in [l["format"] for l in r["layers"]]
    assert "uniform b2-g128" in [c["plan"] for c in r["plan_check"]["candidates"]]


def test_bayesq_at_least_as_accurate_as_rtn(tmp_path):
    """Same budget, held-out data: the product rule plus error feedback must not lose to RTN."""
    src = _save(tmp_path, "mlp", models.mlp())
    calib, test = models.mlp_data(64, seed=1), models.mlp_data(256, seed=7)
    ref = _run(src, test)[0]
    errs = {}
    for method in ("rtn", "bayesq"):
        out = tmp_path / f"{method}.onnx"
        rep = compress(src, Recipe(bits=3.0, method=method), calib=calib, output=out).report
        assert rep["bits_per_weight"] <= 3.0
        errs[method] = _rel_err(_run(out, test)[0], ref)
    assert errs["bayesq"] <= errs["rtn"], errs


def test_curvature_file_drives_closed_form_tables(tmp_path):
    """The CURV.npz contract: initializer names -> diagonal curvature in the initializer's shape."""
    m = models.mlp()
    rng = np.random.default_rng(0)
    shapes = {"W0": (64, 128), "W1": (128, 128), "W2T": (64, 128), "W3": (64, 32)}
    curv = tmp_path / "curv.npz"
    np.savez(curv, **{k: rng.random(s).astype(np.float32) for k, s in shapes.items()})
    rep = compress(_save(tmp_path, "mlp", m), Recipe(bits=3.5, curvature=str(curv)), calib=models.mlp_data()).report
    assert rep["curvature"] == "file" and rep["tables"] == "closed_form"
    assert rep["bits_per_weight"] <= 3.5
    tabled = [l for l in rep["layers"] if l["table_loss"] is not None]  # None: off the pre-screen hull
    assert tabled or rep["plan"] != "knapsack"
    for layer in tabled:
        # closed-form tables: the allocator's input is the expected loss itself
        # the same closed form, once as the table entry and once for the report: equal to float rounding
        assert layer["table_loss"] == pytest.approx(layer["expected_loss"], rel=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "embed"])
def test_kron_tables_are_the_layer_loss_times_one_measured_factor_per_site(tmp_path, name):
    """``tables="kron"`` (the default): within a site the entries keep the predicted layer losses'
    ratios; the site's factor is the measured output distortion of one candidate's real codes per
    unit of their layer output error, measured on samples left out of the ``X^T X`` those errors
    come from.  On a convolution GPTQ rounds, the candidates that store fewer bits than that
    reference carry their own measured distortion instead, and so do a looked-up table's that store
    fewer than TABLE_LINEAR_BITS."""
    from bayesq_onnx.plan.tables import TABLE_LINEAR_BITS, _scale_reference
    from bayesq_onnx.calib.readers import n_samples, take
    from bayesq_onnx.plan.proxy import OutputDistortion

    src = _save(tmp_path, name, getattr(models, name)())
    recipe = Recipe(bits=3.0)
    assert recipe.table_source == "kron"
    analysis = Analysis(src, recipe, calib=getattr(models, f"{name}_data")())
    rep = analysis.compress(3.0).report
    assert rep["tables"] == "kron" and rep["bits_per_weight"] <= 3.0
    # one output position a sample (a pooled vector, class logits): the recipe's count, in one batch of n
    n = recipe.scale_samples
    distortion = OutputDistortion(analysis.probe, take(analysis.fit, n), min(analysis.batch, n))
    # the fitting data hold at least as many samples besides the factor's
    assert n_samples(analysis.fit) >= 2 * n and analysis._unseen_samples() == n
    quantizers = analysis.quantizers(unseen=n)
    measured = 0
    for s in analysis.sites:
        table, q, fs = analysis.losses[s.name], quantizers[s.name], analysis.candidates[s.name]
        hull = [j for j in range(len(table)) if np.isfinite(table[j])]
        ref = _scale_reference(s, fs, hull)
        codes = q.quick_codes(fs[ref])
        factor = distortion({s.name: s.from_view(codes.dequantize())}) / q.layer_error(codes)
        assert factor > 0
        # measured each: a convolution's candidates that store fewer bits than the reference, a
        # looked-up table's that store fewer than TABLE_LINEAR_BITS per weight
        below = [j for j in hull if s.kind.convolved and q.xtx is not None
                 and fs[j].stored_bits(s.rows, s.L) < fs[ref].stored_bits(s.rows, s.L)
                 or s.kind.looked_up and fs[j].stored_bits(s.rows, s.L) < TABLE_LINEAR_BITS * s.size]
        measured += len(below)
        # the same measurements and products recomputed (the tables measure from the site's segment
        # on, this the whole model: the same operations): equal up to float64 rounding -- except
        # where the last segment is a linear head (the embed model's), read by the tables from the
        # cut through ``W W^T`` in float64 and here from the float32 logits (5e-7 measured), and the
        # CNN's, whose second convolution onnxruntime computes with other float32 rounding in the
        # segment's session than in the whole model's on some CPUs (2.4e-8 on an AMD EPYC; none on
        # the Xeons): a wrong product or factor misses by orders more
        rel = 1e-5 if name == "embed" else 1e-6 if name == "cnn" else 1e-9
        for j in hull:
            want = distortion({s.name: s.from_view(q.quick_codes(fs[j]).dequantize())}) if j in below else \
                factor * q.layer_loss(fs[j])
            assert table[j] == pytest.approx(want, rel=rel)
    # the MLP's matmuls keep the scalar everywhere; the CNN's convolutions and the embedding have
    # cheaper candidates measured
    assert (measured > 0) == (name != "mlp")


def test_factor_samples_cover_the_positions_within_the_bounds():
    """Enough samples for SCALE_POSITIONS output positions, at least SCALE_MIN_SAMPLES, at most the
    recipe's count (which wins when it is the smaller)."""
    from bayesq_onnx.plan.tables import SCALE_MIN_SAMPLES, SCALE_POSITIONS, factor_samples

    assert (SCALE_POSITIONS, SCALE_MIN_SAMPLES) == (512, 4)
    cases = {(1, 8): 8, (64, 8): 8, (65, 8): 8, (100, 8): 6, (128, 8): 4, (2048, 8): 4, (0, 8): 8,
             (1, 16): 16, (64, 16): 8, (2048, 2): 2, (1, 2): 2}
    assert {k: factor_samples(*k) for k in cases} == cases


@pytest.mark.parametrize("name, kw, want", [("mlp", {}, 8), ("tied", {"seq": 8}, 8), ("tied", {"seq": 128}, 4)])
def test_kron_factors_are_measured_on_as_many_samples_as_their_output_positions_need(name, kw, want):
    """A pooled output has one position per sample, a language model's logits one per token: 128
    tokens a sample reach kron's 512 positions in 4 samples; the MLP and 8 tokens keep the
    recipe's 8."""
    from bayesq_onnx.calib.readers import n_samples

    data = getattr(models, f"{name}_data")(n=32, **kw)
    analysis = Analysis(getattr(models, name)(**kw), Recipe(bits=3.0), calib=data)
    assert Recipe(bits=3.0).scale_samples == 8
    assert n_samples(analysis._table_distortion.data) == want


def test_the_tables_x_t_x_leave_out_the_factors_samples_even_within_a_batch():
    """128 tokens a sample: kron measures on 4 samples, half of a calibration batch (8); the tables'
    quantizers take their ``X^T X`` from the other fitting samples all the same."""
    from bayesq_onnx.calib.readers import n_samples

    analysis = Analysis(models.tied(seq=128), Recipe(bits=3.0), calib=models.tied_data(n=32, seq=128))
    analysis.losses
    assert analysis.batch == 8 and analysis._unseen_samples() == 4
    rest = {k: v[4:] for k, v in analysis.fit.items()}
    assert n_samples(rest) == n_samples(analysis.fit) - 4
    qs = analysis.quantizers(unseen=4)
    for name, act in (("W", "e"), ("E", "t")):   # the tied table's X^T X: the head's input
        x = np.concatenate([o[act] for o in analysis.probe.run(rest, 8, outputs=[act])]).astype(np.float64)
        x = x.reshape(-1, x.shape[-1])
        # the capture's products are float32 a batch (capture._gram: 5e-7 relative documented there),
        # here float64 in one; leaving the 4 samples in would move it by about a sixth
        want = x.T @ x
        np.testing.assert_allclose(qs[name].xtx, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_layer_loss_predicts_gptq_layer_error():
    """:meth:`SiteQuantizer.layer_loss` weighs each weight's rounding error by GPTQ's conditional
    precision ``1/U_ii^2``, so it predicts the output error of the GPTQ-rounded codes without
    rounding; the diagonal of ``X^T X`` alone (what RTN pays) overestimates it on correlated inputs."""
    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import BayesqUniform
    from bayesq_onnx.posterior.laplace import DiagonalLaplace
    from bayesq_onnx.quantize.site import SiteQuantizer

    rng = np.random.default_rng(0)
    rows, L = 96, 256
    mix = rng.standard_normal((L, L)) * 0.3 + np.eye(L)          # correlated inputs, as in real layers
    X = rng.standard_normal((4096, L)) @ mix
    xtx = X.T @ X
    W = rng.standard_normal((rows, L)).astype(np.float32)
    q = SiteQuantizer(W, DiagonalLaplace.fit(W, np.diag(xtx)[None, :]), xtx, METHODS["bayesq"])
    for bits in (3, 4, 5):
        fmt = BayesqUniform(bits, 64, "float16")
        actual = q.layer_error(q.quick_codes(fmt))
        # GPTQ's rounding errors are only approximately uniform over a step: 25% covers it at
        # 3-5 bits (measured on MiniLM's layers: 0.75-1.25x); the diagonal is far above that
        assert 0.75 < q.layer_loss(fmt) / actual < 1.25
        # the same codes' errors weighed by diag(X^T X), as if no other column compensated them
        diag = float((np.diag(xtx)[None, :] * np.square(q.quick_codes(fmt).dequantize() - W)).sum())
        assert diag > 1.5 * actual


def test_a_looked_up_tables_codebooks_fit_its_rows_not_their_prior():
    """A row the calibration data never looks up has the prior's posterior width, about as wide as
    its weights; a codebook fitted to that mass spreads away from the trained weights that unseen
    data do look up (docs/design.md, "Codebooks").  A looked-up table's levels are fitted to its
    means (sigma -> 0), a multiplied weight's (a tied table's too) to its posterior."""
    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import BayesqLut
    from bayesq_onnx.posterior.laplace import DiagonalLaplace
    from bayesq_onnx.quantize.codebook import lloyd_max
    from bayesq_onnx.quantize.site import SiteQuantizer

    qs = Analysis(models.embed(), Recipe(bits=3.0), calib=models.embed_data(n=4)).quantizers()
    assert qs["E"].levels_on_means and not qs["W"].levels_on_means
    tied = Analysis(models.tied(), Recipe(bits=3.0), calib=models.tied_data(n=4)).quantizers()
    assert not any(q.levels_on_means for q in tied.values())

    rng = np.random.default_rng(0)
    W = (rng.standard_t(5, (400, 64)) * 0.05).astype(np.float32)
    seen = rng.random(400) < 0.1   # the others have the prior's width: that of the weights
    post = DiagonalLaplace(W, np.where(seen, 1e6, 1 / 0.05 ** 2)[:, None].astype(np.float32) * np.ones((1, 64), np.float32))
    fmt = BayesqLut(3, 0, "float16")
    ours = SiteQuantizer(W, post, None, METHODS["bayesq"], levels_on_means=True).codes(fmt)
    np.testing.assert_array_equal(ours.lut.reshape(-1, 8), fmt.round_scales(lloyd_max(W, 0.0, post.precision, 8)))
    on_posterior = SiteQuantizer(W, post, None, METHODS["bayesq"]).codes(fmt)

    def error(q):
        return np.square(q.dequantize() - W)[~seen].sum()
    # the means' fit starts at their exact k-means optimum per row, so it leaves less error on the
    # unseen rows: here 0.53x; 0.8 leaves room for another draw, and no tie of the fits passes it
    assert error(ours) < 0.8 * error(on_posterior)


@pytest.mark.parametrize("curvature", ["activation", "per-row"])
def test_screen_estimates_a_big_site_from_a_sample_of_its_rows(monkeypatch, curvature):
    """Past ``SCREEN_ROWS`` rows the layer loss is estimated from rows drawn in proportion to what
    their error scales with (weight times squared range): close to the full sum on rows of very
    different scales, affine and codebook formats alike."""
    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import BayesqLut, BayesqUniform
    from bayesq_onnx.posterior.laplace import DiagonalLaplace
    from bayesq_onnx.quantize import site

    rng = np.random.default_rng(0)
    rows, L = 1024, 128
    W = (rng.standard_normal((rows, L)) * rng.gamma(2.0, 0.5, (rows, 1))).astype(np.float32)
    X = rng.standard_normal((2048, L)) * rng.gamma(2.0, 0.5, L)
    xtx = X.T @ X
    h = np.diag(xtx)[None, :] if curvature == "activation" else rng.gamma(0.3, 1.0, (rows, 1))
    q = site.SiteQuantizer(W, DiagonalLaplace.fit(W, h), xtx if curvature == "activation" else None, METHODS["bayesq"])
    for fmt in (BayesqUniform(2, 32, "float16"), BayesqUniform(4, 128, "float16"), BayesqLut(3, 0, "float16")):
        sampled = q.layer_loss(fmt)
        monkeypatch.setattr(site, "SCREEN_ROWS", rows)
        exact = q.layer_loss(fmt)
        monkeypatch.setattr(site, "SCREEN_ROWS", 128)
        # 128 of 1024 rows whose scales vary 10x: measured within 0.98-1.07x of the full sum here
        # (drawn uniformly instead, 0.82-0.88x); 10% is far below the prediction's own +-25%
        assert sampled == pytest.approx(exact, rel=0.10), fmt.name


def test_conv_sites_get_the_channel_gram_and_gptq():
    """A convolution's weights meet their input channels at every position: its ``X^T X`` is the
    channel Gram over positions, so GPTQ's error feedback runs on convolutions too (for a 1x1
    convolution the layer output error it minimises is exact)."""
    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import BayesqUniform
    from bayesq_onnx.quantize.grid import minmax_grid
    from bayesq_onnx.quantize.rounding import round_rtn

    a = Analysis(models.cnn(), Recipe(bits=4.0), calib=models.cnn_data())
    acts = next(a.probe.run(a.fit, 10**6, outputs=["r1"]))["r1"]
    x = np.moveaxis(acts, 1, -1).reshape(-1, 32).astype(np.float64)
    q = a.quantizers()["C2"]
    # the same sums, each batch's in float32 (capture._gram): errors of about 5e-7 of the Gram's
    # largest entry (measured), 1e-5 of it leaves 20x room and still catches a missing batch or tap
    want = x.T @ x
    np.testing.assert_allclose(q.xtx, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ref = q.reference()
    assert ref.method == METHODS["gptq"] and ref.xtx is not None
    fmt = BayesqUniform(3, 16, "float16")
    gptq = ref.codes(fmt)
    nearest = round_rtn(q.view, *minmax_grid(q.view, 3, 16), 3, 16)
    w = q.view.astype(np.float64)
    out_err = lambda c: float(np.square(x @ (c.dequantize() - w).T).sum())     # the 1x1 conv's output error
    # error feedback over 32 channels after a ReLU: measured 0.61-0.70x of nearest at 2-4 bits; 0.8
    # leaves room for another seed and still fails if GPTQ did not run (1.0x)
    assert out_err(gptq) < 0.8 * out_err(nearest)


def test_sites_reading_one_input_share_its_gram_and_gptq_factor():
    """q, k and v (here: two weights on one input) hold one ``X^T X`` and one GPTQ factor: computed
    once, stored once; and it is the input's Gram."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W = {n: rng.standard_normal((64, 64)).astype(np.float32) for n in ("Wa", "Wb", "Wc")}
    # the shared input is computed (a LayerNorm's output in a transformer), so no cut falls between its readers
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("MatMul", ["h", "Wa"], ["a"]), helper.make_node("MatMul", ["h", "Wb"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "Wc"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                          [numpy_helper.from_array(w, n) for n, w in W.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    data = models.mlp_data(40)
    a = Analysis(m, Recipe(bits=4.0), calib=data)
    qs = a.quantizers()
    qa, qb, qc = (qs[n] for n in ("Wa", "Wb", "Wc"))
    assert qa.xtx is qb.xtx and qa.xtx is not qc.xtx
    assert qa._work.factor is qb._work.factor and qa._work.factor is not qc._work.factor
    x = np.maximum(a.fit["x"], 0).astype(np.float64)          # the samples not held back for the plan check
    want = x.T @ x   # the same sums batch by batch, each batch's in float32 (tolerance as for convolutions above)
    np.testing.assert_allclose(qa.xtx, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert qa._factor() is qb._factor()


def test_fixed_batch_model(tmp_path):
    """Exports without dynamic axes run one fixed batch at a time; calibration and the plan check
    must feed them that way."""
    m = models.mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[0].dim_value = 1
    out = tmp_path / "q.onnx"
    rep = compress(_save(tmp_path, "mlp1", m), Recipe(bits=3.0), calib=models.mlp_data(10), output=out).report
    assert rep["calibration"]["held_back"] in (2, 3)  # a quarter of 10, in whole batches of 1
    assert make_session(str(out)).run(None, {"x": models.mlp_data(1)["x"]})[0].shape == (1, 32)


def test_input_with_external_data(tmp_path):
    """Exporters often write weights beside the graph (model.onnx + model.onnx.data)."""
    src = tmp_path / "ext.onnx"
    onnx.save(models.mlp(), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out" / "q.onnx"
    rep = compress(src, Recipe(bits=3.0), calib=models.mlp_data(), output=out).report
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert rep["output_bytes"] == out.stat().st_size and sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]
    assert make_session(str(out)).run(None, models.mlp_data(4))[0].shape == (4, 32)


def test_large_output_goes_to_external_data(tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit the output is written as model + one data file, both renamed into
    place, and onnxruntime reads the measuring copy from a file (the limits are lowered here so a
    small model takes those paths)."""
    from bayesq_onnx.graph import model_io
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 1000)  # the output, and the measuring copy, go through files
    out = tmp_path / "q.onnx"
    compress(_save(tmp_path, "mlp", models.mlp()), Recipe(bits=3.0), calib=models.mlp_data(), output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "q.onnx", "q.onnx.data"]
    assert (tmp_path / "q.onnx.data").stat().st_size > 0
    assert make_session(str(out)).run(None, models.mlp_data(4))[0].shape == (4, 32)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["gptq", "hqq-int"])
def test_baselines_share_rtn_formats(tmp_path, case, method):
    """Baselines differ from RTN only in their codes and grids: the same uniform plan, the same
    stored bits, and a model onnxruntime runs exactly as the numpy reference ops do."""
    build, data_fn = CASES[case]
    src, data = _save(tmp_path, case, build()), data_fn()
    reps = {m: compress(src, Recipe(bits=3.0, method=m), calib=data, output=tmp_path / f"{m}.onnx").report
            for m in ("rtn", method)}
    assert reps[method]["plan"] == reps["rtn"]["plan"]
    assert [l["stored_bits"] for l in reps[method]["layers"]] == [l["stored_bits"] for l in reps["rtn"]["layers"]]
    assert reps[method]["bits_per_weight"] <= 3.0
    q = onnx.load(tmp_path / f"{method}.onnx")
    held = {k: v[:8] for k, v in data.items()}
    want = ReferenceEvaluator(q, new_ops=REFERENCE_OPS).run(None, held)
    for g, w in zip(_run(tmp_path / f"{method}.onnx", held), want):
        # fp32 kernels against numpy fp32: summation order only
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_gptq_method_is_not_rtn_and_beats_it(tmp_path):
    """onnxruntime's bundled GPTQ returns RTN's codes; ours must not, and must do better on
    held-out data from the calibration distribution."""
    src = _save(tmp_path, "mlp", models.mlp())
    calib, test = models.mlp_data(64, seed=1), models.mlp_data(256, seed=7)
    ref = _run(src, test)[0]
    out = {m: tmp_path / f"{m}.onnx" for m in ("rtn", "gptq")}
    for m, p in out.items():
        compress(src, Recipe(bits=3.0, method=m), calib=calib, output=p)
    packed = {m: {t.name: t.raw_data for t in onnx.load(p).graph.initializer if t.name.endswith("_B")}
              for m, p in out.items()}
    assert packed["gptq"].keys() == packed["rtn"].keys() and packed["gptq"]
    assert all(packed["gptq"][k] != packed["rtn"][k] for k in packed["rtn"])
    errs = {m: _rel_err(_run(p, test)[0], ref) for m, p in out.items()}
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("case,fields", [
    ("mlp", {"matmul_bits": (), "bayesq_bits": (3, 5)}),                  # affine widths only bayesq runs
    ("mlp", {"matmul_bits": (), "bayesq_bits": (), "lut_bits": (2, 3)}),  # Lloyd-Max codebooks per row only
    ("cnn", {"conv_bits": (), "bayesq_bits": (3, 5)}),                     # Conv weight from DequantizeAffine
])
def test_bayesq_formats_run_with_the_library_and_portably(tmp_path, case, fields):
    """ort-cpu emits bayesq ops that make_session runs as the numpy reference does; portable emits
    standard ops only, runs on a plain onnxruntime session, and computes the same weights."""
    pytest.importorskip("bayesq_onnx.runtime.custom_ops").require()
    build, data_fn = CASES[case]
    src, data = _save(tmp_path, case, build()), data_fn()
    outs = {}
    for target in ("ort-cpu", "portable"):
        out = tmp_path / f"{target}.onnx"
        rep = compress(src, Recipe(bits=4.0, target=target, **fields), calib=data, output=out).report
        assert rep["bits_per_weight"] <= 4.0 and rep["target"] == target
        assert any(l["format"].startswith("bq-") for l in rep["layers"]), rep["plan"]
        q = onnx.load(out)
        domains = {n.domain for n in q.graph.node}
        assert ("bayesq" in domains) == (target == "ort-cpu")
        outs[target] = _run(out, data)
        want = ReferenceEvaluator(q, new_ops=REFERENCE_OPS).run(None, data)
        for g, w in zip(outs[target], want):
            # fp32 kernels against numpy fp32: summation order only
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    import onnxruntime as ort
    plain = ort.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"])
    for g, w in zip(plain.run(None, data), outs["ort-cpu"]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)  # same weights, summation order only


@pytest.mark.parametrize("fields", [{"conv_bits": (), "bayesq_bits": (3, 5)},   # bayesq DequantizeAffine
                                    {"custom_ops": False}])                      # blocked DequantizeLinear
def test_make_session_folds_constant_dequantize_nodes(tmp_path, fields):
    """make_session turns Dequantize nodes on constant (Conv) weights into float32 initializers once,
    so onnxruntime prepacks the convolutions; the outputs are those of the unfolded graph, the file
    is untouched, and weights feeding a MatMul are left to the fused ops."""
    src, data = _save(tmp_path, "cnn", models.cnn()), models.cnn_data()
    out = tmp_path / "q.onnx"
    compress(src, Recipe(bits=4.0, **fields), calib=data, output=out)
    before = out.read_bytes()
    q = onnx.load(out)
    deq = [n for n in q.graph.node if n.op_type.startswith("Dequantize")]
    assert deq, "the plan put no Conv weight in a dequantized format"
    assert [n.output[0] for n in _foldable(q)] == [n.output[0] for n in deq]
    so = session_options()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    folded = make_session(out, sess_options=so).run(None, data)
    assert not [n for n in onnx.load(tmp_path / "optimized.onnx").graph.node if n.op_type.startswith("Dequantize")]
    plain = make_session(out, fold=False).run(None, data)
    for f, p in zip(folded, plain):
        # the same float32 weights; only the convolution algorithm (prepacked or not) may differ
        np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-6)
    assert out.read_bytes() == before
    mlp = tmp_path / "mlp.onnx"
    compress(_save(tmp_path, "mlp", models.mlp()), Recipe(bits=3.0), calib=models.mlp_data(), output=mlp)
    assert not _foldable(onnx.load(mlp))   # MatMul weights stay packed for the fused kernels
