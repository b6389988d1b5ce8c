"""Fashion-MNIST asset: IDX reader on hand-written files, preprocessing and accuracy against numpy,
one-line errors that leave the cache empty, and a cheap end-to-end build (3 training steps)."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.assets import cache
from bayesq_onnx.assets import fashion_mnist as fm
from bayesq_onnx.errors import BayesQError


def _idx_bytes(arr: np.ndarray, code: int, be: str) -> bytes:
    """An IDX file written from the format description, independently of the reader."""
    head = b"\0\0" + bytes([code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(be).tobytes()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_hand_written(tmp_path, gz):
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, (2, 3, 4)).astype(np.uint8), 0x08, ">u1"),
             (rng.integers(-2**31, 2**31, (5,)).astype(np.int32), 0x0C, ">i4"),
             (rng.standard_normal((3, 2)).astype(np.float32), 0x0D, ">f4"),
             (rng.integers(-300, 300, (4, 1)).astype(np.int16), 0x0B, ">i2")]
    for i, (arr, code, be) in enumerate(cases):
        raw = _idx_bytes(arr, code, be)
        path = tmp_path / f"a{i}.idx"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        got = fm.read_idx(path)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    good = _idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3), 0x08, ">u1")
    for name, raw, match in [("magic", b"\x01" + good[1:], "not an IDX"),
                             ("code", good[:2] + b"\x07" + good[3:], "not an IDX"),
                             ("short", good[:-1], "5 data bytes"),
                             ("long", good + b"\0", "7 data bytes"),
                             ("header", good[:6], "truncated")]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(BayesQError, match=match) as e:
            fm.read_idx(tmp_path / name)
        _one_line(e)
    (tmp_path / "gz").write_bytes(gzip.compress(good)[:-8])   # gzip stream cut short
    with pytest.raises(BayesQError, match="cannot read") as e:
        fm.read_idx(tmp_path / "gz")
    _one_line(e)


# ----------------------------------------------------------------------------- preprocessing


def test_normalize_matches_numpy():
    u8 = np.array([[[0, 255], [73, 128]]], dtype=np.uint8)
    want = ((u8.astype(np.float64) / 255 - 0.2860) / 0.3530)[:, None]
    got = fm.normalize(u8)
    assert got.dtype == np.float32 and got.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)   # float32 rounding of values <= 2.1


def test_calib_indices_distinct_nested_and_fixed():
    a, b = fm.calib_indices(1000, 50), fm.calib_indices(1000, 10)
    assert len(np.unique(a)) == 50 and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(b, a[:10])
    np.testing.assert_array_equal(fm.calib_indices(1000, 50), a)


def test_lr_schedule_one_cycle():
    cfg = fm.TrainConfig(lr=0.1, warmup=0.2)
    lrs = [fm._lr_at(cfg, s, 10) for s in range(10)]
    # up to the peak over 2 steps, then linearly to lr/8 at the last step (0 one step later)
    np.testing.assert_allclose(lrs, [0.05, 0.1] + [0.1 * (10 - s) / 8 for s in range(2, 10)], rtol=1e-12)


def test_train_config_rejects_bad_values():
    for bad in ({"epochs": 0}, {"widths": ()}, {"max_steps": 0}, {"warmup": 1.0}, {"lr": 0.0}):
        with pytest.raises(BayesQError):
            fm.TrainConfig(**bad)


# ----------------------------------------------------------------------------- accuracy


def _linear_classifier(w: np.ndarray) -> onnx.ModelProto:
    """image (batch, 1, 2, 2) -> Flatten -> MatMul w (4, 3) -> logits."""
    g = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])], "lin",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_accuracy_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    x = rng.standard_normal((23, 1, 2, 2)).astype(np.float32)
    pred = np.argmax(x.reshape(23, 4).astype(np.float64) @ w, axis=1)
    labels = pred.copy()
    labels[::3] = (labels[::3] + 1) % 3            # 8 of 23 wrong
    onnx.save(_linear_classifier(w), tmp_path / "m.onnx")
    cache.write_npz(tmp_path / "x.npz", {"image": x})
    np.save(tmp_path / "y.npy", labels)
    want = float(np.mean(pred == labels))
    assert want == 15 / 23
    # batch 5 does not divide 23: the last partial batch must count too
    assert fm.accuracy(tmp_path / "m.onnx", tmp_path / "x.npz", tmp_path / "y.npy", batch_size=5) == want
    assert fm.accuracy(str(tmp_path / "m.onnx"), {"image": x}, labels) == want
    assert fm.accuracy(tmp_path / "m.onnx", x, labels, batch_size=100) == want
    # image by image (what paired comparisons use), the last partial batch included
    np.testing.assert_array_equal(fm.correct(tmp_path / "m.onnx", x, labels, batch_size=5), pred == labels)
    with pytest.raises(BayesQError, match="labels of shape") as e:
        fm.accuracy(tmp_path / "m.onnx", x, labels[:-1])
    _one_line(e)
    with pytest.raises(BayesQError, match="wants 'image'"):
        fm.accuracy(tmp_path / "m.onnx", {"pixels": x}, labels)


# ----------------------------------------------------------------------------- errors


def test_missing_data_one_line_error_leaves_cache_empty(tmp_path):
    with pytest.raises(BayesQError, match=r"apt-get install -y dataset-fashion-mnist") as e:
        fm.prepare_fashion_mnist(tmp_path / "cache", data_dir=tmp_path / "nowhere")
    assert "train-images-idx3-ubyte.gz" in _one_line(e)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _fake_data(d: Path, n: int = 4, top_label: int = 9) -> Path:
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for part in ("train", "test"):
        imgs = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labs = np.minimum(np.arange(n), top_label).astype(np.uint8)
        labs[-1] = top_label
        (d / fm.IDX_FILES[f"{part}_images"]).write_bytes(gzip.compress(_idx_bytes(imgs, 0x08, ">u1")))
        (d / fm.IDX_FILES[f"{part}_labels"]).write_bytes(gzip.compress(_idx_bytes(labs, 0x08, ">u1")))
    return d


def test_load_fake_data_and_bad_labels(tmp_path):
    data = fm.load_fashion_mnist(_fake_data(tmp_path / "ok"))
    assert data["train_images"].shape == (4, 28, 28) and data["test_labels"].dtype == np.int64
    with pytest.raises(BayesQError, match="labels go up to 10") as e:
        fm.load_fashion_mnist(_fake_data(tmp_path / "bad", top_label=10))
    _one_line(e)


def test_missing_torch_message_leaves_cache_empty(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)      # import torch -> ImportError
    with pytest.raises(BayesQError, match=r"torch==2\.13\.0") as e:
        fm.prepare_fashion_mnist(tmp_path / "cache", n_calib=2, n_eval=2,
                                 data_dir=_fake_data(tmp_path / "d"))
    _one_line(e)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- end to end


def test_prepare_smoke_three_steps(tmp_path):
    """The real files, 3 training steps (not the full training): layout, data against a numpy
    reference, exported graph, weight census, cache reuse and byte-for-byte reproducibility."""
    pytest.importorskip("torch")
    if not all((fm.DATA_DIR / f).is_file() for f in fm.IDX_FILES.values()):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    from bayesq_onnx.graph.sites import find_sites

    cfg = fm.TrainConfig(max_steps=3)
    msgs: list[str] = []
    a = fm.prepare_fashion_mnist(tmp_path / "c1", n_calib=8, n_eval=100, progress=msgs.append,
                                 train_config=cfg)
    for p in (a.model, a.calib, a.eval_data, a.labels, a.manifest):
        assert p.is_file() and p.parent == a.directory
    assert a.directory.name.startswith("fashion-mnist-") and a.classes == fm.CLASSES

    raw_train = fm.read_idx(fm.DATA_DIR / fm.IDX_FILES["train_images"])
    raw_test = fm.read_idx(fm.DATA_DIR / fm.IDX_FILES["test_images"])
    raw_labels = fm.read_idx(fm.DATA_DIR / fm.IDX_FILES["test_labels"])
    assert raw_train.shape == (60000, 28, 28) and raw_test.shape == (10000, 28, 28)
    calib, ev = cache.load_npz(a.calib), cache.load_npz(a.eval_data)
    labels = np.load(a.labels)
    assert list(calib) == list(ev) == ["image"]
    assert calib["image"].dtype == ev["image"].dtype == np.float32
    ref = (raw_train[fm.calib_indices(60000, 8)].astype(np.float64) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(calib["image"], ref[:, None], rtol=0, atol=1e-6)  # float32 rounding
    ref = (raw_test[:100].astype(np.float64) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(ev["image"], ref[:, None], rtol=0, atol=1e-6)     # float32 rounding
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, raw_labels[:100])

    model = onnx.load(a.model)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and out.name == "logits"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]

    sites, skipped = find_sites(model, 1024)
    assert sorted((s.name, s.kind) for s in sites) == sorted(
        [(f"stages.{i}.conv{j}.weight", "conv") for i in range(3) for j in (1, 2)]
        + [("stages.2.proj.0.weight", "conv"), ("head.1.weight", "matmul"), ("head.3.weight", "matmul")])
    assert sorted(s.name for s in skipped) == ["stages.1.proj.0.weight", "stem.0.weight"]   # < 1024

    manifest = __import__("json").loads(a.manifest.read_text())
    assert manifest["train"]["steps"] == 3
    assert manifest["eval_accuracy"] == fm.accuracy(a.model, a.eval_data, a.labels, batch_size=33)
    assert manifest["sha256"]["model.onnx"] == cache.sha256_file(a.model)

    stamp = a.model.stat().st_mtime_ns
    again = fm.prepare_fashion_mnist(tmp_path / "c1", n_calib=8, n_eval=100, progress=msgs.append,
                                     train_config=cfg)
    assert again == a and a.model.stat().st_mtime_ns == stamp and "using cached" in msgs[-1]

    b = fm.prepare_fashion_mnist(tmp_path / "c2", n_calib=8, n_eval=100, train_config=cfg)
    assert b.directory.name == a.directory.name
    for p, q in ((a.model, b.model), (a.calib, b.calib), (a.eval_data, b.eval_data),
                 (a.labels, b.labels), (a.manifest, b.manifest)):
        assert p.read_bytes() == q.read_bytes(), p.name
