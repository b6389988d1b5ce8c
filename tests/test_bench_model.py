"""tools/bench_model.py's suite on a tiny token model built here (no real models): compressed once and
cached, every variant timed per ISA in its own subprocess, a length the graph refuses skipped, an ISA
the CPU lacks reported, and the rows' ratios those of the timings."""
from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

import models
from bayesq_onnx.runtime import custom_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_model  # noqa: E402

pytestmark = pytest.mark.skipif(not custom_ops.available(), reason=str(custom_ops.unavailable_reason()))


def test_suite_on_a_tiny_token_model(tmp_path):
    # vocab 1000: the suite's token ids are drawn below 1000; d 128 so every MatMul weight is above
    # the recipe's 1024-element minimum and gets a packed format
    p = tmp_path / "embed.onnx"
    onnx.save(models.embed(vocab=1000, d=128, seq=12), p)
    bm = bench_model.BenchModel("tiny", p, models.embed_data(n=32, vocab=1000, seq=12), key="k")
    isa = bench_model.supported_isas()[0]
    other = "avx512" if isa == "neon" else "neon"      # one this CPU cannot run
    folder = tmp_path / "cache"
    out = bench_model.suite([bm], (3.0, 4.0), [isa, other], "1x1,2x16,4", reps=1, threads=1, clock="cpu",
                            folder=folder, quiet=True)

    files = out["files"]["tiny"]
    assert set(files) == {"fp32", "bq3", "bq4", "nbits4"}
    ops = {k: {n.op_type for n in onnx.load(v).graph.node} for k, v in files.items()}
    assert "MatMulNBits" in ops["nbits4"] and "MatMul" not in ops["nbits4"]     # every MatMul weight 4-bit
    assert ops["bq3"] & {"MatMulAffine", "MatMulLut"} and "MatMulNBits" not in ops["bq3"]
    assert 2.5 < out["bits"]["tiny"]["bq3"] <= 3.0 < out["bits"]["tiny"]["bq4"] <= 4.0

    ran, lacking = out["results"]
    assert lacking["isa"] == other and lacking["skipped"] and not lacking["rows"]
    by_shape = {r["shape"]: r for r in ran["rows"]}
    assert "skipped" in by_shape["4"]                  # a token model needs a length
    for shape, m in (("1x1", 1), ("2x16", 32)):        # the export's length 12 was freed
        r = by_shape[shape]
        assert r["m"] == m and r["isa"] == isa
        assert set(r["ms"]) == {"fp32", "bq3-packed", "bq3-auto", "bq4-packed", "bq4-auto", "nbits4-acc0",
                                "nbits4-acc4"}
    rows = bench_model.table_rows(out)
    assert len(rows) == 2 * 7
    for r in rows:
        ms = by_shape[r["shape"]]["ms"]
        assert r["ratio"] == round(ms[r["variant"]] / ms["fp32"], 4)
        assert r["paired_q1"] <= r["paired_q3"] and (r["variant"] != "fp32" or r["paired_q1"] == 1.0)
    assert any("bayesq 3.0 bits with unpack=auto" in line for line in bench_model.goals(rows))

    # --tune: auto also on the switch measured here for each bayesq model
    tuned = bench_model.suite([bm], (3.0,), [isa], "1x1", reps=1, threads=1, clock="cpu", folder=folder,
                              quiet=True, tuned=True)["results"][0]
    assert set(tuned["rows"][0]["ms"]) == {"fp32", "bq3-packed", "bq3-auto", "bq3-tuned", "nbits4-acc0", "nbits4-acc4"}
    assert "tuned here" in tuned["notes"]["tiny"]["bq3"]

    # a rerun finds the compressed files and does not rewrite them
    stamps = {k: Path(v).stat().st_mtime_ns for k, v in files.items()}
    again = bench_model.suite([bm], (3.0, 4.0), [other], "1x1", reps=1, folder=folder, quiet=True)
    assert {k: Path(v).stat().st_mtime_ns for k, v in again["files"]["tiny"].items()} == stamps
