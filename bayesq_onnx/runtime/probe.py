"""A working copy of the model for measurement: site weights become graph inputs (so one session
can run any mix of candidate weights) and chosen intermediate tensors become extra outputs.
:class:`ConeRun` runs only the part of it that some site weights reach, :class:`SegmentRun` that part
cut into segments that run one at a time (graph/cone.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ..calib.readers import batches
from ..errors import BayesQError
from ..graph.cone import all_nodes, backward_slice, forward_cone, has_subgraphs, segments, submodel
from ..graph import model_io
from ..graph.model_io import save_model_atomic, to_array
from .session import make_session, session_options


def _session(model, one_thread: bool = False):
    """Measurement sessions never spin-wait between runs: they alternate with numpy work, on this
    thread and on the other workers' (MiniLM's proxy measurements: 18% less wall time).  The cone
    sessions run one site each, and the sites run side by side (``parallel.py``), so each gets one
    thread (another 13%); always one, whatever the worker count, so that a measurement -- and the
    plan built on it -- never depends on it."""
    so = session_options(**{"session.intra_op.allow_spinning": "0"})
    if one_thread:
        so.intra_op_num_threads = 1
    return make_session(model, sess_options=so)


class Probe:
    def __init__(self, model: onnx.ModelProto, weight_names: list[str], extra_outputs: list[str] = ()):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        names = set(weight_names)
        self.weights: dict[str, np.ndarray] = {}
        keep = []
        casts = []
        for t in m.graph.initializer:
            if t.name in names:
                # fed as float32, as the numerics make them; a float16 / bfloat16 weight is rounded
                # to its type inside the graph, as the stored model's values are
                self.weights[t.name] = to_array(t).astype(np.float32)
                m.graph.input.append(helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims)))
                if t.data_type != onnx.TensorProto.FLOAT:
                    casts.append(helper.make_node("Cast", [t.name], [t.name + "__bq_typed"], to=t.data_type,
                                                  name=t.name + "__bq_cast"))
            else:
                keep.append(t)
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        if casts:
            typed = {c.input[0]: c.output[0] for c in casts}
            for n in all_nodes(m.graph):   # readers inside subgraphs see the Cast's output from the outer scope
                n.input[:] = [typed.get(i, i) for i in n.input]
            nodes = casts + list(m.graph.node)
            del m.graph.node[:]
            m.graph.node.extend(nodes)
        self.outputs = [o.name for o in m.graph.output]
        have = set(self.outputs)
        for name in dict.fromkeys(extra_outputs):
            if name not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
        self._tmp = None
        # the cut-down copies of ConeRun are built from this one: only where no subgraph can hide
        # a dependency and every part serializes in one protobuf
        fits = m.ByteSize() <= model_io.PROTO_LIMIT
        self.model = m if fits and not has_subgraphs(m.graph) else None
        self._proto = m if fits else None    # what a pickled copy rebuilds its session from
        if not fits:
            self._tmp = tempfile.TemporaryDirectory(prefix="bayesq-probe-")
            path = save_model_atomic(m, Path(self._tmp.name) / "probe.onnx")
            self.session = _session(path)
        else:
            self.session = _session(m)

    # Pickled (to measure on Ray's workers: parallel.py) as the model, its session rebuilt on
    # unpickling: onnxruntime sessions do not pickle.
    def __getstate__(self):
        if self._proto is None:
            raise BayesQError("--ray: models over 2 GB are not measured on Ray yet (run without --ray)")
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session = _session(self._proto)

    def run(self, data: dict[str, np.ndarray], batch_size: int, outputs: list[str] | None = None,
            overrides: dict[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Outputs batch by batch, with ``overrides`` replacing some site weights."""
        outputs = outputs or self.outputs
        weights = {**self.weights, **(overrides or {})}
        for feed in batches(data, batch_size):
            yield dict(zip(outputs, self.session.run(outputs, {**feed, **weights})))


class ConeRun:
    """The probe's outputs on fixed ``data`` with only the weights ``names`` varying: the tensors
    entering their forward cone are computed once (by the part of the graph that feeds them), then
    each :meth:`run` executes just the cone.  ``outputs``: the ones the cone changes (the others
    equal the reference run's)."""

    def __init__(self, probe: Probe, names: list[str], data: dict[str, np.ndarray], batch_size: int,
                 outputs: list[str]):
        if probe.model is None:
            raise ValueError("this model cannot be cut (subgraphs, or over 2 GB)")
        g = probe.model.graph
        cone = forward_cone(g, set(names))
        self.outputs = [o for o in outputs if o in cone.outputs]
        graph_inputs = {v.name: v for v in g.input}
        computed = [f for f in cone.frontier if f not in graph_inputs]
        fed = [f for f in cone.frontier if f in graph_inputs and f not in probe.weights]
        self._weights = {k: probe.weights[k] for k in [*names, *(f for f in cone.frontier if f in probe.weights)]}
        inputs = [graph_inputs[k] for k in [*fed, *self._weights]]
        if not (computed and self.outputs):
            computed = []
        else:
            # not cut off from the cone: a Shape of a cone tensor (in the cone, yet its output is the
            # same whatever the weights) may feed the frontier, e.g. an attention mask sized by it
            prefix = backward_slice(g.node, computed)
            reads = [k for k in dict.fromkeys(i for n in prefix for i in n.input) if k in graph_inputs]
            session = _session(submodel(probe.model, prefix, [graph_inputs[k] for k in reads], computed), True)
        self._feeds = []
        for feed in batches(data, batch_size):
            self._feeds.append({k: feed[k] for k in fed})
            if computed:
                values = session.run(computed, {k: feed[k] if k in feed else probe.weights[k] for k in reads})
                self._feeds[-1].update(zip(computed, values))
        if computed:
            first = self._feeds[0]
            inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(first[k].dtype), None)
                       for k in computed]
        self.session = _session(submodel(probe.model, cone.nodes, inputs, self.outputs), True) if self.outputs else None

    def run(self, overrides: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """:attr:`outputs` batch by batch, with ``overrides`` replacing some of the weights."""
        if self.session is None:   # the weights reach no output
            return
        weights = {k: overrides.get(k, v) for k, v in self._weights.items()}
        for feed in self._feeds:
            yield dict(zip(self.outputs, self.session.run(self.outputs, {**feed, **weights})))


class SegmentRun:
    """The probe's model on fixed ``data``, cut into the segments of the site weights' cone
    (graph/cone.segments), each its own session: the model from any segment on, with some
    weights replaced, runs from the reference values of that segment's start, which -- with the
    tensors the segments read from outside the cone (masks, positions: independent of the
    weights) -- come from one run of the reference model."""

    def __init__(self, probe: Probe, names: list[str], data: dict[str, np.ndarray], batch_size: int):
        if probe.model is None:
            raise ValueError("this model cannot be cut (subgraphs, or over 2 GB)")
        m, g = probe.model, probe.model.graph
        self.segments = segments(g, set(names), probe.outputs)
        self.outputs = probe.outputs
        inside = {o for sg in self.segments for n in sg.nodes for o in n.output}
        graph_inputs = {v.name: v for v in g.input}
        inits = {t.name for t in g.initializer}
        reads = [list(dict.fromkeys(i for n in sg.nodes for i in n.input if i and i not in inside and i not in inits))
                 for sg in self.segments]
        side = list(dict.fromkeys(t for r in reads for t in r if t not in graph_inputs))
        cuts = [sg.end for sg in self.segments[:-1]]
        # the reference run: every cut and every outside tensor a segment reads, batch by batch
        wanted = list(dict.fromkeys(cuts + side))
        self.values = [dict(feed) for feed in batches(data, batch_size)]
        if wanted:
            prefix = submodel(m, backward_slice(g.node, wanted), list(graph_inputs.values()), wanted)
            session = _session(prefix, True)
            for v in self.values:
                v.update(zip(wanted, session.run(wanted, {k: v[k] if k in v else probe.weights[k]
                                                          for k in graph_inputs})))
        first = self.values[0]
        self.weights = probe.weights
        self._first: dict[str, int] = {}       # weight -> the first segment reading it
        for b, sg in reversed(list(enumerate(self.segments))):
            self._first.update((i, b) for n in sg.nodes for i in n.input if i in probe.weights)
        self._model, self._parts = m, []      # each segment's (inputs, outputs)
        for sg, r in zip(self.segments, reads):
            start = [sg.start] if sg.start is not None else []
            inputs = [graph_inputs[k] if k in graph_inputs else
                      helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(first[k].dtype), None)
                      for k in dict.fromkeys(start + r)]
            outs = [sg.end] if sg.end is not None else [o for o in self.outputs if o in inside]
            self._parts.append((inputs, outs))
        self._reads = [[v.name for v in inputs] for inputs, _ in self._parts]
        self._open()

    def _open(self) -> None:
        self._sessions = [(_session(submodel(self._model, sg.nodes, inputs, outs), True), outs)
                          for sg, (inputs, outs) in zip(self.segments, self._parts)]

    # pickled (parallel.py's Ray workers) without the sessions, rebuilt on unpickling
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sessions"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def first_segment(self, name: str) -> int | None:
        """The first segment that reads weight ``name`` (None: none does)."""
        return self._first.get(name)

    def run(self, b: int, overrides: dict[str, np.ndarray], start: list[np.ndarray] | None = None
            ) -> list[dict[str, np.ndarray]]:
        """Segment ``b``'s outputs (its end cut, or the graph outputs it computes) batch by batch,
        from ``start`` (its start cut's values per batch; default the reference's)."""
        session, outs = self._sessions[b]
        sg, result = self.segments[b], []
        for i, ref in enumerate(self.values):
            feed = {}
            for k in self._reads[b]:
                if k in overrides:
                    feed[k] = overrides[k]
                elif k in self.weights:
                    feed[k] = self.weights[k]
                elif start is not None and k == sg.start:
                    feed[k] = start[i]
                else:
                    feed[k] = ref[k]
            result.append(dict(zip(outs, session.run(outs, feed))))
        return result

    def tail(self, b: int, values: list[np.ndarray], overrides: dict[str, np.ndarray] | None = None
             ) -> list[dict[str, np.ndarray]]:
        """The graph outputs computed from segment ``b``'s end cut at ``values`` (per batch): the
        segments after ``b`` one after the other, with ``overrides`` of the weights they read."""
        for c in range(b + 1, len(self.segments)):
            out = self.run(c, overrides or {}, values)
            if self.segments[c].end is None:
                return out
            values = [o[self.segments[c].end] for o in out]
        raise ValueError(f"segment {b} is the last")
