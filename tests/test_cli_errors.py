"""Bad input: exit code 2, exactly one line on stderr, no traceback, nothing left behind."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from bayesq_onnx.cli import main




def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _expect_bad(capsys, argv, needle, outdir):
    before = sorted(outdir.iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("bayesq-onnx: error:"), err
    assert needle in err[0], err[0]
    assert sorted(outdir.iterdir()) == before, "a failure left files behind"


def _nan_model(tmp_path):
    m = models.mlp()
    for t in m.graph.initializer:
        if t.name == "W1":
            a = numpy_helper.to_array(t).copy()
            a[3, 4] = np.nan
            t.CopyFrom(numpy_helper.from_array(a, "W1"))
    p = tmp_path / "nan.onnx"
    onnx.save(m, p)
    return str(p)


def _no_weights_model(tmp_path):
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    p = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(g), p)
    return str(p)


def _unsupported_op_model(tmp_path):
    m = models.mlp()
    m.graph.node.append(onnx.helper.make_node("FancyOp", ["logits"], ["z"], domain="nowhere.custom"))
    m.opset_import.append(onnx.helper.make_opsetid("nowhere.custom", 1))
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    return str(p)


BAD = {
    "missing model": (lambda t, m: ["compress", str(t / "nope.onnx"), "--bits", "3"], "model not found"),
    "corrupt model": (lambda t, m: ["compress", str((t / "bad.onnx").write_bytes(b"\x00garbage") and t / "bad.onnx"),
                                    "--bits", "3"], "cannot read"),
    "budget too low": (lambda t, m: ["compress", str(m), "--bits", "1.0"], "cannot be met"),
    "negative budget": (lambda t, m: ["compress", str(m), "--bits", "-1"], "positive"),
    "unknown method": (lambda t, m: ["compress", str(m), "--bits", "3", "--method", "magic"], "unknown method"),
    "unknown target": (lambda t, m: ["compress", str(m), "--bits", "3", "--target", "fpga"], "unknown target"),
    "calib wrong key": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                      _npz(t / "c.npz", y=np.zeros((4, 64), np.float32))], "keys do not match"),
    "calib wrong dtype": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                       _npz(t / "c.npz", x=np.zeros((4, 64), np.float64))], "dtype float64"),
    "calib wrong shape": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                        _npz(t / "c.npz", x=np.zeros((4, 63), np.float32))], "shape"),
    "calib NaN": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                _npz(t / "c.npz", x=np.full((4, 64), np.nan, np.float32))], "NaN"),
    "calib missing": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib", str(t / "none.npz")], "not found"),
    "calib corrupt": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                    str((t / "c.npz").write_bytes(b"zip?") and t / "c.npz")], "cannot read"),
    "NaN weights": (lambda t, m: ["compress", _nan_model(t), "--bits", "3"], "NaN or Inf"),
    "no weights": (lambda t, m: ["compress", _no_weights_model(t), "--bits", "3"], "no quantizable"),
    "unsupported op": (lambda t, m: ["compress", _unsupported_op_model(t), "--bits", "3"], "onnxruntime cannot run"),
    "curvature missing key": (lambda t, m: ["compress", str(m), "--bits", "3", "--curvature",
                                            _npz(t / "k.npz", W0=np.ones((64, 128), np.float32))], "no entry"),
    "curvature negative": (lambda t, m: ["compress", str(m), "--bits", "3", "--curvature", _npz(
        t / "k.npz", W0=-np.ones((64, 128)), W1=np.ones((128, 128)), W2T=np.ones((64, 128)), W3=np.ones((64, 32)))],
        ">= 0"),
    "calib not npz": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                    str(np.save(t / "c.npy", np.zeros((4, 64), np.float32)) or t / "c.npy")],
                      "not an .npz"),
    "output is a directory": (lambda t, m: ["compress", str(m), "--bits", "3", "-o",
                                            str((t / "d.onnx").mkdir() or t / "d.onnx")], "cannot write"),
    "output is input": (lambda t, m: ["compress", str(m), "--bits", "3", "-o", str(m)], "output path"),
    "bad option": (lambda t, m: ["compress", str(m), "--bits", "three"], "invalid float"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_2_one_line(tmp_path, capsys, mlp_path, case):
    argv_fn, needle = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = argv_fn(work, mlp_path)
    if "-o" not in argv:
        argv += ["-o", str(mlp_path.parent / "out.onnx")]
    _expect_bad(capsys, argv, needle, mlp_path.parent)


def test_console_entry_point_bad_input(tmp_path):
    """Through a real process: one line on stderr, exit 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "bayesq_onnx", "compress", str(tmp_path / "x.onnx"), "--bits", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_eval_reports_metrics(tmp_path, mlp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["compress", str(mlp_path), "--bits", "4.5", "-o", str(out), "--quiet",
                 "--calib", _npz(tmp_path / "c.npz", **models.mlp_data())]) == 0
    data = _npz(tmp_path / "d.npz", **models.mlp_data(32, seed=5))
    labels = tmp_path / "l.npy"
    np.save(labels, np.arange(32) % 32)
    assert main(["eval", str(mlp_path), str(out), "--data", data, "--labels", str(labels),
                 "--json", str(tmp_path / "m.json")]) == 0
    import json
    m = json.loads((tmp_path / "m.json").read_text())
    logits = m["outputs"]["logits"]
    # 4.5 bits keeps the logits close (0.974 measured); a broken lowering lands far below 0.9.
    # The 1e-6 above 1 allows float rounding of a perfect cosine.
    assert 0.9 < logits["cosine"] <= 1.0 + 1e-6
    assert 0 <= logits["top1_agreement"] <= 1 and logits["kl"] >= 0
