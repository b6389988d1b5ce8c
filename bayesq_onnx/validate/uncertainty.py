"""Predictive uncertainty of a Bayesian classifier from S forward samples (docs/design.md,
"Keeping the posterior").

For class probabilities ``p[s, n, c]`` of S weight samples:

- predictive mean ``pbar[n] = mean_s p[s, n]``;
- total uncertainty: the entropy ``H[pbar]``;
- aleatoric part: the expected entropy ``mean_s H[p_s]`` (what each single model is unsure of);
- epistemic part: the mutual information ``H[pbar] - mean_s H[p_s]`` between the label and the
  weights (how much the samples disagree); >= 0 by the concavity of entropy.

Scores: accuracy, NLL and ECE of ``pbar`` against labels, and the AUROC of any score separating
in-distribution from out-of-distribution inputs.  Plain numpy; nothing here runs a model except
:func:`sample_probs`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15     # the usual equal-width confidence bins (Guo et al. 2017)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(axis=-1)


@dataclass(frozen=True)
class Decomposition:
    mean: np.ndarray        # (N, C) predictive mean
    total: np.ndarray       # (N,) entropy of the predictive mean
    aleatoric: np.ndarray   # (N,) expected entropy
    epistemic: np.ndarray   # (N,) mutual information = total - aleatoric (clipped at 0: rounding)


def decompose(probs: np.ndarray) -> Decomposition:
    """``probs`` (S, N, C): class probabilities of S weight samples for N inputs."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 3:
        raise ValueError(f"probs must be (samples, inputs, classes), got shape {p.shape}")
    mean = p.mean(axis=0)
    total = entropy(mean)
    aleatoric = entropy(p).mean(axis=0)
    return Decomposition(mean, total, aleatoric, np.maximum(total - aleatoric, 0.0))


def accuracy(mean: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(mean, axis=-1) == labels).mean())


def nll(mean: np.ndarray, labels: np.ndarray, floor: float = 1e-12) -> float:
    """Mean negative log predictive probability of the true class (``floor`` keeps a confident
    miss finite)."""
    return float(-np.log(np.maximum(mean[np.arange(len(labels)), labels], floor)).mean())


def ece(mean: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over equal-width bins of confidence ``max_c pbar``, the
    share-weighted gap between mean confidence and accuracy."""
    conf = mean.max(axis=-1)
    hit = (np.argmax(mean, axis=-1) == labels).astype(np.float64)
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence is >= 1/C > 0
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(conf[sel].mean() - hit[sel].mean())
    return float(total)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an out-of-distribution input scores higher than an in-distribution one
    (ties count half): the Mann-Whitney statistic, from average ranks."""
    a, b = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if not len(a) or not len(b):
        raise ValueError("AUROC needs scores of both kinds")
    s = np.concatenate([a, b])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average rank of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for i, j in zip(starts, ends):
        ranks[order[i:j]] = (i + j + 1) / 2.0
    n1, n2 = len(a), len(b)
    return float((ranks[n1:].sum() - n2 * (n2 + 1) / 2.0) / (n1 * n2))


def sample_probs(session, data: dict[str, np.ndarray], samples: int, batch_size: int, output: str | None = None,
                 sample_input: str | None = None) -> np.ndarray:
    """Class probabilities ``(samples, N, C)`` of a sampling model (``lower/sampling.py``).

    Each ``session.run`` of a model that draws its weights (VPQ, JQ) draws a new set: every batch is
    run ``samples`` times in a row, so the result depends only on the model's seed and the batch
    size.  A model of fixed weight sets (SPQ) takes the set's index as ``sample_input``; a
    deterministic model gives ``samples`` identical rows."""
    out = output or session.get_outputs()[0].name
    n = len(next(iter(data.values())))
    res = None
    for i in range(0, n, batch_size):
        feed = {k: v[i:i + batch_size] for k, v in data.items()}
        for s in range(samples):
            extra = {sample_input: np.array(s, np.int64)} if sample_input else {}
            p = softmax(session.run([out], {**feed, **extra})[0])
            if res is None:
                res = np.empty((samples, n, p.shape[-1]), np.float64)
            res[s, i:i + len(p)] = p
    return res


DEFAULT_SAMPLES = 16


def class_labels(labels, n: int | None, per: str) -> np.ndarray:
    """``labels`` (an array or a ``.npy`` path) as int64, one class >= 0 ``per`` sample of ``n`` (None:
    any number); a BayesQError otherwise."""
    from ..errors import BayesQError, first_line
    if isinstance(labels, (str, os.PathLike)):
        try:
            labels = np.load(labels, allow_pickle=False)
        except Exception as e:
            raise BayesQError(f"cannot read labels {labels}: {first_line(e)}") from None
    y = np.asarray(labels)
    if y.ndim != 1 or (n is not None and len(y) != n) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise BayesQError(f"labels must be one non-negative integer class per {per}"
                          f"{'' if n is None else f' ({n})'}, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def model_kind(model) -> tuple[str, int | None]:
    """``("draws", None)`` for a model with RandomNormalLike nodes (vpq, jq), ``("sets", S)`` for one
    with the ``bq_sample`` input (spq, S stored sets), else ``("deterministic", 1)``."""
    from ..lower.sampling import SAMPLE_INPUT
    if any(i.name == SAMPLE_INPUT for i in model.graph.input):
        inits = {t.name: t for t in model.graph.initializer}
        gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == SAMPLE_INPUT]
        return "sets", int(inits[gathers[0].input[0]].dims[0]) if gathers else 0
    if any(n.op_type == "RandomNormalLike" for n in model.graph.node):
        return "draws", None
    return "deterministic", 1


def predict_file(model_path, data_path, samples: int | None = None, seed: int | None = None, batch_size: int = 64,
                 labels=None, output=None) -> dict:
    """``bayesq-onnx predict``: the predictive mean and its uncertainty per input; every bad input is a
    BayesQError.  Returns the summary (means over inputs); ``output`` gets the per-input arrays."""
    from ..calib.readers import input_specs, load_calibration
    from ..errors import BayesQError, first_line
    from ..graph.model_io import check_writable, load_model, save_npz_atomic
    from ..lower.sampling import SAMPLE_INPUT, set_seed
    from ..runtime.session import make_session

    if samples is not None and samples < 1:
        raise BayesQError(f"--samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise BayesQError(f"--batch-size must be >= 1, got {batch_size}")
    if output is not None:
        check_writable(output)
    m = load_model(model_path)
    kind, n_sets = model_kind(m)
    if kind == "sets":
        if samples is not None and samples > n_sets:
            raise BayesQError(f"the model stores {n_sets} weight sets: --samples must be at most that")
        samples = samples or n_sets
    elif kind == "deterministic":
        samples = 1
    else:
        samples = samples or DEFAULT_SAMPLES
    if seed is not None:
        if kind != "draws":
            raise BayesQError("--seed applies to a model that draws its weights (compress --keep-posterior, "
                              "--sampling vpq or jq)")
        m = set_seed(m, seed)
    specs = [s for s in input_specs(m) if s.name != SAMPLE_INPUT] if kind == "sets" else input_specs(m)
    data = load_calibration(data_path, specs)
    n = len(next(iter(data.values())))
    y = None if labels is None else class_labels(labels, n, "input")
    try:
        session = make_session(m)
        probs = sample_probs(session, data, samples, batch_size,
                             sample_input=SAMPLE_INPUT if kind == "sets" else None)
    except BayesQError:
        raise
    except Exception as e:
        raise BayesQError(f"onnxruntime failed to run the model: {first_line(e)}") from None
    if y is not None and (y.min() < 0 or y.max() >= probs.shape[-1]):
        raise BayesQError(f"labels must be classes 0..{probs.shape[-1] - 1}")
    d = decompose(probs)
    summary = {"model": str(model_path), "kind": kind, "samples": samples, "n_inputs": n,
               "total": float(d.total.mean()), "aleatoric": float(d.aleatoric.mean()),
               "epistemic": float(d.epistemic.mean())}
    if y is not None:
        summary.update(accuracy=accuracy(d.mean, y), nll=nll(d.mean, y), ece=ece(d.mean, y))
    if output is not None:
        save_npz_atomic({"mean": d.mean.astype(np.float32), "total": d.total.astype(np.float32),
                         "aleatoric": d.aleatoric.astype(np.float32), "epistemic": d.epistemic.astype(np.float32)},
                        output)
    return summary
