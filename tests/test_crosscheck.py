"""`bayesq-onnx crosscheck`: one model on several runtimes through polygraphy, compared with the first."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from bayesq_onnx import Recipe, compress
from bayesq_onnx.cli import main
from bayesq_onnx.runtime import session as session_mod
from bayesq_onnx.validate.crosscheck import available_runtimes, crosscheck

pytest.importorskip("polygraphy")


@pytest.fixture(autouse=True)
def _cli_logging():
    yield
    logging.getLogger("bayesq_onnx").handlers.clear()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The small MLP at 3 bits with the bayesq ops, and its data as an .npz."""
    d = tmp_path_factory.mktemp("xc")
    src, out, data = d / "m.onnx", d / "q.onnx", d / "x.npz"
    onnx.save(models.mlp(), src)
    compress(src, Recipe(bits=3.0), calib=models.mlp_data(), output=out)
    assert any(n.domain == "bayesq" for n in onnx.load(out).graph.node)
    np.savez(data, x=models.mlp_data()["x"][:20])
    return out, data


def test_cpu_paths_agree_to_summation_order(compressed):
    out, data = compressed
    assert available_runtimes()[:2] == ["cpu-packed", "cpu-unpacked"]
    x = dict(np.load(data))
    # packed kernels against fp32 MatMuls on the same decoded weights: they differ only in the order
    # of fp32 sums over at most 64 inputs, K * eps * sum |a w| ~ 64 * 6e-8 * a few on these O(1)
    # outputs, so an absolute 1e-5 bounds it with room (the relative difference of an element near 0
    # can be anything: polygraphy passes an element on either)
    res = crosscheck(out, x, ["cpu-packed", "cpu-unpacked"], rtol=1e-5, atol=1e-5, batch_size=8)
    assert res["passed"] and res["n_samples"] == 20
    (pair,) = res["pairs"]
    assert pair["runtimes"] == ["cpu-packed", "cpu-unpacked"] and set(pair["outputs"]) == {"logits", "aux"}
    assert all(o["max_abs_diff"] <= 1e-5 for o in pair["outputs"].values())


def test_a_runtime_that_computes_something_else_is_a_mismatch(compressed, monkeypatch, capsys, tmp_path):
    out, data = compressed
    m = onnx.load(out)
    for t in m.graph.initializer:        # the unpacked runtime gets other weights: its outputs differ
        if t.name.endswith("_scales"):
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((1.5 * a).astype(a.dtype), t.name))
    other = tmp_path / "other.onnx"
    onnx.save(m, other)
    real = session_mod.make_session
    monkeypatch.setattr(session_mod, "make_session",
                        lambda path, unpack="auto", **kw: real(other if unpack == "always" else path, unpack=unpack, **kw))
    report = tmp_path / "r.json"
    assert main(["crosscheck", str(out), "--data", str(data), "--runtimes", "cpu-packed,cpu-unpacked",
                 "--json", str(report), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "cpu-unpacked vs cpu-packed: MISMATCH" in text and "outside the tolerance" in text
    res = json.loads(report.read_text())
    assert not res["passed"] and not res["pairs"][0]["passed"]


@pytest.mark.parametrize("runtimes, needle", [("cpu-packed,gpu", "unknown runtime(s) gpu"),
                                              ("cpu-packed", "needs at least two runtimes"),
                                              ("cpu-packed,tensorrt", "not available in this onnxruntime")])
def test_bad_runtime_lists_are_one_line_errors(compressed, capsys, runtimes, needle):
    out, data = compressed
    if "tensorrt" in runtimes and "tensorrt" in available_runtimes():
        pytest.skip("this onnxruntime has TensorRT")
    assert main(["crosscheck", str(out), "--data", str(data), "--runtimes", runtimes]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
