"""tools/bench_kernels.py's --cold stacking (each copy computes what its model alone does) and a tiny
--cold --auto run (every candidate timed at every M, per product)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bayesq_onnx.runtime import custom_ops
from bayesq_onnx.runtime.session import session_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not custom_ops.available(), reason=str(custom_ops.unavailable_reason()))


def test_stacked_copies_compute_each_copy():
    rng = np.random.default_rng(0)
    copies = [bench_kernels.candidates(64, 32, 32, rng)["bq-u3-g32"] for _ in range(3)]
    A = rng.standard_normal((5, 64)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), session_options()).run(None, {"A": A})

    got = run(bench_kernels.stacked(copies))
    assert [o.name for o in bench_kernels.stacked(copies).graph.output] == ["c0_Y", "c1_Y", "c2_Y"]
    for y, m in zip(got, copies):      # the same op on the same inputs: the same bytes
        assert y.tobytes() == run(m)[0].tobytes()


def test_cold_auto_run(monkeypatch, capsys):
    monkeypatch.setattr(bench_kernels, "COLD_BYTES", 3 * 4 * 64 * 64)      # three copies of 64 x 64
    assert bench_kernels.main(["--cold", "--auto", "--shapes", "64x64", "--ms", "1,8", "--reps", "1",
                               "--threads", "1", "--only", "bq-u3-g32,bq-lut3"]) == 0
    out = capsys.readouterr().out
    assert "(3 copies, ms per product)" in out
    header = next(l for l in out.splitlines() if l.split()[:1] == ["M"]).split()[1:]
    assert sorted(header) == ["bq-lut3", "bq-lut3@auto", "bq-u3-g32", "bq-u3-g32@auto", "fp32"]
    rows = [l for l in out.splitlines() if re.match(r"\s+(1|8) ", l)]
    assert len(rows) == 2 and all(len(re.findall(r"[\d.]+ \(\s*[\d.]+\)", r)) == len(header) for r in rows)
