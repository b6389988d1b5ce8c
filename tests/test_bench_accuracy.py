"""tools/bench_accuracy.py's matching and gap tables, on the small chain of tests/models.py (no real
models): a knapsack method run at gptq's bits never stores more, and may take gptq's own plan."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

import models
from bayesq_onnx.runtime.session import make_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_accuracy  # noqa: E402


def test_a_knapsack_at_gptqs_bits_stores_at_most_those_bits_and_may_take_gptqs_plan(tmp_path, reference_wins):
    """With the plan check made to ship gptq's contender, bayesq@gptq is gptq's row: the same stored
    bits (its budget admits gptq's plan) and the same model (refitted on all the samples)."""
    src = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), src)
    test = models.mlp_data(64, seed=5)
    ref = make_session(src).run(None, test)[0]

    def cosine(path):
        out = make_session(path).run(None, test)[0]
        return {"cosine": float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref))}

    task = bench_accuracy.Task(src, models.mlp_data(), cosine, "cosine", True, {})
    rows = bench_accuracy.bench_model("mlp", task, ["gptq", "bayesq"], [2.5, 3.0], tmp_path, None)
    gptq = {r["gptq_bits"]: r for r in rows if r["method"] == "gptq"}
    matched = [r for r in rows if r["method"] == "bayesq@gptq"]
    assert len(matched) == len(gptq) == 2
    for r in matched:
        # the @gptq budget: gptq's stored bits plus half a bit over the 34816 quantized weights
        assert 0 < r["budget"] - r["gptq_bits"] < 1 / 34816
        assert r["bits_per_weight"] == r["gptq_bits"] and r["plan"] == "gptq " + gptq[r["gptq_bits"]]["plan"]
        assert r["cosine"] == gptq[r["gptq_bits"]]["cosine"]


def test_gap_table_shares():
    rows = [{"model": "m", "method": "fp32", "budget": None, "acc": 0.9, "acc_se": 0.0, "cos": 1.0},
            # at 3 bits gptq's gap is 0.1, rtn's 0.2: the best baseline is gptq; bayesq's gap 0.05 closes half
            {"model": "m", "method": "gptq", "gptq_bits": 3.0, "acc": 0.8, "acc_se": 0.01, "cos": 0.9},
            {"model": "m", "method": "rtn", "gptq_bits": 3.0, "acc": 0.7, "acc_se": 0.01, "cos": 0.8},
            {"model": "m", "method": "bayesq@gptq", "gptq_bits": 3.0, "acc": 0.85, "acc_se": 0.01, "cos": 0.99},
            # at 4 bits gptq is within two standard errors of fp32: no share
            {"model": "m", "method": "gptq", "gptq_bits": 4.0, "acc": 0.89, "acc_se": 0.01, "cos": 0.95},
            {"model": "m", "method": "bayesq@gptq", "gptq_bits": 4.0, "acc": 0.9, "acc_se": 0.01, "cos": 0.975}]
    lines = bench_accuracy.gap_table(rows, "m")
    body = [line for line in lines if line.startswith("| 3") or line.startswith("| 4")]
    assert body == ["| 3.0000 | acc (0.9) | gptq 0.8 | 0.85 (+0.50) |",
                    "| 3.0000 | cos (1) | gptq 0.9 | 0.99 (+0.90) |",
                    "| 4.0000 | acc (0.9) | gptq 0.89 (within 2 SE) | 0.9 |",
                    "| 4.0000 | cos (1) | gptq 0.95 | 0.975 (+0.50) |"]
