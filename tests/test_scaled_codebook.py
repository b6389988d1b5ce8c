"""One codebook per weight, scaled per group (formats/bayesq_scaled_lut.py, quantize/scaled_codebook.py):
the packed tensors and their byte count, the fit, and the lowering --
the graph multiplies scales and levels into the per-group codebooks that the LUT ops read, so the
lowered model must compute exactly what the same table stored whole computes."""
from __future__ import annotations

import json
import subprocess
import sys

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bayesq_onnx.api import compress
from bayesq_onnx.config import Recipe
from bayesq_onnx.formats import BayesqLut, BayesqScaledLut, ScaledLutCodes
from bayesq_onnx.formats.bayesq_uniform import col_bytes, groups
from bayesq_onnx.lower.bayesq_nodes import (BAYESQ_OPSET, FLAT_SHAPE, bayesq_dequantize_node, bayesq_gather_node,
                                            bayesq_matmul_node, scaled_lut_nodes)
from bayesq_onnx.lower.portable import portable_gather_nodes, portable_weight_nodes
from bayesq_onnx.quantize import codebook_native
from bayesq_onnx.quantize.scaled_codebook import (_LS_STEPS, _MULTIPLES, _errors, _fit_rows, _fit_scales_numpy, _gidx,
                                                 _starts, scaled_codebook)
from bayesq_onnx.runtime.session import make_session


def scaled_codes(rows, L, bits, block, seed) -> ScaledLutCodes:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 0.5, (rows, groups(L, block))).astype(np.float16).astype(np.float32)
    levels = np.sort(rng.standard_normal(1 << bits)).astype(np.float16).astype(np.float32)
    return ScaledLutCodes.of(rng.integers(0, 1 << bits, (rows, L), dtype=np.uint8), scale, levels, bits, block)


@pytest.mark.parametrize("bits,block", [(2, 0), (3, 0), (4, 64), (3, 16)])
def test_format_packs_every_bit_it_counts(bits, block):
    fmt, q = BayesqScaledLut(bits, block), scaled_codes(6, 203, bits, block, seed=bits)
    assert fmt.name == f"bq-nf{bits}-g{block or 'row'}-f16"
    p = fmt.pack(q)
    assert {k: a.dtype for k, a in p.items()} == {"B": np.uint8, "scales": np.float16, "codebook": np.float16}
    assert fmt.stored_bits(6, 203) == 8 * sum(a.nbytes for a in p.values())
    # dense codes, one fp16 scale per group, the levels once
    assert fmt.stored_bits(6, 203) == 8 * 6 * col_bytes(203, bits) + 16 * 6 * groups(203, block) + 16 * (1 << bits)
    back = fmt.unpack(p, 6, 203)
    assert np.array_equal(back.codes, q.codes) and np.array_equal(back.dequantize(), q.dequantize())
    # the table is each scale times each level, one float32 product
    assert q.lut.dtype == np.float32 and np.array_equal(q.lut, np.multiply.outer(q.scale, q.levels))
    with pytest.raises(ValueError, match="fp16 values"):
        fmt.pack(ScaledLutCodes.of(q.codes, q.scale * np.float32(1 + 2 ** -20), q.levels, bits, block))


@pytest.mark.parametrize("block", [0, 32])
def test_fit_is_deterministic_fp16_and_never_worse_than_its_start(block):
    """Rows of one heavy-tailed shape at scales 10x apart: the fitted scales follow the rows, the result
    holds fp16 values, repeats bit for bit, and rates no worse than each group's largest magnitude
    as its scale with the same levels (every search step keeps only what lowers a group's error)."""
    rng = np.random.default_rng(0)
    mu = (rng.standard_t(5, (64, 96)) * rng.uniform(0.1, 1.0, (64, 1))).astype(np.float32)
    sigma = np.full_like(mu, 0.05)
    w = rng.uniform(0.5, 2.0, mu.shape)
    levels, scale = scaled_codebook(mu, sigma, w, 8, block)
    again = scaled_codebook(mu, sigma, w, 8, block)
    assert np.array_equal(levels, again[0]) and np.array_equal(scale, again[1])
    assert np.array_equal(levels, levels.astype(np.float16).astype(np.float32)) and np.all(np.diff(levels) > 0)
    assert np.array_equal(scale, scale.astype(np.float16).astype(np.float32)) and np.all(scale > 0)
    starts, gidx = _starts(96, block), _gidx(96, block)
    amax = np.maximum.reduceat(np.abs(mu), starts, axis=1).astype(np.float64)
    fitted = _errors(mu, w, scale.astype(np.float64), levels, starts, gidx)
    start = _errors(mu, w, amax, levels, starts, gidx)
    # fp16 rounding of the fitted scales moves each by at most 2^-11 of itself: 1e-2 covers it
    assert np.all(fitted <= start * (1 + 1e-2))
    assert fitted.sum() < 0.97 * start.sum()   # measured 0.93 (rows of one shape: little to gain)
    # a row's scale follows its spread (the rows differ up to 10x)
    spread = np.abs(mu).mean(axis=1)
    assert np.corrcoef(np.log(scale.mean(axis=1)), np.log(spread))[0, 1] > 0.9


@pytest.mark.parametrize("L,block", [(96, 0), (203, 64), (100, 48), (768, 0), (7, 4), (130, 200)])
def test_native_scale_search_is_numpy_bit_for_bit(L, block):
    """The scale search natively (custom_ops/src/scaled_codebook.cpp) gives numpy's scales to the last
    bit: one scale a row and groups with a short last one (reduceat's sum: the first term plus the
    pairwise sum of the rest), weights per element and one row broadcast to all, 2-16 levels, zero
    and weightless entries, a row of zeros."""
    lib = codebook_native.library()
    if lib is None or not hasattr(lib, "BayesqScaledFitScales"):
        pytest.skip("libbayesq_ops.so with the native scale search is not built")
    rng = np.random.default_rng(L + block)
    rows = 40
    mu = (rng.standard_t(4, (rows, L)) * rng.uniform(0.1, 1.0, (rows, 1)) * 0.02).astype(np.float32)
    mu[0, : L // 2], mu[2] = 0.0, 0.0
    starts, gidx = _starts(L, block), _gidx(L, block)
    amax = np.maximum.reduceat(np.abs(mu), starts, axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax, 1.0)
    for shared in (False, True):
        w = rng.gamma(2.0, 1.0, (1, L) if shared else (rows, L)).astype(np.float32)
        if not shared:
            w[1, ::2] = 0.0
        w = np.broadcast_to(w, mu.shape)
        for K in (2, 4, 8, 16):
            levels = np.sort(rng.standard_normal(K) * 0.5).astype(np.float16).astype(np.float32)
            ref = _fit_scales_numpy(mu, w, levels, scale, starts, gidx)
            got = codebook_native.fit_scales(lib, mu, w, levels, scale, block, _MULTIPLES, _LS_STEPS)
            assert got.dtype == np.float64 and np.array_equal(got, ref), (shared, K)
            assert np.any(ref != scale)   # the search moved something: the comparison is not of inputs


def test_levels_are_fitted_on_rows_drawn_by_importance():
    """The rows the levels are fitted on are drawn in proportion to importance x squared range and
    counted inversely to it: the drawn rows' counted mass is the whole weight's, a row that matters
    more is drawn more often, and with few enough rows all are taken once."""
    rng = np.random.default_rng(3)
    w = rng.uniform(0.1, 1.0, (1000, 8)) * np.where(np.arange(1000) < 100, 50.0, 1.0)[:, None]   # 100 rows matter
    amax = rng.uniform(0.5, 1.0, (1000, 1))
    fit, mult = _fit_rows(w, amax, 64)
    mass = w.sum(axis=1) * amax[:, 0] ** 2
    assert len(fit) == 64 and np.sum(mult * mass[fit]) == pytest.approx(mass.sum(), rel=1e-12)
    assert np.mean(fit < 100) > 0.7      # they hold 5/6 of the mass, a tenth of the rows
    fit, mult = _fit_rows(w, amax, 1000)
    assert np.array_equal(fit, np.arange(1000)) and np.all(mult == 1)


def _model(nodes, inits, inputs, out, shape, opsets=(BAYESQ_OPSET,)):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), *opsets])


@pytest.mark.parametrize("bits,block", [(2, 0), (3, 0), (4, 32)])
def test_lowered_graph_computes_the_table_it_stands_for(bits, block):
    """MatMul, embedding lookup and Conv weight, through the bayesq ops (custom-op library) and the
    portable lowering (plain onnxruntime): bit for bit what the same per-group table stored whole as a
    float32 LUT format computes -- the graph's scales x levels are the quantizer's table."""
    K, N = 203, 7
    fmt, q = BayesqScaledLut(bits, block), scaled_codes(N, K, bits, block, seed=bits)
    p, twin = fmt.pack(q), BayesqLut(bits, block, "float32")
    pt = twin.pack(q)   # the table itself, stored whole
    head, inits = scaled_lut_nodes("w", p)
    A = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    ids = np.array([[0, 6, -1], [3, 3, -7]])
    x = helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, K])
    i = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])

    def both(build, inputs, feed, out, shape):
        node, codes = build(fmt.lut, {"B": p["B"]})   # the codes alone: the LUT input is the graph's
        ours = make_session(_model(head + [node], inits + codes, inputs, out, shape)).run(None, feed)[0]
        node, tinits = build(twin, pt)
        assert ours.tobytes() == make_session(_model([node], tinits, inputs, out, shape)).run(None, feed)[0].tobytes()

    both(lambda f, pk: bayesq_matmul_node("A", "Y", "w", f, pk, K, N), [x], {"A": A}, "Y", [3, N])
    both(lambda f, pk: bayesq_gather_node("ids", "E", "w", f, pk, V=N, D=K), [i], {"ids": ids}, "E", [2, 3, K])
    both(lambda f, pk: bayesq_dequantize_node("W", "w", f, pk, (N, K, 1, 1), axis=1), [], {}, "W", [N, K, 1, 1])
    # portable: the flat table through standard ops, no library
    head, inits = scaled_lut_nodes("w", p, flat=True)
    assert FLAT_SHAPE in [t.name for t in inits]
    nodes, vinits = portable_weight_nodes("W", "w", fmt.lut, {"B": p["B"]}, (K, N), axis=0)
    W = ort.InferenceSession(_model(head + nodes, inits + vinits, [], "W", [K, N], opsets=()).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(W, q.dequantize().T)
    nodes, vinits = portable_gather_nodes("ids", "E", "w", fmt.lut, {"B": p["B"]}, V=N, D=K)
    E = ort.InferenceSession(_model(head + nodes, inits + vinits, [i], "E", [2, 3, K], opsets=()).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert np.array_equal(E, q.dequantize()[ids])



@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_offered_to_the_knapsack_and_run_where_chosen(tmp_path, target):
    """Offered (``scaled_lut_bits``, by default), the knapsack takes scaled codebooks on the small models (fewer
    bits than a row's own levels); the written model runs, in portable form on plain onnxruntime, and
    computes what the plan check measured (test_compress checks every format's bytes and outputs)."""
    checked = 0
    for name, build, data in (("tied", models.tied, models.tied_data()), ("mlp", models.mlp, models.mlp_data())):
        src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.q.onnx"
        onnx.save(build(), src)
        rep = compress(src, Recipe(bits=3.0, target=target), calib=data, output=out).report
        if rep["plan"] != "knapsack":   # the check preferred a uniform plan: no codebook to run
            continue
        checked += 1
        chosen = [l["format"] for l in rep["layers"] if l["format"].startswith("bq-nf")]
        assert chosen, (name, [l["format"] for l in rep["layers"]])
        held = {k: v[-len(v) // 4:] for k, v in data.items()}
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]) if target == "portable" else \
            make_session(str(out))
        ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, held)
        got = sess.run(None, held)
        measured = np.mean([np.sum((g - r) ** 2) / np.sum(r ** 2) for r, g in zip(ref, got)])
        mine = [c for c in rep["plan_check"]["candidates"] if c["plan"] == rep["plan"]][0]
        # the check decodes the packed tensors in numpy and runs fp32: only summation order differs
        assert measured == pytest.approx(mine["distortion"], rel=1e-3)
    assert checked


def test_cli_turns_them_off(tmp_path):
    """``--scaled-codebooks none``: no scaled codebook offered, so none chosen, where the widths the
    default names (given here) make the knapsack take them; the widths given are the recipe's."""
    src = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), src)
    data = tmp_path / "calib.npz"
    np.savez(data, **models.mlp_data())
    for arg, widths in (("2,3,4", [2, 3, 4]), ("none", []), ("3", [3])):
        rep = tmp_path / f"{arg}.json"
        subprocess.run([sys.executable, "-m", "bayesq_onnx", "compress", str(src), "--bits", "3", "--calib", str(data),
                        "-o", str(tmp_path / f"{arg}.onnx"), "--report", str(rep), "--quiet", "--scaled-codebooks", arg],
                       check=True)
        r = json.loads(rep.read_text())
        assert r["recipe"]["scaled_lut_bits"] == widths
        nf = {l["format"] for l in r["layers"] if l["format"].startswith("bq-nf")}
        assert nf <= {f"bq-nf{b}-grow-f16" for b in widths}, nf
        assert nf or arg != "2,3,4"   # offered, they are taken: "none" has something to turn off


def test_cli_rejects_bad_widths_in_one_line(tmp_path):
    for bad in ("x,3", "9", ""):
        r = subprocess.run([sys.executable, "-m", "bayesq_onnx", "compress", str(tmp_path / "none.onnx"), "--bits", "3",
                            "--scaled-codebooks", bad], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
