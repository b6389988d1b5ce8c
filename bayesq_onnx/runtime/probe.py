"""A working copy of the model for measurement: site weights become graph inputs (so one session
can run any mix of candidate weights) and chosen intermediate tensors become extra outputs."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ..calib.readers import batches
from ..graph.model_io import save_model_atomic, to_array
from .session import make_session

_PROTO_LIMIT = 2**31 - 1


class Probe:
    def __init__(self, model: onnx.ModelProto, weight_names: list[str], extra_outputs: list[str] = ()):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        names = set(weight_names)
        self.weights: dict[str, np.ndarray] = {}
        keep = []
        for t in m.graph.initializer:
            if t.name in names:
                self.weights[t.name] = to_array(t)
                m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            else:
                keep.append(t)
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        self.outputs = [o.name for o in m.graph.output]
        have = set(self.outputs)
        for name in dict.fromkeys(extra_outputs):
            if name not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
        self._tmp = None
        if m.ByteSize() > _PROTO_LIMIT:
            self._tmp = tempfile.TemporaryDirectory(prefix="bayesq-probe-")
            path = save_model_atomic(m, Path(self._tmp.name) / "probe.onnx")
            self.session = make_session(path)
        else:
            self.session = make_session(m)

    def run(self, data: dict[str, np.ndarray], batch_size: int, outputs: list[str] | None = None,
            overrides: dict[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Outputs batch by batch, with ``overrides`` replacing some site weights."""
        outputs = outputs or self.outputs
        weights = {**self.weights, **(overrides or {})}
        for feed in batches(data, batch_size):
            yield dict(zip(outputs, self.session.run(outputs, {**feed, **weights})))
