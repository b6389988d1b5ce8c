"""Accuracy regression on a real model: a change that breaks bayesq's (or gptq's) accuracy fails here.

The Fashion-MNIST CNN of ``bayesq_onnx.assets.fashion_mnist``, trained briefly (400 steps of 32
images, about 20 s of one core) from the Debian package's files, calibrated on 256 training images
(192 fit, 64 held back for the plan check; with 64 images bayesq@gptq fell 2.8 points behind gptq
on one seed), scored on the 10k test images.  One budget, 3.0 bits:
gptq takes its uniform format (2.870 bits), bayesq runs at gptq's bits and at the budget.

Measured (this machine, training seeds 0-5; seed 0 is the one tested, the others stand in for
the other bytes other CPUs train to; accuracy on the 10k test images, SE about 0.4 points each,
less for paired differences):

    seed  fp32    gptq 2.870  bayesq@gptq 2.868  bayesq 3.0 (2.989-2.996)
    0     0.7959  0.7679      0.7575             0.7952
    1     0.7869  0.7776      0.7870             0.7828
    2     0.7856  0.7109      0.7221             0.7834
    3     0.8055  0.7940      0.7955             0.8014
    4     0.7904  0.7840      0.7860             0.7886
    5     0.7980  0.7925      0.7946             0.7988

bayesq at 3.0 bits stays within 0.41 points of fp32; at gptq's bits it is 1.04 points behind
gptq (seed 0) to 1.12 ahead; gptq is 0.55-7.5 points below fp32.  Each margin below is two to five
times the worst measured gap, so other CPUs' models pass, and a broken quantizer fails: codes off
by one step (every method at chance, 0.10) and a knapsack fed negated loss tables (bayesq 0.7575
at the 3.0 budget, 3.8 points below fp32) both fail.  Not caught: GPTQ's error feedback replaced by
round-to-nearest, which costs this briefly trained CNN only 1.0 point at 3.0 bits (0.785) and
0.7 at gptq's bits; a fully trained one is far more sensitive (README "Measured": rtn 0.78 against
gptq 0.85 at 2.87 bits), but it takes minutes of training.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from bayesq_onnx import Analysis, Recipe
from bayesq_onnx.assets import load_npz
from bayesq_onnx.assets import fashion_mnist as fm

BUDGET = 3.0
TRAIN = fm.TrainConfig(max_steps=400, batch_size=32)
FP32_MIN = 0.75             # training itself works: 0.786-0.806 measured
BAYESQ_BELOW_FP32 = 0.02    # bayesq at 3.0 bits: at most 0.41 points below fp32 measured
BAYESQ_BELOW_GPTQ = 0.03    # bayesq at gptq's bits: at most 1.04 points below gptq measured
GPTQ_BELOW_FP32 = 0.15      # the baseline itself: at most 7.5 points below fp32 measured


def _require_data():
    pytest.importorskip("torch")
    if not all((fm.DATA_DIR / f).is_file() for f in fm.IDX_FILES.values()):
        pytest.skip("Debian package dataset-fashion-mnist not installed")


def test_fashion_mnist_accuracy_at_3_bits(tmp_path):
    _require_data()
    a = fm.prepare_fashion_mnist(tmp_path / "cache", n_calib=256, n_eval=10_000, train_config=TRAIN)
    data, labels, calib = load_npz(a.eval_data), np.load(a.labels), load_npz(a.calib)
    fp32 = fm.accuracy(a.model, data, labels)

    def score(analysis, bits, name):
        rep = analysis.compress(bits, output=tmp_path / f"{name}.onnx").report
        return rep, fm.accuracy(tmp_path / f"{name}.onnx", data, labels)

    gptq_rep, gptq = score(Analysis(a.model, Recipe(bits=BUDGET, method="gptq"), calib=calib), BUDGET, "gptq")
    matched = math.floor(gptq_rep["bits_per_weight"] * 1e4) / 1e4     # never above gptq's bits
    analysis = Analysis(a.model, Recipe(bits=BUDGET), calib=calib)
    at_gptq_rep, at_gptq = score(analysis, matched, "bayesq_at_gptq")
    at_budget_rep, at_budget = score(analysis, BUDGET, "bayesq")
    figures = (f"fp32 {fp32:.4f}, gptq {gptq:.4f} at {gptq_rep['bits_per_weight']:.4f} b, bayesq {at_gptq:.4f} "
               f"at {at_gptq_rep['bits_per_weight']:.4f} b and {at_budget:.4f} at {at_budget_rep['bits_per_weight']:.4f} b")
    assert at_gptq_rep["bits_per_weight"] <= gptq_rep["bits_per_weight"] and at_budget_rep["bits_per_weight"] <= BUDGET
    assert fp32 >= FP32_MIN, figures
    assert gptq >= fp32 - GPTQ_BELOW_FP32, figures
    assert at_budget >= fp32 - BAYESQ_BELOW_FP32, figures
    assert at_gptq >= gptq - BAYESQ_BELOW_GPTQ, figures
