"""Hardening: random graphs, budgets and options through compress (tests/fuzzing.py has the property;
``python tools/fuzz.py --examples 1000`` runs it at scale), and Ctrl-C in any stage leaves nothing behind."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr

import pytest
from hypothesis import HealthCheck, given, settings

import fuzzing
from bayesq_onnx import api
from bayesq_onnx.plan import tables
from bayesq_onnx.cli import main
from bayesq_onnx.graph import model_io


# the quick profile: deterministic for CI (derandomize, no example database), no per-example deadline
# (the first example pays onnxruntime's start-up), about 25 examples in well under a minute
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzzing.cases())
def test_compress_either_refuses_in_one_line_or_writes_a_model_that_checks(case):
    outcome = fuzzing.run_case(case)
    assert outcome.status in ("checked", "rejected"), (case.describe(), outcome.message, *outcome.details)


def test_odd_group_sizes_in_a_recipe_are_refused_in_one_line(tmp_path, capsys, mlp_path):
    """Found by the fuzzer: a recipe with blocks=[48] crashed in the candidate formats."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"bits": 4.0, "blocks": [48]}))
    assert main(["compress", str(mlp_path), "--recipe", str(recipe), "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blocks must be powers of two >= 16" in err[0], err


def test_plan_check_when_plans_change_nothing(tmp_path):
    """Found by the fuzzer: weights too small to move an attention block's outputs (the residual
    dominates in fp32) give every plan zero distortion, and the knapsack / best-uniform ratio
    divided by zero."""
    case = fuzzing.Case("attention", 498, {"d": 32, "h": 16, "seq": 5, "vocab": 40, "k": 1, "transB": True,
                                           "tied": False, "w_scale": 1e-7, "zero_rows": False, "data": "normal"},
                        10, {}, "never")
    model, data = fuzzing.build(case)
    rep = api.compress(model, bits=6.971, tables="proxy", custom_ops=False, blocks=(16, 32, 256),
                       min_elements=64, keep_fp32=False, calib=data).report
    assert all(c["distortion"] == 0 for c in rep["plan_check"]["candidates"])
    assert rep["plan_check"]["knapsack_vs_best_uniform"] == 1.0   # equal: both leave the outputs as they were


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _partial_save(model, path, *args, **kwargs):
    """The model write (model_io._write_whole) cut short by Ctrl-C: some bytes on disk, then the interrupt."""
    with open(path, "wb") as f:
        f.write(model.SerializeToString()[:100])
    raise KeyboardInterrupt


# (module, function) to interrupt: each stage of compress, and the writes themselves
STAGES = {
    "calibration": (api.StatsAccumulator, "add"),
    "loss tables": (tables.KronTables, "__call__"),
    "plan check": (api, "check_plans"),
    "lowering": (api, "lower_ort_cpu"),
    "model write": (model_io, "_write_whole"),
}


@pytest.mark.parametrize("stage", STAGES)
def test_interrupt_in_any_stage_leaves_no_file(tmp_path, monkeypatch, mlp_path, stage):
    module, name = STAGES[stage]
    monkeypatch.setattr(module, name, _partial_save if stage == "model write" else _interrupt)
    out = tmp_path / "out"
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["compress", str(mlp_path), "--bits", "4", "-o", str(out / "q.onnx"), "--report",
                     str(out / "r.json"), "--html", str(out / "r.html"), "--quiet"])
    assert code == 130 and err.getvalue().strip().splitlines()[-1] == "bayesq-onnx: interrupted"
    # no output, no temp file (the output folder is made only when the result is written)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("writer", ["report", "html"])
def test_interrupt_while_writing_a_report_leaves_no_partial_file(tmp_path, monkeypatch, mlp_path, writer):
    """The model is written first (atomically); an interrupt while writing the JSON or HTML report
    leaves no report, never a half-written one, no temp file, and takes the model away too: a run
    leaves all it was asked for or nothing."""
    real = model_io.os.replace

    def replace(src, dst):
        if str(dst).endswith(".json" if writer == "report" else ".html"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(model_io.os, "replace", replace)
    out = tmp_path / "out"
    with redirect_stderr(io.StringIO()):
        code = main(["compress", str(mlp_path), "--bits", "4", "-o", str(out / "q.onnx"), "--report",
                     str(out / "r.json"), "--html", str(out / "r.html"), "--quiet"])
    assert code == 130
    left = sorted(p.name for p in out.iterdir())
    assert left == [], left     # all or nothing: the model goes too
