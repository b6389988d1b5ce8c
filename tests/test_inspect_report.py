"""`bayesq-onnx inspect` reads back from the graph what compress reports; the HTML report is
self-contained and escapes what it shows."""
from __future__ import annotations

import json
import logging
import re
from html import escape

import onnx
import pytest

import models
from bayesq_onnx import Recipe, compress
from bayesq_onnx.cli import main
from bayesq_onnx.graph.inspect import inspect_model
from bayesq_onnx.report_html import render_html, size_breakdown

@pytest.fixture(autouse=True)
def _cli_logging():
    """main() points the package's log handler at this test's captured stderr: drop it afterwards."""
    yield
    logging.getLogger("bayesq_onnx").handlers.clear()


CASES = {   # name: (model, data, recipe fields) covering every op the lowering writes
    "bayesq-ops": (models.mlp, models.mlp_data, {}),
    "portable": (models.mlp, models.mlp_data, {"target": "portable"}),
    "matmulnbits": (models.mlp, models.mlp_data, {"custom_ops": False}),
    "dequantizelinear": (models.cnn, models.cnn_data, {"custom_ops": False}),
    "bayesq-dequantize": (models.cnn, models.cnn_data, {"conv_bits": ()}),
    "tied-gather": (models.tied, models.tied_data, {}),
    "tied-gather-native": (models.tied, models.tied_data, {"custom_ops": False}),
    "portable-gather": (models.embed, models.embed_data, {"target": "portable"}),
    # 2 bits: the knapsack takes 2:4 sparse formats for every layer of this MLP
    "sparse": (models.mlp, models.mlp_data, {"bits": 2.0, "sparse": ((2, 4),)}),
    "portable-sparse": (models.mlp, models.mlp_data, {"bits": 2.0, "sparse": ((2, 4),), "target": "portable"}),
    # scaled codebooks: the LUT ops read levels the graph computes from scales and a codebook
    "scaled": (models.mlp, models.mlp_data, {"bits": 3.0, "scaled_lut_bits": (2, 3, 4)}),
    "scaled-dequantize": (models.cnn, models.cnn_data, {"bits": 3.0, "scaled_lut_bits": (2, 3, 4), "conv_bits": ()}),
    "scaled-tied-gather": (models.tied, models.tied_data, {"bits": 3.0, "scaled_lut_bits": (2, 3, 4)}),
    "portable-scaled": (models.embed, models.embed_data, {"bits": 3.0, "scaled_lut_bits": (2, 3, 4),
                                                          "target": "portable"}),
}


@pytest.mark.parametrize("case", CASES)
def test_inspect_agrees_with_the_report(tmp_path, case):
    make, data, fields = CASES[case]
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(make(), src)
    rep = compress(src, Recipe(**{"bits": 3.5, **fields}), calib=data(), output=out).report
    info = inspect_model(out)
    got = {e["name"]: e for e in info["quantized"]}
    quantized = [l for l in rep["layers"] if l["format"] != "float32"]
    assert sorted(got) == sorted(l["name"] for l in quantized)
    for l in quantized:
        e = got[l["name"]]
        # the graph holds exactly what the report says was stored, byte for byte
        assert (e["format"], e["bits"], 8 * e["bytes"]) == (l["format"], l["bits"], l["stored_bits"]), (e, l)
        # (the quotient of two floats: exact up to its last bit)
        assert e["n_weights"] == pytest.approx(l["stored_bits"] / l["bits_per_weight"], rel=1e-12)
    fp32_bits = sum(l["stored_bits"] for l in rep["layers"] if l["format"] == "float32")
    assert 8 * info["totals"]["stored_bytes"] + fp32_bits == pytest.approx(rep["bits_per_weight"] * rep["n_weights"])
    assert info["file_bytes"] == out.stat().st_size
    kept = {f["name"] for f in info["float_weights"]}
    assert {s["name"] for s in rep["skipped"]} <= kept   # skipped weights are still there, in float
    if case.startswith("tied-gather"):  # one table, read by the Gather and (reshaped, natively) by the head
        (table,) = [e for e in info["quantized"] if e["op"].endswith(("GatherBlockQuantized", "GatherAffine",
                                                                        "GatherLut"))]
        assert len(table["nodes"]) == 2 and table["shape"] == [300, 64]
    if case.endswith("sparse"):     # the patterns are counted with the weight they prune
        assert any(e["format"].startswith("bq-s2of4") and any(t.endswith("_mask") for t in e["tensors"])
                   for e in info["quantized"])
    if "scaled" in case:   # the scales and the codebook are counted with the codes that index them
        assert any(e["format"].startswith("bq-nf") and any(t.endswith("_codebook") for t in e["tensors"])
                   for e in info["quantized"]), [e["format"] for e in info["quantized"]]
    if case == "portable-gather":   # found through the Gather of its packed rows
        assert got["E"]["op"].startswith("portable") and got["E"]["shape"] == [500, 64]


def test_inspect_cli_on_an_uncompressed_model(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(models.mlp(), src)
    assert main(["inspect", str(src)]) == 0
    assert "nothing is quantized" in capsys.readouterr().out
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized"] == [] and info["totals"]["bits_per_weight"] is None
    assert {f["name"] for f in info["float_weights"]} == {"W0", "W1", "W2T", "W3", "small"}


def test_inspect_cli_lists_a_compressed_model(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(models.mlp(), src)
    compress(src, Recipe(bits=3.0), calib=models.mlp_data(), output=out)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 quantized weights" in text and "bits/weight" in text
    assert re.search(r"^\s+W1\s+bayesq\.MatMul", text, re.M)


def _report(tmp_path, **fields) -> dict:
    src = tmp_path / "m.onnx"
    onnx.save(models.mlp(), src)
    return compress(src, Recipe(bits=3.0, **fields), calib=models.mlp_data(), output=tmp_path / "q.onnx").report


def test_html_escapes_report_strings_and_fetches_nothing(tmp_path):
    rep = _report(tmp_path)
    evil = "<script>alert('x')</script>&\"name\""
    rep["layers"][0]["name"] = evil
    rep["skipped"][0]["reason"] = "<img src=x onerror=alert(1)>"
    rep["plan_check"]["candidates"][0]["plan"] = "<b>knapsack</b>"
    page = render_html(rep)
    assert evil not in page and "<script" not in page and "<img" not in page and "<b>knapsack" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;name&quot;" in page
    # self-contained: no scripts, no links or sources, no CSS that loads anything
    assert not re.search(r"<(script|link|iframe|object|embed)|<[a-z][^>]*\b(src|href)\s*=|url\(|@import", page, re.I)
    # the only URL is SVG's namespace name, which nothing dereferences
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}


def test_html_shows_each_section(tmp_path):
    rep = _report(tmp_path)
    page = render_html(rep)
    for heading in ("Bits per layer against sensitivity", "Budget curve", "Size breakdown", "Skipped weights",
                    "Recipe"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count("<svg") == 2   # the sensitivity scatter and the budget curve
    for c in rep["plan_check"]["candidates"]:
        assert escape(c["plan"]) in page
    assert escape(rep["skipped"][0]["reason"]) in page   # "(< 1024)": escaped
    # every stored bit lands in exactly one part of the size breakdown
    parts = size_breakdown(rep)
    assert sum(sum(v.values()) for v in parts.values()) == sum(l["stored_bits"] for l in rep["layers"])
    codes = sum(v["codes"] for v in parts.values())
    assert codes == pytest.approx(rep["code_bits_per_weight"] * rep["n_weights"])


def test_html_for_a_uniform_method_has_no_budget_curve(tmp_path):
    page = render_html(_report(tmp_path, method="rtn"))
    assert "No plan check" in page
    # no loss tables and no expected loss either (no loss chose the plan): no chart at all
    assert "No sensitivity: the plan shipped (uniform " in page and page.count("<svg") == 0


def test_compress_html_and_report_command(tmp_path, capsys, mlp_path):
    html, rep, out = tmp_path / "r.html", tmp_path / "r.json", tmp_path / "q.onnx"
    assert main(["compress", str(mlp_path), "--bits", "3", "--calib", _npz(tmp_path), "-o", str(out),
                 "--report", str(rep), "--html", str(html), "--quiet"]) == 0
    first = html.read_text()
    assert main(["report", str(rep), "-o", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == first   # one report, one page
    assert main(["report", str(rep)]) == 0                  # default: beside the report
    assert (tmp_path / "r.html").read_text() == first


def _npz(tmp_path) -> str:
    import numpy as np
    p = tmp_path / "calib.npz"
    np.savez(p, **models.mlp_data())
    return str(p)


@pytest.mark.parametrize("content, needle", [
    ('{"layers": []}', "not a bayesq-onnx report"),
    ("[1, 2", "cannot read"),
    ('{"tool": "bayesq-onnx", "layers": [{"name": "W"}]}', "lack name, format"),
])
def test_report_command_bad_input(tmp_path, capsys, content, needle):
    src = tmp_path / "r.json"
    src.write_text(content)
    before = sorted(tmp_path.iterdir())
    assert main(["report", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bayesq-onnx: error:") and needle in err[0], err
    assert sorted(tmp_path.iterdir()) == before


def test_inspect_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    for path, needle in ((bad, "cannot read"), (tmp_path / "missing.onnx", "not found")):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_compress_html_path_checked_before_the_work(tmp_path, capsys, mlp_path):
    (tmp_path / "d").mkdir()
    before = sorted(tmp_path.iterdir())
    assert main(["compress", str(mlp_path), "--bits", "3", "-o", str(tmp_path / "q.onnx"),
                 "--html", str(tmp_path / "d"), "--quiet"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before
