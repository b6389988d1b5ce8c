"""The fuzz property shared by tests/test_fuzz.py (a quick, derandomized profile) and tools/fuzz.py
(the same property at scale): random small graphs, budgets and options through ``bayesq-onnx compress``.

Every run must end one of two ways:

* ``rejected``: exit 2 with exactly one line ``bayesq-onnx: error: ...`` and nothing written;
* ``checked``: the written model passes ``onnx.checker`` (full check), loads through
  ``make_session`` and its outputs match the numpy reference ops (``REFERENCE_OPS``) on the
  calibration inputs, and ``inspect`` reads back the stored bits the report claims.

Anything else (a traceback, an internal error, a mismatch) is a ``crash``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bayesq_onnx.cli import main
from bayesq_onnx.config import METHODS
from bayesq_onnx.graph.inspect import inspect_model
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS
from bayesq_onnx.runtime.session import make_session

KINDS = ("mlp", "conv", "gather", "attention")
# onnxruntime (fp32 kernels, blocked or fused dequantization) against numpy fp32 on the same stored
# weights: only the summation order differs, over reductions of at most a few hundred terms and
# through a softmax, which is ~1e-6 relative; 1e-4 of the output's scale leaves room for that and is
# still far below one quantization step (at least 1/256 of a group's range)
RTOL, ATOL_OF_SCALE = 1e-4, 1e-4


@dataclass
class Case:
    kind: str
    seed: int
    dims: dict
    n_samples: int
    recipe: dict
    unpack: str

    def describe(self) -> str:
        return json.dumps({"kind": self.kind, "seed": self.seed, "dims": self.dims, "n": self.n_samples,
                           "recipe": self.recipe, "unpack": self.unpack})


@dataclass
class Outcome:
    status: str                 # "checked" | "rejected" | "crash"
    message: str = ""
    outputs_checked: int = 0
    details: list[str] = field(default_factory=list)


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(KINDS))
    small = st.sampled_from((16, 32, 48, 64))
    dims = {"d": draw(small), "h": draw(st.sampled_from((16, 32, 64, 96))), "seq": draw(st.integers(2, 6)),
            "vocab": draw(st.sampled_from((40, 64, 100))), "k": draw(st.sampled_from((1, 3))),
            "transB": draw(st.booleans()), "tied": draw(st.booleans())}
    # mostly requests that can succeed; one in five is odd (group sizes no format takes, budgets
    # below the cheapest formats or above fp32), where the answer must be one line and exit 2
    odd = draw(st.sampled_from((False, False, False, False, True)))
    blocks = draw(st.lists(st.integers(1, 300) if odd else st.sampled_from((16, 32, 64, 128, 256)),
                           min_size=1, max_size=3, unique=True))
    bits = draw(st.floats(0.1, 40.0) if odd else
                st.one_of(st.sampled_from((4.0, 4.5, 5.0, 6.0, 8.0, 10.0)), st.floats(3.0, 12.0)))
    # weights and data at the edges: tiny (fp16 scales underflow) or huge weights, rows of zeros
    # (a group with no range), inputs that are all zero or constant (a singular X^T X)
    dims["w_scale"] = draw(st.sampled_from((1.0, 1.0, 1.0, 1e-7, 1e4)))
    dims["zero_rows"] = draw(st.booleans())
    dims["data"] = draw(st.sampled_from(("normal", "normal", "normal", "zeros", "constant")))
    recipe = {"bits": round(bits, 3), "method": draw(st.sampled_from(sorted(METHODS))),
              "tables": draw(st.sampled_from(("kron", "proxy"))),
              "target": draw(st.sampled_from(("ort-cpu", "portable"))),
              "custom_ops": draw(st.booleans()), "blocks": sorted(blocks),
              "min_elements": draw(st.sampled_from((64, 256, 1024))),
              "keep_fp32": draw(st.booleans())}
    return Case(kind, draw(st.integers(0, 2**16)), dims, draw(st.integers(4, 24)), recipe,
                draw(st.sampled_from(("never", "always"))))


def _w(rng, *shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def build(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A small graph of ``case.kind`` and calibration inputs for it."""
    rng = np.random.default_rng(case.seed)
    d, h, seq = case.dims["d"], case.dims["h"], case.dims["seq"]
    n, V = case.n_samples, case.dims["vocab"]
    f = TensorProto.FLOAT
    if case.kind == "mlp":
        # Gemm's B is (K, N) = (h, d), stored (d, h) with transB
        inits = {"W1": _w(rng, d, h), "b1": _w(rng, h), "W2": _w(rng, d, h) if case.dims["transB"] else _w(rng, h, d)}
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["ab"]),
                 helper.make_node("Relu", ["ab"], ["r"]),
                 helper.make_node("Gemm", ["r", "W2"], ["y"], transB=int(case.dims["transB"]))]
        inputs = [helper.make_tensor_value_info("x", f, ["n", d])]
        outputs = [helper.make_tensor_value_info("y", f, ["n", d])]
        data = {"x": rng.standard_normal((n, d)).astype(np.float32)}
    elif case.kind == "conv":
        k = case.dims["k"]
        inits = {"C1": _w(rng, h, d, k, k), "C2": _w(rng, d, h, 1, 1), "Wfc": _w(rng, d, 16)}
        nodes = [helper.make_node("Conv", ["x", "C1"], ["c1"], pads=[k // 2] * 4),
                 helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "C2"], ["c2"]),
                 helper.make_node("GlobalAveragePool", ["c2"], ["gp"]), helper.make_node("Flatten", ["gp"], ["fl"]),
                 helper.make_node("MatMul", ["fl", "Wfc"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", f, ["n", d, 5, 5])]
        outputs = [helper.make_tensor_value_info("y", f, ["n", 16])]
        data = {"x": rng.standard_normal((n, d, 5, 5)).astype(np.float32)}
    elif case.kind == "gather":
        inits = {"E": _w(rng, V, d), "W": _w(rng, d, h), "Wo": _w(rng, h, d)}
        nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "W"], ["hh"]),
                 helper.make_node("Tanh", ["hh"], ["t"]), helper.make_node("MatMul", ["t", "Wo"], ["o"])]
        if case.dims["tied"]:   # the table is also the head
            nodes += [helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]),
                      helper.make_node("MatMul", ["o", "ET"], ["y"])]
            outputs = [helper.make_tensor_value_info("y", f, ["n", seq, V])]
        else:
            nodes += [helper.make_node("Identity", ["o"], ["y"])]
            outputs = [helper.make_tensor_value_info("y", f, ["n", seq, d])]
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", seq])]
        data = {"ids": rng.integers(0, V, (n, seq)).astype(np.int64)}
    else:   # attention-like: one head of self-attention with a residual
        inits = {"Wq": _w(rng, d, d), "Wk": _w(rng, d, d), "Wv": _w(rng, d, d), "Wo": _w(rng, d, d),
                 "scale": np.array(1 / np.sqrt(d), np.float32)}
        nodes = [helper.make_node("MatMul", ["x", w], [w.lower()]) for w in ("Wq", "Wk", "Wv")]
        nodes += [helper.make_node("Transpose", ["wk"], ["kt"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["wq", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
                  helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "wv"], ["ctx"]),
                  helper.make_node("MatMul", ["ctx", "Wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", f, ["n", seq, d])]
        outputs = [helper.make_tensor_value_info("y", f, ["n", seq, d])]
        data = {"x": rng.standard_normal((n, seq, d)).astype(np.float32)}
    last = {"mlp": "W2", "conv": "Wfc", "gather": "Wo", "attention": "Wo"}[case.kind]
    for k, a in inits.items():
        if a.ndim >= 2:
            # huge weights only in the last layer: before a tanh or softmax they leave pre-activations
            # near 0 whose fp32 cancellation error, not the quantizer, decides the outputs
            if case.dims["w_scale"] < 1 or k == last:
                a *= np.float32(case.dims["w_scale"])
            if case.dims["zero_rows"]:
                a[: max(1, a.shape[0] // 4)] = 0
    for k, a in data.items():
        if a.dtype == np.float32 and case.dims["data"] != "normal":
            a[...] = 0 if case.dims["data"] == "zeros" else 0.5
    g = helper.make_graph(nodes, case.kind, inputs, outputs,
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m, data


def run_case(case: Case, workdir: str | os.PathLike | None = None) -> Outcome:
    """Compress ``case`` through the command line and check what comes out (module docstring)."""
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            return _run(case, tmp)
        except Exception:
            return Outcome("crash", "exception in the check", details=[traceback.format_exc()])


def _run(case: Case, tmp: Path) -> Outcome:
    model, data = build(case)
    src, calib, recipe = tmp / "in.onnx", tmp / "calib.npz", tmp / "recipe.json"
    out, report = tmp / "out" / "q.onnx", tmp / "out" / "r.json"
    onnx.save(model, src)
    np.savez(calib, **data)
    recipe.write_text(json.dumps(case.recipe))
    err = io.StringIO()
    argv = ["compress", str(src), "--recipe", str(recipe), "--calib", str(calib), "-o", str(out),
            "--report", str(report), "--quiet", "--threads", "1"]
    os.environ["BAYESQ_DEBUG"] = "1"   # an internal error raises here, with its traceback
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Exception:
        return Outcome("crash", "internal error", details=[traceback.format_exc()])
    finally:
        del os.environ["BAYESQ_DEBUG"]
    lines = err.getvalue().strip().splitlines()
    left = sorted(p.name for p in (tmp / "out").iterdir()) if (tmp / "out").exists() else []
    if code == 2:
        if len(lines) != 1 or not lines[0].startswith("bayesq-onnx: error: "):
            return Outcome("crash", "exit 2 without exactly one error line", details=lines)
        if left:
            return Outcome("crash", "a rejected run left files behind", details=left)
        return Outcome("rejected", lines[0][len("bayesq-onnx: error: "):])
    if code != 0:
        return Outcome("crash", f"exit {code}", details=lines)
    bad = [l for l in lines if not l.startswith("bayesq-onnx: warning: ")]   # --quiet: warnings only
    if bad:
        return Outcome("crash", "unexpected output on stderr", details=bad)
    return _check_output(out, report, data)


def _check_output(out: Path, report: Path, data: dict) -> Outcome:
    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out))
    feed = {k: v[:4] for k, v in data.items()}
    got = make_session(out, unpack="never").run(None, feed)
    got_unpacked = make_session(out, unpack="always").run(None, feed)
    want = ReferenceEvaluator(q, new_ops=REFERENCE_OPS).run(None, feed)
    problems = []
    for i, (g, u, w) in enumerate(zip(got, got_unpacked, want)):
        atol = ATOL_OF_SCALE * float(np.abs(w).max())
        for what, a in (("packed kernels", g), ("unpacked at load", u)):
            if a.shape != w.shape or not np.allclose(a, w, rtol=RTOL, atol=atol):
                problems.append(f"output {i} ({what}) differs from the reference ops: max abs "
                                f"{float(np.abs(a - w).max()) if a.shape == w.shape else a.shape}")
    rep = json.loads(report.read_text())
    info = inspect_model(out)
    fp32 = sum(l["stored_bits"] for l in rep["layers"] if l["format"] == "float32")
    stored = 8 * info["totals"]["stored_bytes"] + fp32
    if abs(stored - rep["bits_per_weight"] * rep["n_weights"]) > 1e-6 * stored:
        problems.append(f"inspect reads {stored} stored bits, the report says {rep['bits_per_weight'] * rep['n_weights']}")
    if rep["bits_per_weight"] > rep["budget"] + 1e-9:
        problems.append(f"{rep['bits_per_weight']} bits per weight exceed the budget {rep['budget']}")
    if problems:
        return Outcome("crash", problems[0], details=problems)
    return Outcome("checked", outputs_checked=len(want))
