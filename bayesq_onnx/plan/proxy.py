"""The task-aware proxy: end-to-end output distortion on calibration data.

Per-layer errors do not compare across layers (docs/design.md, "Loss tables"); the distortion of the
model's own outputs does.  Each output counts as its relative squared error
``||y - y_ref||^2 / ||y_ref||^2`` (so outputs of different scales weigh alike), averaged over outputs.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..errors import BayesQError
from ..runtime.probe import ConeRun
from ..runtime.stream import SegmentRun


class OutputDistortion:
    def __init__(self, probe, data: dict[str, np.ndarray], batch_size: int):
        self.probe, self.data, self.batch_size = probe, data, batch_size
        self.reference = list(probe.run(data, batch_size))
        first = self.reference[0]
        self.outputs = [k for k in probe.outputs if np.issubdtype(first[k].dtype, np.floating)]
        if not self.outputs:
            raise BayesQError("the model has no floating-point output to measure distortion on")
        self.energy = {k: sum(float(np.square(r[k], dtype=np.float64).sum()) for r in self.reference)
                       for k in self.outputs}

    def __call__(self, overrides: dict[str, np.ndarray]) -> float:
        return self._distortion(self.probe.run(self.data, self.batch_size, outputs=self.outputs, overrides=overrides),
                                self.outputs)

    def of_outputs(self, runs: Iterable[dict[str, np.ndarray]]) -> float:
        """The distortion of model outputs computed elsewhere, batch by batch as the reference's."""
        runs = list(runs)
        return self._distortion(runs, [k for k in self.outputs if k in runs[0]])

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
                err[k] += float(np.square(out[k] - ref[k], dtype=np.float64).sum())
        return float(np.mean([err[k] / max(self.energy[k], 1e-30) for k in self.outputs]))

    def segmented(self, names: list[str]) -> Callable[[dict[str, np.ndarray]], float]:
        """The same distortion for overrides of ``names``, computed from the first segment they
        change on (runtime/stream.SegmentRun): everything before it is run once for all
        measurements, so one site costs the part of the model from its block on -- half a
        forward pass on average.  Where the model cannot be cut, this distortion itself."""
        if self.probe.model is None:
            return self
        run = SegmentRun(self.probe, names, self.data, self.batch_size)

        def measure(overrides: dict[str, np.ndarray]) -> float:
            first = min((k for k in map(run.first_segment, overrides) if k is not None), default=None)
            return 0.0 if first is None else self.of_outputs(run.outputs_from(first, overrides))
        return measure

