"""bayesq-onnx tune (runtime/tune.py): the switch rule, the MatMuls-only model it times, the file it
writes beside the model and how make_session(unpack="auto") reads it (only for the machine it was
measured on).  Timings themselves are not asserted: tests are not benchmarks."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bayesq_onnx.cli import main
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.runtime import custom_ops, session, tune
from bayesq_onnx.runtime.session import make_session

from test_unpack import K1, N1, bound, two_layer

pytestmark = pytest.mark.skipif(not custom_ops.available(), reason=str(custom_ops.unavailable_reason()))


def test_switch_is_where_packed_first_stops_winning():
    assert tune.switch_from({1: 0.4, 4: 0.8, 8: 1.1, 16: 1.3}) == 8
    assert tune.switch_from({1: 0.4, 4: 1.05, 8: 0.9, 16: 1.3}) == 4    # fp32 from the first crossing
    assert tune.switch_from({1: 0.4, 64: 0.9}) is None                   # faster at the most rows measured
    assert tune.switch_from({1: 1.2, 64: 1.5}) == 1                      # fp32 everywhere


def test_matmuls_only_runs_each_matmul_on_its_own_input():
    m, _, W2, _ = two_layer()
    mm = tune.matmuls_only(m)
    assert [n.op_type for n in mm.graph.node] == ["MatMulLut", "MatMulAffine"]
    assert [i.name for i in mm.graph.input] == ["x0", "x1"]
    x = np.random.default_rng(0).standard_normal((3, K1)).astype(np.float32)
    h1 = np.random.default_rng(1).standard_normal((3, N1)).astype(np.float32)
    y0, y1 = make_session(mm, unpack="never").run(None, {"x0": x, "x1": h1})
    _, h = make_session(m, unpack="never").run(None, {"x": x})
    assert y0.tobytes() == h.tobytes()          # layer 1 as the model runs it
    assert np.all(np.abs(y1 - h1 @ W2) <= bound(h1, W2))   # layer 2 on its own input


def test_a_model_without_bayesq_matmuls_has_nothing_to_tune():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(BayesQError, match="nothing to tune"):
        tune.matmuls_only(helper.make_model(g))


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    """The two-layer model on disk, under a table that would switch both layers at 9 rows."""
    monkeypatch.setattr(session, "SMALL_MODEL", 0)
    monkeypatch.setattr(session, "PACKED_BELOW", {custom_ops.kernel_isa(): (9, 9, 9, 9)})
    m, *_ = two_layer()
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K1]))
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    return path


def _outputs(sess, M):
    x = np.random.default_rng(M).standard_normal((M, K1)).astype(np.float32)
    return [a.tobytes() for a in sess.run(None, {"x": x})]


@pytest.mark.parametrize("switch", [4, None])
def test_make_session_takes_the_switch_measured_here(model_file, switch):
    """A switch at 4 rows (the table says 9): 4 rows run fp32; None: 12 rows still run packed."""
    tune.save(tune.Tuning(tune.machine_key(0), switch, {1: 0.5}), tune.sidecar(model_file), model_file)
    auto = make_session(model_file)
    packed, unpacked = (make_session(model_file, unpack=u) for u in ("never", "always"))
    for M in (3, 4, 12):
        fp32 = switch is not None and M >= switch
        assert _outputs(auto, M) == _outputs(unpacked if fp32 else packed, M), M


@pytest.mark.parametrize("stale", ["another machine", "threads", "another model", "garbage"])
def test_a_switch_measured_elsewhere_is_ignored(model_file, stale):
    key = tune.machine_key(0)
    if stale == "garbage":
        tune.sidecar(model_file).write_text("{not json")
    else:
        key = {**key, "cpu": "another CPU"} if stale == "another machine" else \
            {**key, "threads": 3} if stale == "threads" else key
        tune.save(tune.Tuning(key, 1, {1: 2.0}), tune.sidecar(model_file), model_file)
        if stale == "another model":   # the model written again after it was tuned
            onnx.save(onnx.load(str(model_file)), str(model_file))
            os.utime(model_file, ns=(1, 1))
    auto, packed = make_session(model_file), make_session(model_file, unpack="never")
    assert _outputs(auto, 4) == _outputs(packed, 4)     # the table's switch (9), not the file's (fp32 from 1)


def test_cli_tune_writes_what_make_session_reads(model_file, capsys):
    assert main(["tune", str(model_file), "--rows", "1,2", "--reps", "1", "--quiet"]) == 0
    saved = json.loads(tune.sidecar(model_file).read_text())
    assert set(saved["ratios"]) == {"1", "2"} and saved["machine"] == tune.machine_key(0)
    assert saved["packed_below"] == tune.switch_from({int(k): v for k, v in saved["ratios"].items()})
    assert tune.load(model_file, 0) is not None and tune.load(model_file, 1) is None
    assert str(tune.sidecar(model_file)) in capsys.readouterr().out
    assert main(["tune", str(model_file.with_name("missing.onnx")), "--quiet"]) == 2
    assert main(["tune", str(model_file), "--rows", "0", "--quiet"]) == 2
