"""The task-aware proxy: end-to-end output distortion on calibration data.

Per-layer errors do not compare across layers (docs/design.md, "Loss tables"); the distortion of the
model's own outputs does.  Each output counts as its relative squared error
``||y - y_ref||^2 / ||y_ref||^2`` (so outputs of different scales weigh alike), averaged over outputs.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import numpy as np

from ..errors import BayesQError
from .. import memory
from ..graph.cone import linear_tail
from ..graph.model_io import ArraySpill
from ..runtime.probe import ConeRun
from ..runtime.stream import SegmentRun


class OutputDistortion:
    def __init__(self, probe, data: dict[str, np.ndarray], batch_size: int):
        self.probe, self.data, self.batch_size = probe, data, batch_size
        self._spill = ArraySpill()   # reference outputs wait on disk (a 32000-word LM's logits: 65 MB, 8 x 64 tokens)
        self.reference = [self._spill.put(r) for r in probe.run(data, batch_size)]
        memory.release()   # what the whole-model run allocated (a language model's logits: twice)
        first = self.reference[0]
        self.outputs = [k for k in probe.outputs if np.issubdtype(first[k].dtype, np.floating)]
        if not self.outputs:
            raise BayesQError("the model has no floating-point output to measure distortion on")
        self.energy = {k: sum(_sum_sq(r[k]) for r in self.reference) for k in self.outputs}

    def __call__(self, overrides: dict[str, np.ndarray]) -> float:
        return self._distortion(self.probe.run(self.data, self.batch_size, outputs=self.outputs, overrides=overrides),
                                self.outputs)

    def of_outputs(self, runs: Iterable[dict[str, np.ndarray]]) -> float:
        """The distortion of model outputs computed elsewhere, batch by batch as the reference's
        (``runs`` may be a generator: one batch is read at a time)."""
        runs = iter(runs)
        first = next(runs)
        return self._distortion(itertools.chain([first], runs), [k for k in self.outputs if k in first])

    def restricted_to(self, names: list[str]) -> Callable[[dict[str, np.ndarray]], float]:
        """The same distortion for overrides of ``names`` only, running just the part of the model
        they reach (runtime.probe.ConeRun): for many measurements of one site.  Where the model
        cannot be cut, this distortion itself."""
        if self.probe.model is None:
            return self
        cone = ConeRun(self.probe, names, self.data, self.batch_size, self.outputs)
        return lambda overrides: self._distortion(cone.run(overrides), cone.outputs)

    def _distortion(self, runs: Iterable[dict[str, np.ndarray]], computed: list[str]) -> float:
        """Outputs not ``computed`` are the reference's own: no error."""
        err = dict.fromkeys(self.outputs, 0.0)
        for ref, out in zip(self.reference, runs):
            for k in computed:
                err[k] += _sum_sq(out[k], ref[k])
        return float(np.mean([err[k] / max(self.energy[k], 1e-30) for k in self.outputs]))

    def segmented(self, names: list[str]) -> Callable[[dict[str, np.ndarray]], float]:
        """The same distortion for overrides of ``names``, computed from the first segment they
        change on (runtime/stream.SegmentRun): everything before it is run once for all
        measurements, so one site costs the part of the model from its block on -- half a
        forward pass on average.  Where the model cannot be cut, this distortion itself.

        A last segment that is only a linear head ``y = x @ W`` (a language model's vocabulary
        projection: a third of a small LM's forward pass, and its logits tens of MB a measurement)
        is not run for the sites before it: ``||dy||^2 = sum over rows of dx (W W^T) dx^T``, read
        from the cut ``x`` with the Gram ``W W^T`` made once."""
        if self.probe.model is None:
            return self
        run = SegmentRun(self.probe, names, self.data, self.batch_size)
        last = len(run.stream) - 1
        tail = linear_tail(run.stream.segments[last], self.outputs) if last > 0 else None
        gram = _gram(self.probe.weights[tail[0]], tail[1]) if tail and tail[0] in self.probe.weights else None
        if gram is not None:
            cut = run.stream.segments[last].start
            reference = [st[cut] for st in run.starts[last]]

        def measure(overrides: dict[str, np.ndarray]) -> float:
            first = min((k for k in map(run.first_segment, overrides) if k is not None), default=None)
            if first is None:
                return 0.0
            if gram is not None and first < last and tail[0] not in overrides:
                err = sum(_quadratic(x, ref, gram) for x, ref in zip(run.cut_from(first, last, overrides), reference))
                return err / max(self.energy[self.outputs[0]], 1e-30)
            return self.of_outputs(run.outputs_from(first, overrides))
        return measure


def _gram(w: np.ndarray, transposed: bool) -> np.ndarray:
    """``M M^T`` in float64 for the head ``M = w`` (``w^T`` if ``transposed``), ``(d, d)`` with ``d``
    the head's input width: float32 products over chunks of the vocabulary (each sums 4096 terms:
    relative error ~1e-6), added up in float64."""
    m = np.asarray(w)
    d = m.shape[1] if transposed else m.shape[0]
    g = np.zeros((d, d))
    step = 4096
    for i in range(0, m.shape[0] if transposed else m.shape[1], step):
        c = np.asarray(m[i:i + step] if transposed else m[:, i:i + step].T, np.float32)   # (chunk, d)
        g += c.T @ c
    return g


def _quadratic(x: np.ndarray, ref: np.ndarray, gram: np.ndarray) -> float:
    """``sum over rows of dx G dx^T`` for ``dx = x - ref`` (rows: every position of the cut)."""
    d = (np.asarray(x, np.float64) - ref).reshape(-1, gram.shape[0])
    return float(np.einsum("ij,ij->", d @ gram, d))


_CHUNK = 1 << 16   # elements per step of _sum_sq: its buffer stays in cache


def _sum_sq(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """``sum((a - b)^2)`` (``b`` absent: 0), squared in float32 (or ``a``'s wider type), summed in
    float64, a cache-sized chunk at a time: a language model's logits are tens of MB per
    measurement, and whole-array float64 temporaries cost more than the sums (page faults too)."""
    a = np.ascontiguousarray(a).reshape(-1)
    b = None if b is None else np.ascontiguousarray(b, a.dtype).reshape(-1)
    buf = np.empty(min(_CHUNK, a.size), np.result_type(a.dtype, np.float32))
    total = 0.0
    for i in range(0, a.size, _CHUNK):
        d = buf[:min(_CHUNK, a.size - i)]
        if b is None:
            np.square(a[i:i + d.size], out=d)
        else:
            np.subtract(a[i:i + d.size], b[i:i + d.size], out=d)
            np.square(d, out=d)
        total += float(d.sum(dtype=np.float64))
    return total
