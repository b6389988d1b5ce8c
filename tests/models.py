"""Small models built in the tests (no files): each exercises a different kind of weight site."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # what torch exports commonly use; lowering must raise it only when a format needs it


def _w(rng, *shape, scale=None):
    fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * (scale or 1 / np.sqrt(fan_in))).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=OPSET):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def mlp(seed=0, d=64, h=128) -> onnx.ModelProto:
    """Gemm with bias, a weight shared by two MatMuls, a weight behind a Transpose, a Constant-node
    weight, and a small weight below min_elements (skipped)."""
    rng = np.random.default_rng(seed)
    inits = {"W0": _w(rng, d, h), "b0": _w(rng, h, scale=0.1), "W1": _w(rng, h, h),
             "W2T": _w(rng, d, h), "small": _w(rng, d, 8)}
    const = helper.make_node("Constant", [], ["W3"], value=numpy_helper.from_array(_w(rng, d, 32), "W3"))
    nodes = [
        const,
        helper.make_node("Gemm", ["x", "W0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "W1"], ["a1"]),
        helper.make_node("Tanh", ["a1"], ["t1"]),
        helper.make_node("MatMul", ["t1", "W1"], ["a1b"]),        # W1 shared
        helper.make_node("Add", ["a1", "a1b"], ["s1"]),
        helper.make_node("Transpose", ["W2T"], ["W2"], perm=[1, 0]),
        helper.make_node("MatMul", ["s1", "W2"], ["a2"]),          # weight behind a Transpose
        helper.make_node("MatMul", ["a2", "W3"], ["logits"]),
        helper.make_node("MatMul", ["a2", "small"], ["aux"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 32]),
                   helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["n", 8])], inits)


def mlp_data(n=64, d=64, seed=1) -> dict[str, np.ndarray]:
    """Correlated inputs (a low-rank mix plus noise), where error feedback has something to use.
    The mix is fixed, so every ``seed`` draws from the same distribution (held-out data)."""
    mix = np.random.default_rng(12345).standard_normal((8, d))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ mix + 0.1 * rng.standard_normal((n, d))
    return {"x": x.astype(np.float32)}


def embed(seed=0, vocab=500, d=64, seq=12) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"E": _w(rng, vocab, d, scale=0.5), "W": _w(rng, d, d), "Wout": _w(rng, d, 32),
             "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0),
             helper.make_node("MatMul", ["e", "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMean", ["r", "axes"], ["p"], keepdims=0),
             helper.make_node("MatMul", ["p", "Wout"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", seq])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 32])], inits, opset=18)


def embed_data(n=48, vocab=500, seq=12, seed=1):
    return {"ids": np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int64)}


def cnn(seed=0) -> onnx.ModelProto:
    """Two convolutions (3x3 and 1x1) and a Gemm head with transB=1 (too small: skipped)."""
    rng = np.random.default_rng(seed)
    inits = {"C1": _w(rng, 32, 64, 3, 3), "C2": _w(rng, 32, 32, 1, 1), "Wfc": _w(rng, 10, 32)}
    nodes = [helper.make_node("Conv", ["x", "C1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "C2"], ["c2"]),
             helper.make_node("GlobalAveragePool", ["c2"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["f"]),
             helper.make_node("Gemm", ["f", "Wfc"], ["logits"], transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)


def cnn_data(n=32, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 64, 8, 8)).astype(np.float32)}


def tied(seed=0, vocab=300, d=64, seq=8) -> onnx.ModelProto:
    """A language-model shape: the embedding table is also the output head (through a Transpose)."""
    rng = np.random.default_rng(seed)
    inits = {"E": _w(rng, vocab, d, scale=0.5), "W": _w(rng, d, d)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0),
             helper.make_node("MatMul", ["e", "W"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]),
             helper.make_node("MatMul", ["t", "ET"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", seq])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", seq, vocab])], inits)


def tied_data(n=48, vocab=300, seq=8, seed=1):
    return {"ids": np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int64)}


def residual(seed=0, d=64, h=128, blocks=3) -> onnx.ModelProto:
    """A residual stream through ``blocks`` MLP blocks (``x + relu(norm(x) W_up) W_down``), with a
    scale read from the stream's Shape (a value no weight changes) and a Transpose-fed head."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = {"one": np.ones(1, np.float32)}, [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "last"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["widthf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["one", "widthf"], ["inv_width"]),
    ], "x"
    inits["last"] = np.array(-1, np.int64)
    for b in range(blocks):
        inits[f"up{b}"], inits[f"down{b}"] = _w(rng, d, h), _w(rng, h, d)
        nodes += [helper.make_node("Shape", [x], [f"shp{b}"]),            # shape of the stream: no value flows
                  helper.make_node("ReduceSumSquare", [x], [f"ss{b}"], axes=[1], keepdims=1),
                  helper.make_node("Mul", [f"ss{b}", "inv_width"], [f"ms{b}"]),
                  helper.make_node("Add", [f"ms{b}", "one"], [f"ms1{b}"]),
                  helper.make_node("Sqrt", [f"ms1{b}"], [f"rms{b}"]),
                  helper.make_node("Div", [x, f"rms{b}"], [f"n{b}"]),
                  helper.make_node("MatMul", [f"n{b}", f"up{b}"], [f"u{b}"]),
                  helper.make_node("Relu", [f"u{b}"], [f"r{b}"]),
                  helper.make_node("MatMul", [f"r{b}", f"down{b}"], [f"dn{b}"]),
                  helper.make_node("Reshape", [f"dn{b}", f"shp{b}"], [f"dr{b}"]),
                  helper.make_node("Add", [x, f"dr{b}"], [f"h{b}"])]
        x = f"h{b}"
    inits["headT"] = _w(rng, 16, d)
    nodes += [helper.make_node("Transpose", ["headT"], ["head"], perm=[1, 0]),
              helper.make_node("MatMul", [x, "head"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 16])], inits)


def residual_data(n=48, d=64, seed=1) -> dict[str, np.ndarray]:
    return mlp_data(n, d, seed)


def branches(seed=0, d=64, h=96) -> onnx.ModelProto:
    """An If whose condition is computed per batch (the mean of x > 0): the then branch reads W1
    (MatMul) and E (an embedding Gather on the ids), the else branch reads W2 (Gemm, transB) --
    all main-graph initializers read from the outer scope, on main-graph inputs -- then a main-graph
    MatMul on the If's output."""
    rng = np.random.default_rng(seed)
    out = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["m1"]),
                              helper.make_node("Gather", ["E", "ids"], ["e1"]),
                              helper.make_node("Add", ["m1", "e1"], ["y1"])], "then", [], [out("y1")])
    other = helper.make_graph([helper.make_node("Gemm", ["x", "W2"], ["y2"], transB=1)], "else", [], [out("y2")])
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Greater", ["mean", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["hid"], then_branch=then, else_branch=other),
             helper.make_node("Relu", ["hid"], ["r"]),
             helper.make_node("MatMul", ["r", "W3"], ["y"])]
    inits = {"W1": _w(rng, d, h), "W2": _w(rng, h, d), "E": _w(rng, 40, h, scale=0.5), "W3": _w(rng, h, 32),
             "zero": np.array(0.0, np.float32)}
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]),
                          helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], inits)


def branches_data(n=64, d=64, seed=1):
    rng = np.random.default_rng(seed)
    # a shifted mean per sample, so that batches go both ways
    x = rng.standard_normal((n, d)).astype(np.float32) + rng.choice([-0.3, 0.3], (n, 1)).astype(np.float32)
    return {"x": x, "ids": rng.integers(0, 40, n).astype(np.int64)}


def loop(seed=0, d=64, steps=3) -> onnx.ModelProto:
    """A Loop of ``steps`` iterations, ``h = tanh(h @ W)``: W is a main-graph initializer read by the
    body, on a loop-carried tensor computed inside it (calibration cannot see it); then a main-graph
    MatMul."""
    rng = np.random.default_rng(seed)
    vi = lambda n, t=TensorProto.FLOAT, s=None: helper.make_tensor_value_info(n, t, s)
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("MatMul", ["h_in", "W"], ["hw"]),
                              helper.make_node("Tanh", ["hw"], ["h_out"])], "body",
                             [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []), vi("h_in")],
                             [vi("c_out", TensorProto.BOOL, []), vi("h_out")])
    nodes = [helper.make_node("Loop", ["steps", "", "x"], ["h"], body=body),
             helper.make_node("MatMul", ["h", "W3"], ["y"])]
    inits = {"W": _w(rng, d, d, scale=1.5 / np.sqrt(d)), "W3": _w(rng, d, 32), "steps": np.array(steps, np.int64)}
    return _model(nodes, [vi("x", TensorProto.FLOAT, ["n", d])], [vi("y", TensorProto.FLOAT, ["n", 32])], inits)


def loop_data(n=64, d=64, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)}
