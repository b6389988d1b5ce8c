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


def test_paired_table_differences_and_their_errors():
    """Each knapsack method against the best uniform baseline and against the other knapsack method,
    on the same samples: the mean difference and the standard error of the differences (numpy), and
    perplexity's relative change from the NLL sums (fixed values, worked by hand below)."""
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.5, 1.0, 50)
    x = {m: ref - rng.uniform(0, s, 50) for m, s in (("gptq", 0.4), ("rtn", 0.6), ("bayesq@gptq", 0.1),
                                                    ("hawq@gptq", 0.2))}
    ppl = {"fp32": [10.0, 20.0], "gptq": [14.0, 26.0], "rtn": [30.0, 30.0], "bayesq@gptq": [11.0, 21.0],
           "hawq@gptq": [12.0, 21.0]}
    counts = [5.0, 5.0]

    def row(m, cos, nll):
        return {"model": "m", "method": m, "gptq_bits": None if m == "fp32" else 3.0, "cos": float(np.mean(cos)),
                "perplexity": float(np.exp(np.sum(nll) / 10)),
                bench_accuracy.PER_SAMPLE: {"cos": cos, "perplexity": np.stack([nll, counts], axis=1)}}

    rows = [row("fp32", np.ones(50), ppl["fp32"])] + [row(m, x[m], ppl[m]) for m in x]
    lines = bench_accuracy.paired_table(rows, "m")
    body = {tuple(c.strip() for c in line.split("|")[2:4]): [c.strip() for c in line.split("|")[4:6]]
            for line in lines if line.startswith("| 3")}

    def cell(a, b):
        d = x[a] - x[b]
        return f"{d.mean():+.4g} ± {d.std(ddof=1) / np.sqrt(50):.2g}"

    assert body["cos", "gptq"] == [cell("bayesq@gptq", "gptq"), cell("hawq@gptq", "gptq")]   # gptq is nearer fp32 than rtn
    # the knapsack methods in row order (bayesq, then hawq): hawq against bayesq, not the same again negated
    assert body["cos", "bayesq@gptq"] == ["-", cell("hawq@gptq", "bayesq@gptq")]
    assert ("cos", "hawq@gptq") not in body
    # bayesq against gptq: NLL differences -3 and -5 over 10 tokens, exp(-0.8) - 1 = -55.1%; the passages'
    # residuals from the mean -0.8 per token are +1 and -1, so the SE is sqrt(2 * 2) / 10 = 0.2 in log, 0.2 * exp(-0.8)
    assert body["perplexity", "gptq"][0] == f"{np.expm1(-0.8):+.1%} ± {0.2 * np.exp(-0.8):.1%}"
    # at a budget the knapsack methods (each spending it) against each other, in row order
    budget = [{**row(m.removesuffix("@gptq"), x[m], ppl[m]), "gptq_bits": None, "budget": 3.5, "plan": "knapsack"}
              for m in ("bayesq@gptq", "hawq@gptq")]
    # rtn without a gptq row to match it to: at its budget, but not a knapsack's row
    budget.append({**row("rtn", x["rtn"], ppl["rtn"]), "gptq_bits": None, "budget": 3.5, "plan": "uniform b3-g64"})
    lines = bench_accuracy.paired_table(rows + budget, "m")
    assert f"| 3.5 | cos | bayesq | - | {cell('hawq@gptq', 'bayesq@gptq')} |" in lines
    assert not any(line.startswith("| 3.5 | cos | hawq") or line.startswith("| 3.5 | cos | rtn") for line in lines)
    assert "| budget | metric | against | bayesq | hawq |" in lines
    # no per-sample values (or no fp32 row), no table
    assert bench_accuracy.paired_table([{k: v for k, v in r.items() if k != bench_accuracy.PER_SAMPLE} for r in rows],
                                       "m") == []
