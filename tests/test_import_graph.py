"""The compressor's import path stays clean: compressing a model never loads the benchmark assets,
the ONNX->torch interpreter, torch, transformers or ray (they are optional and slow to import)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

import models

FORBIDDEN = ("bayesq_onnx.assets", "bayesq_onnx.curvature.onnx_torch", "bayesq_onnx.torch_export",
             "torch", "transformers", "ray")

# run in a fresh interpreter: this test process may have imported any of them already
SCRIPT = """
import json, sys
import bayesq_onnx
from bayesq_onnx.cli import main
code = main(["compress", sys.argv[1], "--bits", "4", "-o", sys.argv[2], "--quiet"])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_compress_does_not_import_assets_or_torch(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), src)
    out = tmp_path / "mlp.bq.onnx"
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(out)], capture_output=True, text=True,
                       cwd=repo)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["code"] == 0 and out.exists()
    loaded = [m for m in res["modules"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert loaded == [], f"compress imported {loaded}"
    assert "bayesq_onnx.api" in res["modules"]   # the check looks at the right interpreter
