"""A small ResNet-style CNN trained on Fashion-MNIST, as ONNX, with calibration / test images.

Everything comes from packages, nothing from a hub: the images are the IDX files of the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``, 60k
training and 10k test images of 28x28 grey pixels, ten classes ``CLASSES``).

The network (``TrainConfig``): a 3x3 stem, one basic residual block per stage (widths 16/32/64,
stride 2 between stages, 1x1 projection shortcuts), global average pooling and a two-layer head
(64 -> 128 -> 10).  It is trained once with torch on the CPU, deterministically (fixed seeds, one
thread, deterministic kernels, the batch order from a seeded numpy generator), and exported with
the TorchScript exporter in eval mode, so every BatchNorm is folded into its Conv.  Graph: input
``image`` float32 ``(batch, 1, 28, 28)`` normalised as ``(pixel / 255 - MEAN) / STD``, output
``logits`` float32 ``(batch, 10)``, dynamic batch.

Files are generated once per parameter set into ``cache_dir/fashion-mnist-<key>/`` (key = hash of
the parameters, the torch version and the IDX files' bytes), written into a temporary directory
and renamed into place, and are byte-for-byte reproducible on one machine type (the float
arithmetic of training depends on the CPU's vector instructions, so other CPUs may give other
bytes; each build records its own test accuracy in the manifest).
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from bayesq_onnx.assets.cache import (Progress, cache_key, load_npz, package_version, require, sha256_file,
                                      staged_directory, versions, write_json, write_npz)
from bayesq_onnx.assets.export import name_by_scope, save_export, torchscript_export
from bayesq_onnx.errors import BayesQError

RECIPE_VERSION = 1
OPSET = 17
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_DATA = "install the Debian package dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)"
IDX_FILES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                            "Shirt", "Sneaker", "Bag", "Ankle boot")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
IMAGE_SHAPE = (1, 28, 28)
# Pixel mean and standard deviation of the 60k training images (scaled to [0, 1]), rounded.
MEAN, STD = 0.2860, 0.3530
CALIB_SEED = 20240601              # which training images form the calibration set
_MAX_EXPORT_ERROR = 1e-3           # torch vs onnxruntime logits, max abs (logits are O(10))


@dataclass(frozen=True)
class TrainConfig:
    """How the CNN is built and trained; every field is part of the cache key."""

    widths: tuple[int, ...] = (16, 32, 64)   # channels of the residual stages
    head: int = 128                          # hidden width of the classifier head
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1                          # peak of the one-cycle schedule (SGD, Nesterov)
    warmup: float = 0.2                      # fraction of the steps spent rising to ``lr``
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip: bool = True                        # random horizontal flips (garments are ~symmetric)
    seed: int = 0
    threads: int = 1                         # fixed: the trained bytes differ with 1 and 2 threads
    max_steps: int | None = None             # stop early (tests); None = ``epochs`` full passes

    def __post_init__(self):
        if not self.widths or any(w < 1 for w in self.widths) or self.head < 1:
            raise BayesQError(f"widths and head must be positive (got {self.widths}, {self.head})")
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1:
            raise BayesQError("epochs, batch_size and threads must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise BayesQError(f"max_steps must be >= 1 or None (got {self.max_steps})")
        if not (self.lr > 0 and 0 <= self.warmup < 1):
            raise BayesQError(f"need lr > 0 and 0 <= warmup < 1 (got {self.lr}, {self.warmup})")


@dataclass(frozen=True)
class FashionMNISTAsset:
    """Paths of one prepared Fashion-MNIST asset (all inside ``directory``)."""

    directory: Path
    model: Path        # ONNX, input "image" (batch, 1, 28, 28) float32, output "logits" (batch, 10)
    calib: Path        # npz: image -> float32 (n_calib, 1, 28, 28), training images, normalised
    eval_data: Path    # npz: image -> float32 (n_eval, 1, 28, 28), the first n_eval test images
    labels: Path       # npy: int64 (n_eval,), class index of each eval image
    manifest: Path     # json: parameters, versions, training summary, test accuracy, file hashes
    classes: tuple[str, ...]


# ----------------------------------------------------------------------------- data


_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): 2 zero bytes, a type code, the rank, big-endian uint32
    dimensions, then the big-endian data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise BayesQError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise BayesQError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise BayesQError(f"IDX file {path} is truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    size = math.prod(shape) * dtype.itemsize
    if len(raw) - start != size:
        raise BayesQError(f"IDX file {path} holds {len(raw) - start} data bytes, its header "
                          f"{shape} says {size}")
    return np.frombuffer(raw, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_paths(data_dir: Path) -> dict[str, Path]:
    paths = {k: Path(data_dir) / f for k, f in IDX_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise BayesQError(f"Fashion-MNIST file(s) {', '.join(missing)} not found in {data_dir}: "
                          f"{INSTALL_DATA}")
    return paths


def load_fashion_mnist(data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    """train_images / test_images uint8 (n, 28, 28), train_labels / test_labels int64 (n,)."""
    out = {k: read_idx(p) for k, p in _idx_paths(data_dir).items()}
    for part in ("train", "test"):
        im, lab = out[f"{part}_images"], out[f"{part}_labels"]
        if im.dtype != np.uint8 or im.shape[1:] != IMAGE_SHAPE[1:] or lab.shape != im.shape[:1]:
            raise BayesQError(f"Fashion-MNIST {part} files have images {im.dtype} {im.shape} "
                              f"and labels {lab.shape}; expected uint8 (n, 28, 28) and (n,)")
        if lab.size and lab.max() >= len(CLASSES):
            raise BayesQError(f"Fashion-MNIST {part} labels go up to {lab.max()} (> 9)")
        out[f"{part}_labels"] = lab.astype(np.int64)
    return out


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28), as the network was trained."""
    x = images.astype(np.float32)[:, None] / np.float32(255)
    return (x - np.float32(MEAN)) / np.float32(STD)


def calib_indices(n_train: int, n_calib: int) -> np.ndarray:
    """Training images used for calibration: a seeded permutation's prefix (so sets nest)."""
    return np.random.default_rng(CALIB_SEED).permutation(n_train)[:n_calib]


# ----------------------------------------------------------------------------- network


def _torch():
    return require("torch", "pip install torch==2.13.0", "Fashion-MNIST asset")


def build_net(cfg: TrainConfig):
    """The (untrained) torch module; classes are defined here so torch is imported only on use."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        """Basic residual block: conv-bn-relu-conv-bn plus the (projected) input, then relu."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + self.proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            w = cfg.widths
            self.stem = nn.Sequential(nn.Conv2d(1, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
            self.stages = nn.Sequential(*(Block(w[max(i - 1, 0)], c, 2 if i else 1) for i, c in enumerate(w)))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(w[-1], cfg.head), nn.ReLU(),
                                      nn.Linear(cfg.head, len(CLASSES)))

        def forward(self, image):
            h = self.stages(self.stem(image))
            return self.head(h.mean(dim=(2, 3)))

    return Net()


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """One-cycle, piecewise linear: 0 -> lr over the warmup, then down to 0 at the last step."""
    up = max(1, round(cfg.warmup * total))
    if step < up:
        return cfg.lr * (step + 1) / up
    return cfg.lr * (total - step) / max(1, total - up)


def train(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, progress: Progress | None = None):
    """Train ``build_net(cfg)`` on uint8 images; returns (module in eval mode, summary dict).

    Deterministic: seeds, thread count and deterministic kernels are set for the duration and the
    caller's torch RNG, thread count and determinism flag are restored afterwards."""
    torch = _torch()
    say = progress or (lambda msg: None)
    n = len(images)
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise BayesQError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = build_net(cfg).to(memory_format=torch.channels_last)  # ~1.4x faster on one core
            opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                  weight_decay=cfg.weight_decay)
            net.train()
            step = 0
            while step < total:
                order = rng.permutation(n)
                flips = rng.random(n) < 0.5 if cfg.flip else np.zeros(n, bool)
                epoch_loss = []
                for b in range(per_epoch):
                    if step == total:
                        break
                    idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    x = normalize(images[idx])
                    x[flips[idx]] = x[flips[idx], :, :, ::-1]
                    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
                    loss = torch.nn.functional.cross_entropy(net(xt), torch.from_numpy(labels[idx]))
                    for g in opt.param_groups:
                        g["lr"] = _lr_at(cfg, step, total)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    epoch_loss.append(loss.item())
                    step += 1
                losses.append(float(np.mean(epoch_loss)))
                say(f"fashion-mnist: epoch {len(losses)}, {step}/{total} steps, train loss "
                    f"{losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    net = net.to(memory_format=torch.contiguous_format).eval()
    return net, {"steps": total, "epoch_train_loss": [float(f"{v:.4g}") for v in losses],
                 "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- export


def export_onnx(net, path: Path, meta: Mapping[str, str]) -> None:
    """TorchScript export in eval mode (BatchNorm folded into Conv), checked, written atomically."""
    torch = _torch()
    require("onnx", "pip install onnx", "Fashion-MNIST asset")
    model = torchscript_export(net, (torch.zeros((2,) + IMAGE_SHAPE),), [INPUT_NAME], [OUTPUT_NAME], OPSET)
    left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if left:
        raise BayesQError(f"ONNX export left {len(left)} BatchNormalization node(s) unfolded: {left[0]}")
    # stages.1.conv1.weight, stages.1.proj.0.bias, head.1.weight
    name_by_scope(model, {op: ((1, "weight"), (2, "bias")) for op in ("Conv", "Gemm")})
    save_export(model, path, "ResNet-style CNN trained on Fashion-MNIST; exported by bayesq_onnx.assets.fashion_mnist",
                meta)


def _check_export(net, onnx_path: Path, x: np.ndarray) -> float:
    """Max abs difference of the logits, torch vs onnxruntime, on ``x`` (one batch and a single)."""
    torch = _torch()
    from bayesq_onnx.runtime.session import make_session

    sess = make_session(onnx_path)
    worst = 0.0
    for part in (x[:1], x):
        (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: part})
        with torch.no_grad():
            want = net(torch.from_numpy(part)).numpy()
        if got.shape != (len(part), len(CLASSES)):
            raise BayesQError(f"exported CNN gives shape {got.shape}, expected {(len(part), len(CLASSES))}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


# ----------------------------------------------------------------------------- evaluation


def accuracy(model_path, eval_data, labels, batch_size: int = 500) -> float:
    """Top-1 accuracy of an image classifier ONNX model (fp32 or quantized) run with onnxruntime:
    the mean of :func:`correct`."""
    return float(np.mean(correct(model_path, eval_data, labels, batch_size)))


def correct(model_path, eval_data, labels, batch_size: int = 500) -> np.ndarray:
    """Whether the model classifies each evaluation image right (bool, one per label).

    ``eval_data``: an npz path or a mapping holding the model's single input (or a bare array);
    ``labels``: an npy path or an int array.  The output named ``logits`` (else the first) is
    argmaxed over its last axis, ``batch_size`` images at a time."""
    from bayesq_onnx.runtime.session import make_session

    sess = make_session(model_path)
    inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    if len(inputs) != 1:
        raise BayesQError(f"accuracy() needs a model with one input, {model_path} has {len(inputs)}")
    name = inputs[0].name
    if isinstance(eval_data, (str, Path)):
        eval_data = load_npz(Path(eval_data))
    if isinstance(eval_data, Mapping):
        if name not in eval_data:
            raise BayesQError(f"evaluation data has {sorted(eval_data)}, the model wants '{name}'")
        eval_data = eval_data[name]
    x = np.asarray(eval_data)
    y = np.load(labels, allow_pickle=False) if isinstance(labels, (str, Path)) else np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x) or not len(y):
        raise BayesQError(f"{len(x)} evaluation samples but labels of shape {y.shape}")
    out = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
    right = np.empty(len(y), bool)
    for a in range(0, len(x), max(1, int(batch_size))):
        (logits,) = sess.run([out], {name: x[a:a + batch_size]})
        right[a:a + batch_size] = np.argmax(logits, axis=-1) == y[a:a + batch_size]
    return right


# ----------------------------------------------------------------------------- entry point


def _asset(directory: Path) -> FashionMNISTAsset:
    return FashionMNISTAsset(directory=directory, model=directory / "model.onnx",
                             calib=directory / "calib.npz", eval_data=directory / "eval.npz",
                             labels=directory / "eval_labels.npy", manifest=directory / "manifest.json",
                             classes=CLASSES)


def _complete(asset: FashionMNISTAsset) -> bool:
    return all(p.is_file() for p in (asset.model, asset.calib, asset.eval_data, asset.labels, asset.manifest))


def prepare_fashion_mnist(cache_dir: Path, n_calib: int = 256, n_eval: int = 10_000,
                          progress: Progress | None = None, *, train_config: TrainConfig = TrainConfig(),
                          data_dir: Path | None = None) -> FashionMNISTAsset:
    """Train the CNN on Fashion-MNIST (or find it in the cache), export it, write the data files.

    Reuses ``cache_dir/fashion-mnist-<key>/`` when it exists.  Raises ``BayesQError`` naming what
    is missing when the Debian ``dataset-fashion-mnist`` files, torch or onnx are absent; nothing
    is left in ``cache_dir`` then.  ``progress`` (optional) receives one-line status messages.
    """
    say = progress or (lambda msg: None)
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    sources = _idx_paths(data_dir)
    torch_version = package_version("torch", "pip install torch==2.13.0", "Fashion-MNIST asset")
    if not 1 <= n_calib <= 60_000 or not 1 <= n_eval <= 10_000:
        raise BayesQError(f"need 1 <= n_calib <= 60000 and 1 <= n_eval <= 10000 (got {n_calib}, {n_eval})")
    cfg = dataclasses.asdict(train_config)
    params = {"recipe": RECIPE_VERSION, "opset": OPSET, "n_calib": int(n_calib), "n_eval": int(n_eval),
              "train": {**cfg, "widths": list(cfg["widths"])}, "mean": MEAN, "std": STD,
              "calib_seed": CALIB_SEED, "torch": torch_version}
    final = Path(cache_dir) / f"fashion-mnist-{cache_key(params, *sources.values())}"
    asset = _asset(final)
    if _complete(asset):
        say(f"fashion-mnist: using cached {final}")
        return asset
    _torch()                                                   # fail early, before any work
    require("onnx", "pip install onnx", "Fashion-MNIST asset")
    data = load_fashion_mnist(data_dir)
    if n_calib > len(data["train_images"]) or n_eval > len(data["test_images"]):
        raise BayesQError(f"asked for {n_calib} calibration / {n_eval} evaluation images, the files "
                          f"hold {len(data['train_images'])} / {len(data['test_images'])}")

    with staged_directory(final, lambda d: _complete(_asset(d))) as tmp:
        t0 = time.perf_counter()
        staged = _asset(tmp)
        calib = normalize(data["train_images"][calib_indices(len(data["train_images"]), n_calib)])
        evald = normalize(data["test_images"][:n_eval])
        labels = data["test_labels"][:n_eval]
        write_npz(staged.calib, {INPUT_NAME: calib})
        write_npz(staged.eval_data, {INPUT_NAME: evald})
        np.save(staged.labels, labels)

        say(f"fashion-mnist: training {train_config.widths} CNN on {len(data['train_images'])} images "
            f"({train_config.threads} thread(s))")
        net, summary = train(data["train_images"], data["train_labels"], train_config, progress)
        meta = {"bayesq.asset": "fashion-mnist", "bayesq.recipe": str(RECIPE_VERSION),
                "bayesq.normalize": f"(pixel / 255 - {MEAN}) / {STD}", "bayesq.classes": ",".join(CLASSES)}
        export_onnx(net, staged.model, meta)
        err = _check_export(net, staged.model, evald[:64])
        if not err <= _MAX_EXPORT_ERROR:
            raise BayesQError(f"exported CNN differs from torch by {err:.3g} (max abs logits), "
                              f"more than {_MAX_EXPORT_ERROR:g}")
        acc = accuracy(staged.model, {INPUT_NAME: evald}, labels)

        write_json(staged.manifest, {
            "params": params,
            "inputs": {INPUT_NAME: ["batch", *IMAGE_SHAPE]},
            "output": {OUTPUT_NAME: ["batch", len(CLASSES)]},
            "classes": list(CLASSES),
            "calib": f"training images numpy default_rng({CALIB_SEED}).permutation(60000)[:{n_calib}]",
            "eval": f"test images [:{n_eval}]",
            "train": {"steps": summary["steps"], "epoch_train_loss": summary["epoch_train_loss"]},
            "eval_accuracy": acc,
            "export_check_max_abs": float(f"{err:.3g}"),
            "versions": versions("torch", "onnx", "onnxruntime", "numpy"),
            "sources": {p.name: sha256_file(p) for p in sources.values()},
            "sha256": {p.name: sha256_file(p) for p in (staged.model, staged.calib, staged.eval_data, staged.labels)},
        })
        say(f"fashion-mnist: wrote {final} (training {summary['seconds']:.0f} s, total "
            f"{time.perf_counter() - t0:.0f} s, test accuracy {acc:.4f}, max |torch - ort| {err:.2g})")
    return asset
