"""Compare a reference model's outputs with a quantized model's, output by output.

Axis 0 of every output indexes samples.  For every output:

- ``cosine``: mean over samples of the cosine similarity of the sample's flattened output
  (float outputs only; two zero vectors count as 1, one zero vector as 0), ``cosine_min``;
- ``max_abs_error``, ``mean_abs_error`` (over all elements), ``ref_max_abs`` for scale;
- ``nonfinite_ref`` / ``nonfinite_quant``: count of NaN/inf elements.

For *logits-like* outputs (float, at least 2-D, last axis >= 2; chosen by name with ``logits``,
or by the heuristic "name contains 'logit'" when ``logits`` is None), over every position
(all axes but the last):

- ``kl``: mean KL(softmax(ref) || softmax(quant)) over the last axis (nats), ``kl_max``;
- ``top1_agreement``: fraction of positions where the argmaxes agree;
- with ``labels`` (shape = output shape without its last axis; negative labels are ignored):
  ``accuracy_ref``, ``accuracy_quant`` and ``n_labelled``.
  Labels that score nothing (no logits-like output, or no label >= 0) log a warning.

Metrics are plain Python floats/ints (a non-finite metric is ``None``), so the result is
JSON-serializable.  ``compare_models`` streams batches through both models and accumulates the
same statistics without keeping the outputs.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import BayesQError, first_line
from ..runtime.session import make_session

__all__ = ["compare_outputs", "compare_models", "is_logits_like"]

log = logging.getLogger(__name__)


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def is_logits_like(name: str, shape: tuple[int, ...], dtype: np.dtype,
                   logits: set[str] | frozenset[str] | None) -> bool:
    """Whether output ``name`` (full shape incl. the sample axis) gets the logits metrics."""
    shaped = np.issubdtype(dtype, np.floating) and len(shape) >= 2 and shape[-1] >= 2
    if logits is None:
        return shaped and "logit" in name.lower()
    if name in logits and not shaped:
        raise BayesQError(f"output '{name}' was named as logits but has shape {shape} "
                          f"and dtype {dtype} (need float, >= 2-D, last axis >= 2)")
    return name in logits


def _max(a: float, b: np.ndarray) -> float:
    """max that propagates NaN (Python's max(0.0, nan) is 0.0)."""
    return float(np.max([a, np.max(b)]))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


class _OutputStats:
    """Running statistics for one output over batches of samples."""

    def __init__(self, name: str, logits_like: bool, is_float: bool):
        self.name = name
        self.logits_like = logits_like
        self.is_float = is_float
        self.shape: tuple[int, ...] | None = None
        self.dtype: str | None = None
        self.n_samples = 0
        self.cos: list[np.ndarray] = []
        self.n_elem = 0
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.ref_max = 0.0
        self.nonfinite_ref = 0
        self.nonfinite_quant = 0
        self.exact = 0
        self.n_pos = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.agree = 0
        self.n_lab = 0
        self.correct_ref = 0
        self.correct_quant = 0

    def update(self, ref: np.ndarray, quant: np.ndarray, labels: np.ndarray | None) -> None:
        ref, quant = np.asarray(ref), np.asarray(quant)
        if ref.shape != quant.shape:
            raise BayesQError(f"output '{self.name}': reference shape {ref.shape} differs from "
                              f"quantized shape {quant.shape}")
        if ref.ndim == 0:
            ref, quant = ref.reshape(1), quant.reshape(1)
        if self.shape is None:
            self.shape, self.dtype = ref.shape[1:], str(ref.dtype)
        elif ref.shape[1:] != self.shape:
            raise BayesQError(f"output '{self.name}': per-sample shape changed from {self.shape} "
                              f"to {ref.shape[1:]} between batches")
        n = ref.shape[0]
        self.n_samples += n
        r = ref.reshape(n, -1).astype(np.float64)
        q = quant.reshape(n, -1).astype(np.float64)
        self.nonfinite_ref += int(np.count_nonzero(~np.isfinite(r)))
        self.nonfinite_quant += int(np.count_nonzero(~np.isfinite(q)))
        err = np.abs(r - q)
        if err.size:
            self.n_elem += err.size
            self.abs_sum += float(np.sum(err))
            self.abs_max = _max(self.abs_max, err)
            self.ref_max = _max(self.ref_max, np.abs(r))
        if not self.is_float:
            self.exact += int(np.count_nonzero(ref.reshape(n, -1) == quant.reshape(n, -1)))
        else:
            nr, nq = np.linalg.norm(r, axis=1), np.linalg.norm(q, axis=1)
            dot = np.sum(r * q, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = dot / (nr * nq)
            cos = np.where((nr == 0) & (nq == 0), 1.0, np.where((nr == 0) | (nq == 0), 0.0, cos))
            self.cos.append(np.clip(cos, -1.0, 1.0))
        if self.logits_like:
            lr = _log_softmax(ref.astype(np.float64))
            lq = _log_softmax(quant.astype(np.float64))
            with np.errstate(invalid="ignore"):
                pr = np.exp(lr)
                # 0 * log(0/x) = 0: mask positions where the reference probability is 0
                kl = np.sum(np.where(pr > 0, pr * (lr - lq), 0.0), axis=-1)
            self.n_pos += kl.size
            self.kl_sum += float(np.sum(kl))
            if kl.size:
                self.kl_max = _max(self.kl_max, kl)
            ar, aq = np.argmax(ref, axis=-1), np.argmax(quant, axis=-1)
            self.agree += int(np.count_nonzero(ar == aq))
            if labels is not None:
                lab = np.asarray(labels)
                if lab.shape != ar.shape:
                    raise BayesQError(f"labels have shape {lab.shape} but output '{self.name}' "
                                      f"needs {ar.shape} (its shape without the last axis)")
                valid = lab >= 0
                self.n_lab += int(np.count_nonzero(valid))
                self.correct_ref += int(np.count_nonzero(valid & (ar == lab)))
                self.correct_quant += int(np.count_nonzero(valid & (aq == lab)))

    def result(self, with_labels: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shape": list(self.shape or ()),
            "dtype": self.dtype,
            "n_samples": self.n_samples,
            "max_abs_error": _finite_or_none(self.abs_max),
            "mean_abs_error": _finite_or_none(self.abs_sum / self.n_elem) if self.n_elem else None,
            "ref_max_abs": _finite_or_none(self.ref_max),
            "nonfinite_ref": self.nonfinite_ref,
            "nonfinite_quant": self.nonfinite_quant,
        }
        if self.is_float:
            cos = np.concatenate(self.cos) if self.cos else np.zeros(0)
            out["cosine"] = _finite_or_none(np.mean(cos)) if cos.size else None
            out["cosine_min"] = _finite_or_none(np.min(cos)) if cos.size else None
        else:
            out["exact_match"] = self.exact / self.n_elem if self.n_elem else None
        if self.logits_like:
            out["logits"] = True
            out["kl"] = _finite_or_none(self.kl_sum / self.n_pos) if self.n_pos else None
            out["kl_max"] = _finite_or_none(self.kl_max) if self.n_pos else None
            out["top1_agreement"] = self.agree / self.n_pos if self.n_pos else None
            if with_labels:
                out["n_labelled"] = self.n_lab
                out["accuracy_ref"] = self.correct_ref / self.n_lab if self.n_lab else None
                out["accuracy_quant"] = self.correct_quant / self.n_lab if self.n_lab else None
        return out


class _Comparison:
    def __init__(self, logits: Iterable[str] | None):
        self.logits = None if logits is None else frozenset(logits)
        self.stats: dict[str, _OutputStats] = {}

    def update(self, ref: Mapping[str, np.ndarray], quant: Mapping[str, np.ndarray],
               labels: np.ndarray | None) -> None:
        missing = [k for k in ref if k not in quant]
        if missing:
            raise BayesQError(f"the quantized model lacks output(s) {', '.join(missing)}")
        if self.logits is not None:
            unknown = sorted(self.logits - set(ref))
            if unknown:
                raise BayesQError(f"logits output(s) {', '.join(unknown)} not among the outputs "
                                  f"{', '.join(ref)}")
        for name, r in ref.items():
            r = np.asarray(r)
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = _OutputStats(
                    name, is_logits_like(name, r.shape, r.dtype, self.logits),
                    bool(np.issubdtype(r.dtype, np.floating)))
            st.update(r, quant[name], labels)

    def result(self, with_labels: bool) -> dict[str, Any]:
        n = max((s.n_samples for s in self.stats.values()), default=0)
        if with_labels:  # labels that change nothing are said to, not silently dropped
            scored = [s for s in self.stats.values() if s.logits_like]
            if not scored:
                what = ("a float output of >= 2 axes, last axis >= 2, whose name contains 'logit'"
                        if self.logits is None else "none was named as logits")
                log.warning("the labels are ignored: no output is logits-like (%s), so no accuracy is computed",
                            what)
            elif not any(s.n_lab for s in scored):
                log.warning("the labels are ignored: none is >= 0 (negative labels mark positions to skip), "
                            "so no accuracy is computed")
        return {"n_samples": n,
                "outputs": {k: s.result(with_labels) for k, s in self.stats.items()}}


def compare_outputs(ref: Mapping[str, np.ndarray], quant: Mapping[str, np.ndarray],
                    labels: np.ndarray | None = None,
                    logits: set[str] | None = None) -> dict[str, Any]:
    """Metrics of every output in ``ref`` against the same output in ``quant``.

    Returns ``{"n_samples": N, "outputs": {name: {metric: value}}}`` (see the module docstring).
    """
    cmp = _Comparison(logits)
    cmp.update(ref, quant, None if labels is None else np.asarray(labels))
    return cmp.result(labels is not None)


def _fixed_batch(session) -> int | None:
    dims = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    if len(dims) > 1:
        raise BayesQError(f"model inputs have different fixed batch sizes {sorted(dims)}")
    return dims.pop() if dims else None


def compare_models(ref_path: str | Path, quant_path: str | Path,
                   data: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                   session_factory: Callable[[str | Path], Any] | None = None,
                   batch_size: int = 16, logits: set[str] | None = None) -> dict[str, Any]:
    """Run both models on ``data`` (input name -> array, axis 0 = samples) batch by batch and
    compare their outputs with the metrics of ``compare_outputs``.

    ``session_factory(path)`` returns an object with onnxruntime's ``get_inputs()``,
    ``get_outputs()`` and ``run(names, feed)`` (default: ``runtime.session.make_session``,
    which opens any model bayesq-onnx writes).  Keys of ``data`` that
    are not model inputs are ignored.  A model input with a fixed batch dimension sets the batch
    size.  The result adds ``ref_model``, ``quant_model``, ``batch_size`` and the seconds each
    model spent in ``run`` (``ref_seconds``, ``quant_seconds``).
    """
    if batch_size < 1:
        raise BayesQError(f"batch_size must be >= 1 (got {batch_size})")
    factory = session_factory or make_session
    sref, squant = factory(ref_path), factory(quant_path)
    in_ref = [i.name for i in sref.get_inputs()]
    in_quant = {i.name for i in squant.get_inputs()}
    if set(in_ref) != in_quant:
        raise BayesQError(f"the models take different inputs: {sorted(in_ref)} vs "
                          f"{sorted(in_quant)}")
    missing = [k for k in in_ref if k not in data]
    if missing:
        raise BayesQError(f"the data lack model input(s) {', '.join(missing)} "
                          f"(data has {', '.join(data) or 'nothing'})")
    feeds = {k: np.asarray(data[k]) for k in in_ref}
    lengths = {k: (v.shape[0] if v.ndim else 0) for k, v in feeds.items()}
    if len(set(lengths.values())) != 1:
        raise BayesQError(f"inputs have different sample counts: {lengths}")
    n = next(iter(lengths.values()), 0)
    if n == 0:
        raise BayesQError("the data hold no samples")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 0 or labels.shape[0] != n:
            raise BayesQError(f"labels have shape {labels.shape}, expected {n} samples on axis 0")
    fixed = {_fixed_batch(sref), _fixed_batch(squant)} - {None}
    if len(fixed) > 1:
        raise BayesQError(f"the models have different fixed batch sizes {sorted(fixed)}")
    if fixed:
        batch_size = fixed.pop()
        if n % batch_size:
            raise BayesQError(f"{n} samples do not split into the models' fixed batch size "
                              f"{batch_size}")
    out_names = [o.name for o in sref.get_outputs()]
    lacking = sorted(set(out_names) - {o.name for o in squant.get_outputs()})
    if lacking:
        raise BayesQError(f"the quantized model lacks output(s) {', '.join(lacking)}")
    cmp = _Comparison(logits)
    t_ref = t_quant = 0.0
    for a in range(0, n, batch_size):
        feed = {k: v[a:a + batch_size] for k, v in feeds.items()}
        t0 = time.perf_counter()
        r = sref.run(out_names, feed)
        t1 = time.perf_counter()
        q = squant.run(out_names, feed)
        t2 = time.perf_counter()
        t_ref += t1 - t0
        t_quant += t2 - t1
        cmp.update(dict(zip(out_names, r)), dict(zip(out_names, q)),
                   None if labels is None else labels[a:a + batch_size])
    res = cmp.result(labels is not None)
    res.update({"ref_model": str(ref_path), "quant_model": str(quant_path),
                "batch_size": int(batch_size), "ref_seconds": round(t_ref, 6),
                "quant_seconds": round(t_quant, 6)})
    return res


def evaluate_files(ref_path: str | Path, quant_path: str | Path, data_path: str | Path,
                   labels_path: str | Path | None = None) -> dict[str, Any]:
    """``bayesq-onnx eval``: files in, metrics out; every bad input is a BayesQError."""
    from ..calib.readers import input_specs, load_calibration
    from ..graph.model_io import load_model

    ref = load_model(ref_path)
    load_model(quant_path)  # a clear error for a missing or corrupt file before onnxruntime sees it
    data = load_calibration(data_path, input_specs(ref))
    labels = None
    if labels_path is not None:
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except Exception as e:
            raise BayesQError(f"cannot read labels {labels_path}: {first_line(e)}") from None
        if not np.issubdtype(labels.dtype, np.integer):
            raise BayesQError(f"labels {labels_path} must be integers, got {labels.dtype}")
    try:
        return compare_models(ref_path, quant_path, data, labels)
    except BayesQError:
        raise
    except Exception as e:
        raise BayesQError(f"onnxruntime failed to run the models: {first_line(e)}") from None
