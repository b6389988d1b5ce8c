"""validate.compare metrics on hand-computed cases; the MiniLM asset (split, files, smoke export)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from bayesq_onnx.errors import BayesQError
from bayesq_onnx.validate.compare import compare_models, compare_outputs, is_logits_like
from bayesq_onnx.assets import cache, minilm


# ----------------------------------------------------------------------------- compare_outputs


def _rng_logits(n=6, k=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)


def test_identical_outputs():
    x = _rng_logits()
    emb = np.random.default_rng(1).normal(size=(6, 4, 3)).astype(np.float32)
    res = compare_outputs({"logits": x, "emb": emb}, {"logits": x.copy(), "emb": emb.copy()},
                          labels=np.argmax(x, axis=1))
    assert res["n_samples"] == 6
    lo, em = res["outputs"]["logits"], res["outputs"]["emb"]
    assert lo["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert lo["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert lo["kl"] == pytest.approx(0.0, abs=1e-12)
    assert lo["top1_agreement"] == 1.0
    assert lo["accuracy_ref"] == lo["accuracy_quant"] == 1.0
    assert lo["max_abs_error"] == lo["mean_abs_error"] == 0.0
    assert em["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert em["shape"] == [4, 3] and em["dtype"] == "float32"
    assert "kl" not in em and "top1_agreement" not in em
    json.dumps(res, allow_nan=False)


def test_known_perturbation_cosine_and_errors():
    ref = {"emb": np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)}
    quant = {"emb": np.array([[4.0, 3.0], [0.0, 1.0]], dtype=np.float32)}
    m = compare_outputs(ref, quant)["outputs"]["emb"]
    assert m["cosine"] == pytest.approx((24 / 25 + 0.0) / 2)
    assert m["cosine_min"] == pytest.approx(0.0)
    assert m["max_abs_error"] == pytest.approx(1.0)
    assert m["mean_abs_error"] == pytest.approx(1.0)
    assert m["ref_max_abs"] == pytest.approx(4.0)


def test_cosine_is_per_flattened_sample():
    # sample 0: identical 2x2 block; sample 1: negated -> cosine -1; mean 0
    a = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2)
    b = a.copy()
    b[1] *= -1
    m = compare_outputs({"y": a}, {"y": b})["outputs"]["y"]
    assert m["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert m["cosine_min"] == pytest.approx(-1.0)


def test_zero_vectors_cosine():
    z = np.zeros((2, 3), np.float32)
    q = np.array([[0, 0, 0], [1, 0, 0]], np.float32)
    m = compare_outputs({"y": z}, {"y": q})["outputs"]["y"]
    assert m["cosine"] == pytest.approx(0.5)      # both zero -> 1, one zero -> 0


def test_known_perturbation_kl_agreement_accuracy():
    ln3 = math.log(3.0)
    ref = np.array([[ln3, 0.0], [2.0, 1.0]], dtype=np.float64)      # p0 = [.75, .25]
    quant = np.array([[0.0, ln3], [2.0, 1.0]], dtype=np.float64)    # q0 = [.25, .75]
    labels = np.array([0, 1])
    m = compare_outputs({"logits": ref}, {"logits": quant}, labels=labels)["outputs"]["logits"]
    # KL(p0||q0) = .75 ln 3 + .25 ln(1/3) = .5 ln 3; sample 1 identical -> 0
    assert m["kl"] == pytest.approx(0.25 * ln3, rel=1e-12)
    assert m["kl_max"] == pytest.approx(0.5 * ln3, rel=1e-12)
    assert m["top1_agreement"] == 0.5
    assert m["accuracy_ref"] == 0.5        # argmax ref = [0, 0]
    assert m["accuracy_quant"] == 0.0      # argmax quant = [1, 0]
    assert m["n_labelled"] == 2


def test_kl_shift_invariant_and_positions_over_leading_axes():
    x = np.random.default_rng(2).normal(size=(3, 4, 7))
    m = compare_outputs({"logits": x}, {"logits": x + 5.0})["outputs"]["logits"]
    assert m["kl"] == pytest.approx(0.0, abs=1e-12)
    assert m["top1_agreement"] == 1.0
    # token-level labels with ignore index
    labels = np.argmax(x, axis=-1)
    labels[0, :2] = -100
    m = compare_outputs({"logits": x}, {"logits": x}, labels=labels)["outputs"]["logits"]
    assert m["n_labelled"] == 10 and m["accuracy_ref"] == 1.0


def test_kl_matches_direct_formula():
    rng = np.random.default_rng(3)
    r, q = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    p = np.exp(r) / np.exp(r).sum(1, keepdims=True)
    s = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    want = np.mean(np.sum(p * np.log(p / s), axis=1))
    got = compare_outputs({"logits": r}, {"logits": q})["outputs"]["logits"]["kl"]
    assert got == pytest.approx(want, rel=1e-10)


def test_logits_selection():
    f = np.dtype(np.float32)
    assert is_logits_like("logits", (4, 10), f, None)
    assert is_logits_like("output_logits", (4, 8, 10), f, None)
    assert not is_logits_like("logits", (4,), f, None)           # no class axis
    assert not is_logits_like("logits", (4, 1), f, None)         # one class
    assert not is_logits_like("logits", (4, 10), np.dtype(np.int64), None)
    assert not is_logits_like("embedding", (4, 384), f, None)
    assert is_logits_like("scores", (4, 10), f, {"scores"})
    assert not is_logits_like("logits", (4, 10), f, {"scores"})
    with pytest.raises(BayesQError):
        is_logits_like("scores", (4,), f, {"scores"})
    x = _rng_logits()
    m = compare_outputs({"scores": x}, {"scores": x}, logits={"scores"})["outputs"]["scores"]
    assert m["logits"] is True and m["kl"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(BayesQError, match="nope"):
        compare_outputs({"scores": x}, {"scores": x}, logits={"nope"})


def test_errors_and_nonfinite():
    x = _rng_logits()
    with pytest.raises(BayesQError, match="lacks"):
        compare_outputs({"logits": x}, {"other": x})
    with pytest.raises(BayesQError, match="shape"):
        compare_outputs({"logits": x}, {"logits": x[:, :3]})
    with pytest.raises(BayesQError, match="labels"):
        compare_outputs({"logits": x}, {"logits": x}, labels=np.zeros(5, int))
    q = x.copy()
    q[0, 0] = np.nan
    m = compare_outputs({"logits": x}, {"logits": q})["outputs"]["logits"]
    assert m["nonfinite_quant"] == 1 and m["nonfinite_ref"] == 0
    assert m["max_abs_error"] is None and m["cosine"] is None and m["kl"] is None
    json.dumps(m, allow_nan=False)


def test_integer_outputs_exact_match():
    m = compare_outputs({"ids": np.array([1, 2, 3, 4])}, {"ids": np.array([1, 2, 0, 4])})
    m = m["outputs"]["ids"]
    assert m["exact_match"] == 0.75 and m["max_abs_error"] == 3.0 and "cosine" not in m


# ----------------------------------------------------------------------------- compare_models


def _matmul_model(path: Path, w: np.ndarray, batch: int | str = "N", out: str = "logits"):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], [out]),
         helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, w.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, w.shape[1]]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [batch])],
        [numpy_helper.from_array(w.astype(np.float32), "W"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_compare_models_streams_like_compare_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 5)).astype(np.float32)
    wq = w + rng.normal(scale=0.1, size=w.shape).astype(np.float32)
    ref = _matmul_model(tmp_path / "ref.onnx", w)
    quant = _matmul_model(tmp_path / "quant.onnx", wq)
    x = rng.normal(size=(11, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=11)
    got = compare_models(ref, quant, {"x": x, "unused": np.zeros(3)}, labels=labels,
                         batch_size=4)
    want = compare_outputs({"logits": x @ w, "total": x.sum(1)},
                           {"logits": x @ wq, "total": x.sum(1)}, labels=labels)
    assert got["n_samples"] == 11 and got["batch_size"] == 4
    assert got["ref_model"] == str(ref) and got["quant_seconds"] >= 0
    for name in ("logits", "total"):
        for k, v in want["outputs"][name].items():
            if isinstance(v, float):
                assert got["outputs"][name][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (name, k)
            else:
                assert got["outputs"][name][k] == v, (name, k)
    assert 0 < got["outputs"]["logits"]["kl"] and got["outputs"]["logits"]["cosine"] < 1
    json.dumps(got, allow_nan=False)


def test_compare_models_fixed_batch_and_bad_data(tmp_path):
    pytest.importorskip("onnxruntime")
    w = np.eye(4, 3, dtype=np.float32)
    ref = _matmul_model(tmp_path / "ref.onnx", w, batch=2)
    x = np.ones((6, 4), np.float32)
    res = compare_models(ref, ref, {"x": x}, batch_size=16)
    assert res["batch_size"] == 2 and res["outputs"]["logits"]["cosine"] == pytest.approx(1.0)
    with pytest.raises(BayesQError, match="fixed batch"):
        compare_models(ref, ref, {"x": x[:5]})
    with pytest.raises(BayesQError, match="lack model input"):
        compare_models(ref, ref, {"y": x})
    other = _matmul_model(tmp_path / "other.onnx", w, batch=2, out="y")
    with pytest.raises(BayesQError, match="lacks output"):
        compare_models(ref, other, {"x": x})


def test_compare_models_custom_session_factory():
    class FakeInfo:
        def __init__(self, name, shape=("N",)):
            self.name, self.shape = name, list(shape)

    class FakeSession:
        def __init__(self, scale):
            self.scale, self.calls = scale, 0

        def get_inputs(self):
            return [FakeInfo("x")]

        def get_outputs(self):
            return [FakeInfo("logits")]

        def run(self, names, feed):
            self.calls += 1
            return [feed["x"] * self.scale]

    sessions = {"a": FakeSession(1.0), "b": FakeSession(2.0)}
    x = np.random.default_rng(5).normal(size=(7, 3))
    res = compare_models("a", "b", {"x": x}, session_factory=sessions.__getitem__, batch_size=3)
    assert sessions["a"].calls == 3 and sessions["b"].calls == 3
    m = res["outputs"]["logits"]
    assert m["cosine"] == pytest.approx(1.0) and m["top1_agreement"] == 1.0
    assert m["max_abs_error"] == pytest.approx(np.abs(x).max())


# ----------------------------------------------------------------------------- MiniLM asset


def test_parse_fortunes():
    text = "first\n  line\n%\n\n%\nsecond\tone\n%\n-- x\n"
    assert minilm.parse_fortunes(text) == ["first line", "second one", "-- x"]


def _fake_fortunes(d: Path, n_per_class=40) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for c in minilm.CLASSES:
        items = [f"{c} saying number {i}\n  -- someone" for i in range(n_per_class)]
        items += ["shared by every class", f"{c} saying number 0\n  -- someone"]  # dup + cross-class
        (d / c).write_text("\n%\n".join(items) + "\n%\n")
    return d


def test_split_disjoint_balanced_and_stable(tmp_path):
    per_class = minilm.load_fortunes(_fake_fortunes(tmp_path / "f"), minilm.CLASSES)
    assert all(len(v) == 40 for v in per_class.values())
    assert not any("shared by every class" in t for v in per_class.values() for t in v)
    big = minilm.split_fortunes(per_class, n_calib=50, n_eval=200)
    small = minilm.split_fortunes(per_class, n_calib=10, n_eval=20)
    assert not set(big.calib_texts) & set(big.eval_texts)
    assert not set(small.calib_texts) & set(big.eval_texts)     # split ignores the sizes
    assert small.eval_texts == big.eval_texts[:20]               # prefixes of one order
    assert small.calib_texts == big.calib_texts[:10]
    counts = np.bincount(big.eval_labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 200
    for t, lab in zip(big.eval_texts, big.eval_labels):
        assert t.startswith(minilm.CLASSES[lab])
    assert minilm.split_fortunes(per_class, 50, 200) == big
    with pytest.raises(BayesQError, match="only"):
        minilm.split_fortunes(per_class, n_calib=10, n_eval=10_000)


def test_missing_fortunes_message(tmp_path):
    with pytest.raises(BayesQError, match="apt-get install -y fortunes"):
        minilm.load_fortunes(tmp_path)


def test_missing_torch_message(tmp_path, monkeypatch):
    pytest.importorskip(minilm.MODEL_MODULE)
    monkeypatch.setitem(sys.modules, "torch", None)      # import torch -> ImportError
    with pytest.raises(BayesQError, match=r"torch==2\.13\.0"):
        minilm.prepare_minilm(tmp_path / "cache", n_calib=2, n_eval=2, seq_len=16,
                              fortune_dir=_fake_fortunes(tmp_path / "f"))
    assert not any((tmp_path / "cache").glob("*"))       # nothing half-made left behind


def test_write_npz_reproducible(tmp_path):
    arrays = {"input_ids": np.arange(12, dtype=np.int64).reshape(3, 4),
              "attention_mask": np.ones((3, 4), np.int64)}
    cache.write_npz(tmp_path / "a.npz", arrays)
    cache.write_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = cache.load_npz(tmp_path / "a.npz")
    assert list(back) == ["input_ids", "attention_mask"]
    np.testing.assert_array_equal(back["input_ids"], arrays["input_ids"])


def test_prepare_minilm_smoke(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip(minilm.MODEL_MODULE)
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    if not (minilm.FORTUNE_DIR / minilm.CLASSES[0]).is_file():
        pytest.skip("Debian package 'fortunes' not installed")
    msgs: list[str] = []
    a = minilm.prepare_minilm(tmp_path, n_calib=4, n_eval=10, seq_len=16, progress=msgs.append)
    for p in (a.model, a.calib, a.eval_data, a.labels, a.manifest, a.texts):
        assert p.is_file() and p.parent == a.directory
    onnx.checker.check_model(str(a.model))
    calib, ev = cache.load_npz(a.calib), cache.load_npz(a.eval_data)
    labels = np.load(a.labels)
    assert set(calib) == set(ev) == set(minilm.INPUT_NAMES)
    assert calib["input_ids"].shape == (4, 16) and ev["attention_mask"].shape == (10, 16)
    assert all(v.dtype == np.int64 for v in (*calib.values(), *ev.values()))
    assert labels.shape == (10,) and labels.dtype == np.int64
    assert sorted(labels.tolist()) == list(range(10))            # one eval text per class
    texts = json.loads(a.texts.read_text())
    assert not set(texts["calib"]) & set(texts["eval"])

    sess = ort.InferenceSession(str(a.model), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(minilm.INPUT_NAMES)
    (emb,) = sess.run(["embedding"], ev)
    assert emb.shape == (10, 384)

    # independent reference: sentence-transformers (mean pooling + L2 normalize) on the same text
    st = pytest.importorskip("sentence_transformers")
    g = pytest.importorskip(minilm.MODEL_MODULE)
    model = st.SentenceTransformer(str(g.get_model_path()), device="cpu")
    model.max_seq_length = 16
    with torch.no_grad():
        want = model.encode(texts["eval"], convert_to_numpy=True, normalize_embeddings=True)
    got = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=2e-5)

    # cached: same directory, nothing rewritten
    stamp = a.model.stat().st_mtime_ns
    msgs.clear()
    b = minilm.prepare_minilm(tmp_path, n_calib=4, n_eval=10, seq_len=16, progress=msgs.append)
    assert b == a and a.model.stat().st_mtime_ns == stamp and "cached" in msgs[0]
    # the cache key follows the parameters
    files = [minilm.FORTUNE_DIR / c for c in minilm.CLASSES]
    params = json.loads(a.manifest.read_text())["params"]
    assert cache.cache_key(params, *files) == a.directory.name.split("-", 1)[1]
    assert cache.cache_key({**params, "n_calib": 5}, *files) != cache.cache_key(params, *files)
