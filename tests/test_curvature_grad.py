"""Gradient curvature: the ONNX->torch interpreter against onnxruntime, the diagonal Fisher against a
numpy transcription of its definition, Hutchinson against the exact Hessian diagonal, K-FAC factors
against numpy, and the ``curvature`` CLI (its CURV.npz is accepted by compress; bad input exits 2)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx.cli import main
from bayesq_onnx.curvature.compute import compute_curvature
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.graph.model_io import load_model, prepare_model
from bayesq_onnx.runtime.session import make_session

torch = pytest.importorskip("torch")  # gradient curvature needs torch (the CI installs it)
from bayesq_onnx.curvature.fisher import Categorical, fisher_diagonal  # noqa: E402
from bayesq_onnx.curvature.hutchinson import hutchinson_diagonal  # noqa: E402
from bayesq_onnx.curvature.onnx_torch import OnnxTorch, plain_graph  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These graphs are tiny: torch's thread pool only adds synchronisation (on a busy 2-core machine
    its spinning threads made a 0.2 ms forward take 40 ms).  Correctness does not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# float32 forward passes of O(1) values through a few layers: onnxruntime and torch sum in different
# orders, so agreement is to a few float32 ulps of the largest values, not bitwise
FWD_ATOL = 2e-5


def _run_both(model: onnx.ModelProto, feeds: dict) -> tuple[list, list]:
    ref = make_session(model).run(None, feeds)
    m = prepare_model(onnx.ModelProto.FromString(model.SerializeToString()))
    interp = OnnxTorch(plain_graph(m))
    with torch.no_grad():
        got = interp.run(feeds)
    return ref, [got[o.name].numpy() for o in model.graph.output]


def _assert_same(model, feeds, atol=FWD_ATOL):
    ref, got = _run_both(model, feeds)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=atol * max(1.0, float(np.abs(r).max())))


# ----------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("build,data", [(models.mlp, models.mlp_data), (models.embed, models.embed_data),
                                        (models.cnn, models.cnn_data), (models.tied, models.tied_data)])
def test_interpreter_matches_onnxruntime_on_test_models(build, data):
    _assert_same(build(), data(n=6))


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _conv_net() -> onnx.ModelProto:
    """Depthwise and grouped convolutions with asymmetric ("SAME") padding, BatchNormalization, ReLU6
    as Clip, HardSwish, a squeeze-excitation gate, max and average pooling, a Gemm head."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"C0": w(8, 3, 3, 3), "Cd": w(8, 1, 3, 3), "Cg": w(8, 4, 1, 1), "bg": w(8, 1)[:, 0],
             "s": rng.uniform(0.5, 1.5, 8).astype(np.float32), "b": w(8, 1)[:, 0],
             "mu": w(8, 1)[:, 0], "var": rng.uniform(0.5, 2, 8).astype(np.float32),
             "Wse": w(8, 8, 1, 1), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
             "Wfc": w(5, 8), "bfc": w(5, 1)[:, 0]}
    n = helper.make_node
    nodes = [n("Conv", ["x", "C0"], ["c0"], strides=[2, 2], pads=[0, 0, 1, 1]),
             n("BatchNormalization", ["c0", "s", "b", "mu", "var"], ["bn"], epsilon=1e-3),
             n("Clip", ["bn", "lo", "hi"], ["r6"]),
             n("Conv", ["r6", "Cd"], ["cd"], group=8, auto_pad="SAME_UPPER"),
             n("HardSwish", ["cd"], ["hs"]),
             n("GlobalAveragePool", ["hs"], ["gp"]),
             n("Conv", ["gp", "Wse"], ["se"]),
             n("Sigmoid", ["se"], ["gate"]),
             n("Mul", ["hs", "gate"], ["g"]),
             n("Conv", ["g", "Cg", "bg"], ["cg"], group=2),
             n("MaxPool", ["cg"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             n("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
             n("ReduceMean", ["ap"], ["m"], axes=[2, 3], keepdims=1),
             n("Flatten", ["m"], ["f"]),
             n("Gemm", ["f", "Wfc", "bfc"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "g", [_value("x", ["n", 3, 15, 15])], [_value("logits", ["n", 5])],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_interpreter_matches_onnxruntime_on_a_conv_net():
    x = np.random.default_rng(1).standard_normal((3, 3, 15, 15)).astype(np.float32)
    _assert_same(_conv_net(), {"x": x})


class _TinyLlamaBlock(torch.nn.Module):
    """One pre-norm decoder block as Llama writes it: RMSNorm, rotary embeddings (cos/sin, rotate
    half), causal mask from a triangle, padding mask, softmax attention, SiLU-gated MLP, tied head."""

    def __init__(self, vocab=40, d=16, heads=2):
        super().__init__()
        self.heads, self.d = heads, d
        self.emb = torch.nn.Embedding(vocab, d)
        self.n1 = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.n2 = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.up = torch.nn.Linear(d, 2 * d, bias=False)
        self.gate = torch.nn.Linear(d, 2 * d, bias=False)
        self.down = torch.nn.Linear(2 * d, d, bias=False)

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, ids, mask):
        b, t = ids.shape
        hd = self.d // self.heads
        x = self.emb(ids)
        q, k, v = self.qkv(self.rms(x, self.n1)).view(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, dtype=torch.float32)[:, None] / (100.0 ** (torch.arange(hd // 2) * 2.0 / hd))
        cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)

        def rot(z):
            return z * cos + torch.cat([-z[..., hd // 2:], z[..., :hd // 2]], -1) * sin
        s = rot(q) @ rot(k).transpose(-1, -2) / hd ** 0.5
        causal = torch.triu(torch.ones(t, t), diagonal=1).bool()
        s = s.masked_fill(causal, -1e4).masked_fill(mask[:, None, None, :] == 0, -1e4)
        a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, self.d)
        x = x + self.o(a)
        h = self.rms(x, self.n2)
        x = x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return x @ self.emb.weight.T


def _llama_onnx(tmp_path):
    from bayesq_onnx.torch_export import export
    torch.manual_seed(0)
    mod = _TinyLlamaBlock().eval()
    ids, mask = torch.randint(0, 40, (2, 7)), torch.ones(2, 7, dtype=torch.int64)
    path = tmp_path / "llama.onnx"
    pmap = export(mod, (ids, mask), path, input_names=["ids", "mask"], output_names=["logits"],
                  dynamic_axes={"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}})
    return mod, path, pmap


def test_interpreter_matches_onnxruntime_on_a_llama_block(tmp_path):
    _, path, _ = _llama_onnx(tmp_path)
    rng = np.random.default_rng(2)
    mask = np.ones((3, 9), np.int64)
    mask[0, :3] = 0   # left padding
    _assert_same(onnx.load(path), {"ids": rng.integers(0, 40, (3, 9)).astype(np.int64), "mask": mask})


_R = np.random.default_rng(7)
_X = _R.standard_normal((2, 3, 5, 6)).astype(np.float32)
_I = lambda *v: np.array(v, np.int64)  # noqa: E731
# (op, attributes, inputs: arrays fed, or ("init", array) stored as initializers), one node each
_SINGLE_OPS = [
    ("Slice", {}, [_X, ("init", _I(4, -1)), ("init", _I(0, 1)), ("init", _I(3, 2)), ("init", _I(-2, -1))]),
    ("Slice", {}, [_X, ("init", _I(1)), ("init", _I(100)), ("init", _I(-1))]),
    ("Pad", {"mode": "reflect"}, [_X, ("init", _I(0, 0, 1, 2, 0, 0, 2, 1))]),
    ("Pad", {"mode": "edge"}, [_X, ("init", _I(0, 1, 1, 0, 0, 0, 2, 1))]),
    ("Pad", {}, [_X, ("init", _I(1, 2, 0, 1)), ("init", np.array(0.5, np.float32)), ("init", _I(1, -1))]),
    ("CumSum", {"exclusive": 1, "reverse": 1}, [_X, ("init", _I(2))]),
    ("Trilu", {"upper": 0}, [_X, ("init", _I(1))]),
    ("Trilu", {}, [_X]),
    ("GatherElements", {"axis": 3}, [_X, ("init", _R.integers(-6, 6, (2, 3, 5, 4)))]),
    ("Gather", {"axis": 1}, [_X, ("init", _I(-1, 0, 2))]),
    ("GatherND", {}, [_X, ("init", _I(1, 2, 0, 0, -1, 1).reshape(3, 2))]),
    ("ScatterND", {}, [_X, ("init", _I(1, 2, 0, 0).reshape(2, 2)), ("init", np.ones((2, 5, 6), np.float32))]),
    ("ScatterElements", {"axis": 2}, [_X, ("init", _I(0, 4).reshape(1, 1, 2, 1)),
                                      ("init", np.full((1, 1, 2, 1), 9, np.float32))]),
    ("Split", {"axis": 3}, [_X, ("init", _I(2, 4))]),
    ("Einsum", {"equation": "abcd,abed->abce"}, [_X, _X]),
    ("TopK", {"axis": 2, "largest": 0}, [_X, ("init", _I(2))]),
    ("ArgMax", {"axis": 1, "keepdims": 0, "select_last_index": 1}, [np.round(_X)]),
    ("ReduceMax", {"keepdims": 0}, [_X, ("init", _I(1, -1))]),
    ("ReduceL2", {"keepdims": 1}, [_X, ("init", _I(2))]),
    ("ReduceLogSumExp", {"keepdims": 0}, [_X]),
    ("ReduceProd", {"keepdims": 0}, [_X, ("init", _I(0, 3))]),
    ("Softmax", {"axis": 2}, [_X]),
    ("LogSoftmax", {}, [_X]),
    ("LayerNormalization", {"axis": -2, "epsilon": 1e-3}, [_X, ("init", _R.standard_normal((5, 6)).astype(np.float32)),
                                                             ("init", _R.standard_normal((5, 6)).astype(np.float32))]),
    ("InstanceNormalization", {}, [_X, ("init", np.ones(3, np.float32)), ("init", np.zeros(3, np.float32))]),
    ("AveragePool", {"kernel_shape": [2, 3], "pads": [1, 0, 0, 2], "count_include_pad": 1}, [_X]),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2], "ceil_mode": 1}, [_X]),
    ("MaxPool", {"kernel_shape": [2, 3], "auto_pad": "SAME_LOWER"}, [_X]),
    ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 1], "pads": [1, 0, 0, 1]}, [_X]),
    ("Conv", {"dilations": [1, 2], "strides": [2, 1], "pads": [1, 0, 2, 3]},
     [_X, ("init", _R.standard_normal((4, 3, 2, 2)).astype(np.float32))]),
    ("Range", {}, [("init", np.array(v, np.float32)) for v in (1.5, -2, -0.7)]),
    ("Expand", {}, [_X[:, :1], ("init", _I(4, 1, 3, 1, 1))]),
    ("Tile", {}, [_X, ("init", _I(1, 2, 1, 2))]),
    ("Where", {}, [_X > 0, _X, ("init", np.array(-1.0, np.float32))]),
    ("Div", {}, [("init", _I(7, -7, 6)), ("init", _I(2, 2, -4))]),
    ("Mod", {}, [("init", _I(7, -7, 6)), ("init", _I(3, 3, -4))]),
    ("Gelu", {"approximate": "tanh"}, [_X]),
    ("HardSigmoid", {"alpha": 0.3}, [_X]),
    ("Elu", {}, [_X]), ("Selu", {}, [_X]), ("LeakyRelu", {"alpha": 0.2}, [_X]), ("Softplus", {}, [_X]),
    ("PRelu", {}, [_X, ("init", np.array([[[0.1]], [[0.2]], [[0.3]]], np.float32))]),
    ("Shape", {"start": 1, "end": -1}, [_X]),
    ("ConstantOfShape", {"value": numpy_helper.from_array(np.array([3], np.int64))}, [("init", _I(2, 3))]),
    ("Squeeze", {}, [_X[:, :1], ("init", _I(1))]),
    ("IsInf", {"detect_negative": 0}, [np.array([np.inf, -np.inf, 1.0], np.float32)]),
]


@pytest.mark.parametrize("op,attrs,inputs", _SINGLE_OPS, ids=[f"{o}{i}" for i, (o, _, _) in enumerate(_SINGLE_OPS)])
def test_single_ops_match_onnxruntime(op, attrs, inputs):
    opset = 20 if op == "Gelu" else 18
    feeds, inits, names = {}, [], []
    for i, v in enumerate(inputs):
        name = f"in{i}"
        names.append(name)
        if isinstance(v, tuple):
            inits.append(numpy_helper.from_array(v[1], name))
        else:
            feeds[name] = v
    n_out = {"TopK": 2, "Split": 2}.get(op, 1)
    node = helper.make_node(op, names, [f"out{i}" for i in range(n_out)], **attrs)
    g = helper.make_graph([node], "g",
                          [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                           for k, v in feeds.items()],
                          [helper.make_empty_tensor_value_info(f"out{i}") for i in range(n_out)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    ref = make_session(m).run(None, feeds)
    interp = OnnxTorch(plain_graph(m))
    with torch.no_grad():
        got = interp.run(feeds)
    for i, r in enumerate(ref):
        out = got[f"out{i}"].numpy()
        assert out.shape == r.shape and out.dtype == r.dtype, (out.shape, r.shape, out.dtype, r.dtype)
        # one op on O(1) values: float32 rounding differences only
        np.testing.assert_allclose(out, r, rtol=1e-5, atol=1e-5)


def test_unsupported_op_is_named():
    g = helper.make_graph([helper.make_node("LRN", ["x"], ["y"], size=3)], "g", [_value("x", [1, 4, 5, 5])],
                          [_value("y", [1, 4, 5, 5])])
    with pytest.raises(BayesQError, match="unsupported op LRN"):
        OnnxTorch(plain_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])))


# ----------------------------------------------------------------------------- Fisher


def _softmax_mlp(seed=0, d=5, h=6, c=4):
    """x -> relu(x W1 + b1) W2 + b2 = logits, as ONNX, and its weights for the numpy reference."""
    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((d, h)).astype(np.float32), "b1": (0.3 * rng.standard_normal(h)).astype(np.float32),
         "W2": rng.standard_normal((h, c)).astype(np.float32), "b2": (0.3 * rng.standard_normal(c)).astype(np.float32)}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W1"], ["a"]), n("Add", ["a", "b1"], ["pre"]), n("Relu", ["pre"], ["r"]),
             n("MatMul", ["r", "W2"], ["z"]), n("Add", ["z", "b2"], ["logits"])]
    g = helper.make_graph(nodes, "g", [_value("x", ["n", d])], [_value("logits", ["n", c])],
                          [numpy_helper.from_array(a, k) for k, a in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, w


def _per_label_grads(w, x):
    """Per sample n and label y, the gradient of -log p(y | x_n) for every weight (float64, by hand):
    {name: (n, C, *shape)}, and the predictive p (n, C)."""
    W1, b1, W2, b2 = (w[k].astype(np.float64) for k in ("W1", "b1", "W2", "b2"))
    x = x.astype(np.float64)
    pre = x @ W1 + b1
    r = np.maximum(pre, 0)
    f = r @ W2 + b2
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    C = p.shape[1]
    delta = p[:, None, :] - np.eye(C)[None]                   # d nll / d logits = p - e_y: (n, y, C)
    dr = delta @ W2.T                                           # (n, y, h)
    dpre = dr * (pre[:, None, :] > 0)
    return {"W2": r[:, None, :, None] * delta[:, :, None, :], "b2": delta,
            "W1": x[:, None, :, None] * dpre[:, :, None, :], "b1": dpre}, p


def _calib(n=12, d=5, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)}


def test_fisher_exact_expectation_matches_numpy():
    m, w = _softmax_mlp()
    data = _calib()
    grads, p = _per_label_grads(w, data["x"])
    res = compute_curvature(m, data, source="fisher")
    assert res.info["fisher"]["mode"] == "exact"
    for k, g in grads.items():
        want = np.einsum("ny,ny...->...", p, g ** 2) / len(p)       # E_x sum_y p(y|x) g_y^2
        # float32 gradients of O(1) values, summed in float64: agreement to float32 precision
        np.testing.assert_allclose(res[k], want, rtol=2e-5, atol=1e-7 * want.max())


def test_fisher_given_labels_matches_numpy():
    m, w = _softmax_mlp()
    data = _calib()
    labels = np.random.default_rng(5).integers(0, 4, len(data["x"]))
    grads, _ = _per_label_grads(w, data["x"])
    res = compute_curvature(m, data, source="fisher", labels=labels)
    for k, g in grads.items():
        want = (g[np.arange(len(labels)), labels] ** 2).mean(0)  # the empirical Fisher
        np.testing.assert_allclose(res[k], want, rtol=2e-5, atol=1e-7 * want.max())


def test_fisher_sampled_labels_within_monte_carlo_error():
    m, w = _softmax_mlp()
    data = _calib()
    grads, p = _per_label_grads(w, data["x"])
    draws = 400
    res = compute_curvature(m, data, source="fisher", probes=draws, seed=3)
    assert res.info["fisher"] == {"mode": "sampled", "draws": draws}
    for k, g in grads.items():
        sq = g ** 2
        mean = np.einsum("ny,ny...->ny...", p, sq).sum(1)          # per sample E_y[g^2]
        var = np.einsum("ny,ny...->n...", p, sq ** 2) - mean ** 2  # per sample Var_y[g^2]
        se = np.sqrt(var.sum(0) / draws) / len(p)                  # standard error of the average
        # 5 standard errors: a sound estimator stays inside with probability ~1 - 6e-7 per weight
        assert np.all(np.abs(res[k] - mean.mean(0)) <= 5 * se + 1e-6 * mean.mean(0).max()), k


def test_exact_label_expectation_over_positions():
    """A sequence output: the exact expectation treats positions independently (cross terms vanish,
    each score has mean zero).  Check against enumerating every label sequence."""
    from itertools import product
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)   # f = A theta: 3 positions x 4 classes
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    f = A @ theta
    lik = Categorical()
    rows = lik.exact_cotangents(f)
    exact = sum(torch.autograd.grad(f, theta, v, retain_graph=True)[0] ** 2 for v in rows)
    p = torch.softmax(f.detach(), -1)
    brute = torch.zeros(5, dtype=torch.float64)
    for y in product(range(4), repeat=3):
        nll = lik.nll(f, np.array(y))
        prob = float(np.prod([p[t, c] for t, c in enumerate(y)]))
        brute += prob * torch.autograd.grad(nll, theta, retain_graph=True)[0] ** 2
    np.testing.assert_allclose(exact.numpy(), brute.numpy(), rtol=1e-10)   # float64: the same number


def test_gaussian_fisher_is_the_squared_jacobian():
    """Unit-variance Gaussian on y = x W: the Fisher of W[k, j] is mean_n x_nk^2, for every j."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["emb"])], "g", [_value("x", ["n", 4])],
                          [_value("emb", ["n", 3])], [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((9, 4)).astype(np.float32)
    res = compute_curvature(m, {"x": x}, source="fisher", likelihood="gaussian")
    assert res.info["fisher"]["mode"] == "exact"
    want = np.broadcast_to((x.astype(np.float64) ** 2).mean(0)[:, None], W.shape)
    np.testing.assert_allclose(res["W"], want, rtol=1e-5)   # float32 file


def test_fisher_through_a_fixed_batch_graph():
    """A graph that insists on batches of 4: per-sample gradients from one batch forward."""
    m, w = _softmax_mlp()
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 4
    data = _calib(n=8)
    grads, p = _per_label_grads(w, data["x"])
    res = compute_curvature(m, data, source="fisher")
    want = np.einsum("ny,ny...->...", p, grads["W1"] ** 2) / len(p)
    np.testing.assert_allclose(res["W1"], want, rtol=2e-5, atol=1e-7 * want.max())   # as above


def test_kfac_factors_match_numpy(tmp_path):
    m, w = _softmax_mlp()
    data = _calib()
    labels = np.random.default_rng(5).integers(0, 4, len(data["x"]))
    grads, p = _per_label_grads(w, data["x"])
    res = compute_curvature(m, data, source="fisher", labels=labels, kfac_path=tmp_path / "k.npz")
    with np.load(tmp_path / "k.npz") as z:
        k = dict(z)
    assert set(k) == {"A/W1", "G/W1", "A/W2", "G/W2"}
    x = data["x"].astype(np.float64)
    r = np.maximum(x @ w["W1"] + w["b1"], 0)
    n = len(x)
    delta = grads["b2"][np.arange(n), labels]          # d loss / d logits = d loss / d (r W2)
    dpre = grads["b1"][np.arange(n), labels]           # d loss / d (x W1)
    # float64 sums of float32 products: agreement to float32 precision
    np.testing.assert_allclose(k["A/W1"], x.T @ x / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k["A/W2"], r.T @ r / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k["G/W2"], delta.T @ delta / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k["G/W1"], dpre.T @ dpre / n, rtol=1e-5, atol=1e-7)
    assert res["W2"].shape == w["W2"].shape


# ----------------------------------------------------------------------------- Hutchinson


def _tiny_net():
    g = torch.Generator().manual_seed(0)
    params = {"W1": torch.randn(3, 4, generator=g), "b1": 0.3 * torch.randn(4, generator=g),
              "W2": torch.randn(4, 3, generator=g)}

    def forward(p, batch):
        x = torch.as_tensor(batch["x"])
        return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]
    x = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 3, 10)
    return params, forward, {"x": x}, labels


def _full_hessian(params, forward, data, labels):
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].reshape(-1) for k in names]).double()

    def loss(flat):
        p = {k: t.reshape(s) for k, t, s in zip(names, torch.split(flat, sizes), shapes)}
        f = forward(p, {"x": data["x"].astype(np.float64)})
        return torch.nn.functional.cross_entropy(f, torch.as_tensor(labels), reduction="mean")
    return torch.autograd.functional.hessian(loss, flat0).numpy(), names, sizes


def test_hutchinson_matches_hessian_diagonal():
    params, forward, data, labels = _tiny_net()
    H, names, sizes = _full_hessian(params, forward, data, labels)
    probes = 1000
    res = hutchinson_diagonal(forward, params, data, Categorical(), labels=labels, probes=probes, seed=0,
                              batch_size=10)
    est = np.concatenate([res.diagonal[k].reshape(-1) for k in names])
    diag = np.diag(H)
    # Var(z_i (Hz)_i) = sum_{j != i} H_ij^2 for Rademacher z: the estimator's exact standard error
    se = np.sqrt(((H ** 2).sum(1) - diag ** 2) / probes)
    # 5 standard errors (CLT): inside with probability ~1 - 6e-7 per entry; the 1e-6 covers float32 HVPs
    assert np.all(np.abs(est - diag) <= 5 * se + 1e-6), np.abs(est - diag) / se
    # the reported spread is that standard error relative to the true diagonal, estimated from the
    # probes (its own relative error is about 1/sqrt(2 * probes) ~ 2%, more with the kurtosis of
    # z_i (Hz)_i, and the signal's norm is estimated too: 20% is a loose bound)
    off = 0
    for k, s in zip(names, sizes):
        want = np.linalg.norm(se[off:off + s]) / np.linalg.norm(diag[off:off + s])
        assert abs(res.rel_stderr[k] / want - 1) < 0.2, (k, res.rel_stderr[k], want)
        off += s


def test_nonnegative_keeps_the_total():
    from bayesq_onnx.curvature.hutchinson import nonnegative
    d = np.array([[3.0, -1.0], [0.5, -0.5]])
    out, neg = nonnegative(d)
    assert neg == 2 and (out >= 0).all()
    np.testing.assert_allclose(out, [[3.0 * 2 / 3.5, 0], [0.5 * 2 / 3.5, 0]])   # total 2 kept
    assert not nonnegative(np.array([1.0, -2.0]))[0].any()                        # total < 0: none


def test_hutchinson_of_the_kl_estimates_the_fisher():
    """Without labels Hutchinson probes the KL from the model's own predictive, whose Hessian at the
    trained weights is the Fisher: compare with the exact diagonal Fisher (numpy)."""
    from bayesq_onnx.curvature.hutchinson import nonnegative
    m, w = _softmax_mlp(d=3, h=4, c=3)
    data = _calib(n=10, d=3)
    grads, p = _per_label_grads(w, data["x"])
    names = ["W1", "b1", "W2", "b2"]
    flat = np.concatenate([grads[k].reshape(len(p), p.shape[1], -1) for k in names], axis=2)   # (n, y, P)
    F = np.einsum("ny,nyi,nyj->ij", p, flat, flat) / len(p)                                   # full Fisher
    probes = 1000
    interp = OnnxTorch(plain_graph(prepare_model(m)))
    raw = hutchinson_diagonal(lambda prm, b: interp.run(b, prm)["logits"], interp.params, data, Categorical(),
                              probes=probes, seed=0, batch_size=10)
    est = np.concatenate([raw.diagonal[k].reshape(-1) for k in names])
    se = np.sqrt(((F ** 2).sum(1) - np.diag(F) ** 2) / probes)
    assert np.all(np.abs(est - np.diag(F)) <= 5 * se + 1e-6)   # 5 standard errors, as above
    # the CLI's route: the same probes (same seed), made non-negative without changing the totals
    res = compute_curvature(m, data, source="hutchinson", probes=probes, batch_size=10)
    for k in names:
        np.testing.assert_allclose(res[k], nonnegative(raw.diagonal[k])[0], rtol=1e-6)   # float32 file
    assert res.info["hutchinson"]["probes"] == probes


# ----------------------------------------------------------------------------- activation source


def test_activation_source_is_the_per_row_input_energy():
    m = models.mlp()
    data = models.mlp_data(n=16)
    res = compute_curvature(m, data, source="activation")
    x = data["x"].astype(np.float64)
    # W0 is read by a Gemm as (in, out): every weight of input row k gets 2 mean(x_k^2)
    want = np.broadcast_to((2 * (x ** 2).mean(0))[:, None], res["W0"].shape)
    np.testing.assert_allclose(res["W0"], want, rtol=1e-5)   # float32 file of float64 sums
    assert "b0" not in res and res.info["sites"] == len(res)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    onnx.save(models.mlp(), d / "mlp.onnx")
    np.savez(d / "calib.npz", **models.mlp_data(n=24))
    return d


@pytest.mark.parametrize("source", ["fisher", "hutchinson", "activation"])
def test_cli_writes_curvature_that_compress_accepts(files, tmp_path, capsys, source):
    from bayesq_onnx.api import compress
    out = tmp_path / "out" / "curv.npz"
    argv = ["curvature", str(files / "mlp.onnx"), "--calib", str(files / "calib.npz"), "--source", source,
            "-o", str(out), "--quiet"] + (["--probes", "4", "--threads", "1"] if source != "activation" else [])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    if source == "hutchinson":
        assert "relative standard error" in printed and "clipped to 0" in printed
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first        # same inputs and seed, same bytes
    assert sorted(p.name for p in out.parent.iterdir()) == ["curv.npz"]   # no temp files left
    with np.load(out) as z:
        assert all(np.isfinite(z[k]).all() and (z[k] >= 0).all() for k in z.files)
    res = compress(str(files / "mlp.onnx"), bits=4.5, blocks=(64,), calib=str(files / "calib.npz"), curvature=str(out))
    assert res.report["curvature"] == "file"


def _expect_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bayesq-onnx: error:") and needle in err[0], err


def test_cli_bad_input_exits_2_with_one_line(files, tmp_path, capsys):
    base = ["curvature", str(files / "mlp.onnx"), "--calib", str(files / "calib.npz"), "-o", str(tmp_path / "c.npz")]
    _expect_exit_2(capsys, base + ["--output", "nope"], "no output or tensor 'nope'")
    np.save(files / "short.npy", np.zeros(5, np.int64))
    _expect_exit_2(capsys, base + ["--labels", str(files / "short.npy")], "5 entries for 24 calibration samples")
    np.save(files / "big.npy", np.full(24, 99, np.int64))
    _expect_exit_2(capsys, base + ["--labels", str(files / "big.npy")], "out of range for 32 classes")
    _expect_exit_2(capsys, base + ["--source", "magic"], "unknown curvature source 'magic'")
    _expect_exit_2(capsys, base + ["--likelihood", "poisson"], "unknown likelihood 'poisson'")
    _expect_exit_2(capsys, base + ["--source", "hutchinson", "--kfac", str(tmp_path / "k.npz")], "K-FAC")
    _expect_exit_2(capsys, base + ["--source", "activation", "--probes", "3"], "forward-only")
    _expect_exit_2(capsys, base + ["--probes", "0"], "--probes must be >= 1")
    _expect_exit_2(capsys, base + ["--threads", "0"], "--threads must be >= 1")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("LRN", ["h"], ["y"], size=3)]
    g = helper.make_graph(nodes, "g", [_value("x", ["n", 4, 2, 2])], [_value("y", ["n", 4, 2, 3])],
                          [numpy_helper.from_array(np.ones((2, 3), np.float32), "W")])
    bad = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(bad, files / "lrn.onnx")
    np.savez(files / "x.npz", x=np.ones((2, 4, 2, 2), np.float32))
    _expect_exit_2(capsys, ["curvature", str(files / "lrn.onnx"), "--calib", str(files / "x.npz"),
                            "-o", str(tmp_path / "c.npz")], "unsupported op LRN")
    assert not (tmp_path / "c.npz").exists()


def test_onnx_route_equals_the_torch_route_through_the_map(tmp_path):
    """The same Fisher computed on the torch module (then mapped onto initializers) and on the exported
    graph: the map and the interpreter agree."""
    from bayesq_onnx.torch_export import export, map_curvature, module_forward
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).eval()
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    pmap = export(mod, (torch.from_numpy(x[:2]),), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                  dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    params = {k: v.detach() for k, v in mod.named_parameters()}
    torch_side = fisher_diagonal(module_forward(mod, ["x"]), params, {"x": x}, Categorical())
    mapped = map_curvature(torch_side, pmap)
    onnx_side = compute_curvature(str(tmp_path / "m.onnx"), {"x": x}, source="fisher")
    model = load_model(tmp_path / "m.onnx")
    weights = {t.name for t in model.graph.initializer}
    assert set(mapped) <= weights and set(mapped) == set(onnx_side)
    for k in mapped:
        # the same float32 maths in a different association order
        np.testing.assert_allclose(mapped[k], onnx_side[k], rtol=1e-5, atol=1e-7 * float(onnx_side[k].max()))


def test_llama_block_gradients_agree_between_routes(tmp_path):
    """Gradients through attention, rotary embeddings, RMSNorm and the masks: the empirical Fisher on
    the torch module (mapped onto initializers) equals the one on its ONNX export, for every
    parameter stored once (the tied table is stored twice: its per-use split is not known in torch)."""
    from bayesq_onnx.torch_export import map_curvature, module_forward
    mod, path, pmap = _llama_onnx(tmp_path)
    rng = np.random.default_rng(4)
    data = {"ids": rng.integers(0, 40, (4, 6)).astype(np.int64), "mask": np.ones((4, 6), np.int64)}
    data["mask"][1, :2] = 0
    labels = rng.integers(0, 40, (4, 6))
    labels[1, :2] = -1   # padding: ignored
    params = {k: v.detach() for k, v in mod.named_parameters()}
    torch_side = fisher_diagonal(module_forward(mod, ["ids", "mask"]), params, data, Categorical(), labels=labels)
    once = {k: v for k, v in torch_side.items() if len(pmap[k].uses) == 1}
    mapped = map_curvature(once, pmap)
    onnx_side = compute_curvature(str(path), data, source="fisher", labels=labels)
    assert len(mapped) >= 7
    for k, v in mapped.items():
        # float32 maths in another order (measured: within 3e-7 of the largest entry); 1e-5 leaves room
        np.testing.assert_allclose(onnx_side[k], v, rtol=1e-4, atol=1e-5 * float(v.max()))
