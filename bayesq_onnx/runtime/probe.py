"""A working copy of the model for measurement: site weights become graph inputs (so one session
can run any mix of candidate weights) and chosen intermediate tensors become extra outputs.
:class:`ConeRun` runs only the part of it that some site weights reach (graph/cone.py); runtime/stream.py
runs it cut into segments, one at a time."""
from __future__ import annotations

import functools
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ..calib.readers import batches
from ..errors import BayesQError
from ..graph.cone import all_nodes, backward_slice, forward_cone, has_subgraphs, submodel
from ..graph import model_io
from ..graph.model_io import save_model_atomic
from .session import make_session, session_options


def _session(model, one_thread: bool = False, external=None):
    """Measurement sessions never spin-wait between runs: they alternate with numpy work, on this
    thread and on the other workers' (MiniLM's proxy measurements: 18% less wall time).  The cone
    sessions run one site each, and the sites run side by side (``parallel.py``), so each gets one
    thread (another 13%); always one, whatever the worker count, so that a measurement -- and the
    plan built on it -- never depends on it."""
    so = session_options(**{"session.intra_op.allow_spinning": "0"})
    # a streamed analysis holds a session per segment: each with its own arena, kept at its peak
    # (a head's logits, an MLP's widest activation) for the session's life, they would add up to
    # more than the model
    so.enable_cpu_mem_arena = False
    if one_thread:
        so.intra_op_num_threads = 1
    return make_session(model, sess_options=so, external_data=external)


class SiteWeights(Mapping):
    """The site weights, as float32: the type the numerics and the probe's inputs take.  A float32
    weight is its stored (memory-mapped) array itself; a float16 / bfloat16 one is widened when it
    is read and kept only while someone holds it: held for the run, the copies would be twice a
    half-precision model in the process's own memory, where streaming holds one block.  While a
    widened copy is alive every reader gets that one (read-only, as a mapped float32 weight is):
    a site's numerics, the measurements running through its segment and the passes beside them
    would otherwise each hold their own."""

    def __init__(self, stored: dict[str, np.ndarray]):
        self._stored = stored
        self._alive = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> np.ndarray:
        a = self._stored[name]
        if a.dtype == np.float32:
            return a
        with self._lock:      # one widening per weight while it lives, whichever thread reads first
            w = self._alive.get(name)
            if w is None:
                w = widen(a)
                w.flags.writeable = False
                self._alive[name] = w
        return w

    # pickled with the probe (parallel.py's Ray workers): the live copies and the lock stay here
    def __getstate__(self):
        return {"_stored": self._stored}

    def __setstate__(self, state):
        self.__init__(state["_stored"])

    def __contains__(self, name) -> bool:
        return name in self._stored

    def __iter__(self):
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def stored(self, name: str) -> np.ndarray:
        """Weight ``name`` as stored (its own type), not widened."""
        return self._stored[name]


def widen(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 (itself if it is).  float16 goes through onnxruntime's Cast, whose vectorized
    conversion takes 0.36 ns a value against numpy's 2.0 (every measurement reads half the model's
    weights: with numpy the float16 0.1B Llama took 117.8 s against 110.5, one run each); both are exact."""
    if a.dtype == np.float32:
        return a
    if a.dtype != np.float16:
        return a.astype(np.float32)
    return _cast_to_float32().run(None, {"h": np.ascontiguousarray(a)})[0]


@functools.cache
def _cast_to_float32():
    """The process's float16 -> float32 Cast session, made on first use."""
    g = helper.make_graph([helper.make_node("Cast", ["h"], ["f"], to=onnx.TensorProto.FLOAT)], "widen",
                          [helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT16, None)],
                          [helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, None)])
    return _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), True)


class Probe:
    def __init__(self, model: onnx.ModelProto, weight_names: list[str], extra_outputs: list[str] = (),
                 files: model_io.WeightFiles | None = None):
        """``files``: where ``model``'s external tensors are (``model_io.open_model``): site weights
        are then fed memory-mapped, and the sessions map the other initializers from there."""
        files = files or model_io.WeightFiles(None)
        self.external = files.base
        m = onnx.ModelProto()
        m.CopyFrom(model)
        names = set(weight_names)
        stored: dict[str, np.ndarray] = {}
        keep = []
        casts = []
        for t in m.graph.initializer:
            if t.name in names:
                # fed as float32, as the numerics make them; a float16 / bfloat16 weight is cast to its
                # type inside the graph (docs/design.md: where onnxruntime computes the reader in
                # float32 it drops the Casts, and a replacement's values reach it unrounded)
                stored[t.name] = files.array(t)
                m.graph.input.append(helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims)))
                if t.data_type != onnx.TensorProto.FLOAT:
                    casts.append(helper.make_node("Cast", [t.name], [t.name + "__bq_typed"], to=t.data_type,
                                                  name=t.name + "__bq_cast"))
            else:
                keep.append(t)
        self.weights = SiteWeights(stored)
        self._half = any(a.dtype != np.float32 for a in stored.values())   # whole runs go by segments (run)
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
        self._stream = None   # those segments, made on first use
        # the cut-down copies of ConeRun are built from this one: only where no subgraph can hide
        # a dependency and every part serializes in one protobuf
        fits = m.ByteSize() <= model_io.PROTO_LIMIT
        self.model = m if fits and not has_subgraphs(m.graph) else None
        self._proto = m if fits else None    # what a pickled copy rebuilds its session from
        if not fits:
            self._tmp = tempfile.TemporaryDirectory(prefix="bayesq-probe-")
            path = save_model_atomic(m, Path(self._tmp.name) / "probe.onnx", files)   # its data beside it
            self.session = _session(path)
        else:
            self.session = _session(m, external=self.external)

    # Pickled (to measure on Ray's workers: parallel.py) as the model, its session rebuilt on
    # unpickling: onnxruntime sessions do not pickle.
    def __getstate__(self):
        if self._proto is None:
            raise BayesQError("--ray: models over 2 GB are not measured on Ray yet (run without --ray)")
        return {k: v for k, v in self.__dict__.items() if k not in ("session", "_stream")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session, self._stream = _session(self._proto, external=self.external), None

    def run(self, data: dict[str, np.ndarray], batch_size: int, outputs: list[str] | None = None,
            overrides: dict[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Outputs batch by batch, with ``overrides`` replacing some site weights.  A model with
        half-precision site weights runs a segment at a time (runtime/stream.py), each segment's
        weights widened for its run: the whole-model session would need them all widened at once,
        twice the model in the process's own memory."""
        outputs = outputs or self.outputs
        overrides = overrides or {}
        stream = self._segments()
        if stream is not None and set(outputs) <= set(stream.outs[-1]):
            yield from self._run_segments(stream, data, batch_size, outputs, overrides)
            return
        weights = {k: overrides[k] if k in overrides else self.weights[k] for k in self.weights}
        for feed in batches(data, batch_size):
            yield dict(zip(outputs, self.session.run(outputs, {**feed, **weights})))

    def _segments(self):
        """The segments of a model with half-precision site weights (None: a float32 model, or one
        that cannot be cut)."""
        if self._stream is None and self._half and self.model is not None:
            from .stream import Stream   # stream.py builds on this module
            self._stream = Stream(self, list(self.weights))
        return self._stream

    def _run_segments(self, stream, data, batch_size, outputs, overrides) -> Iterator[dict[str, np.ndarray]]:
        last = len(stream) - 1
        for feed in batches(data, batch_size):
            states = stream.start(feed, batch_size)
            for k in range(last):
                stream.advance(k, states, overrides, [])
            yield stream.advance(last, states, overrides, outputs)[0]


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
        self._probe_weights = probe.weights
        self._weights = list(dict.fromkeys([*names, *(f for f in cone.frontier if f in probe.weights)]))
        inputs = [graph_inputs[k] for k in [*fed, *self._weights]]
        if not (computed and self.outputs):
            computed = []
        else:
            # not cut off from the cone: a Shape of a cone tensor (in the cone, yet its output is the
            # same whatever the weights) may feed the frontier, e.g. an attention mask sized by it
            prefix = backward_slice(g.node, computed)
            reads = [k for k in dict.fromkeys(i for n in prefix for i in n.input) if k in graph_inputs]
            session = _session(submodel(probe.model, prefix, [graph_inputs[k] for k in reads], computed), True,
                               probe.external)
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
        self.session = _session(submodel(probe.model, cone.nodes, inputs, self.outputs), True, probe.external) \
            if self.outputs else None

    def run(self, overrides: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """:attr:`outputs` batch by batch, with ``overrides`` replacing some of the weights."""
        if self.session is None:   # the weights reach no output
            return
        weights = {k: overrides[k] if k in overrides else self._probe_weights[k] for k in self._weights}
        for feed in self._feeds:
            yield dict(zip(self.outputs, self.session.run(self.outputs, {**feed, **weights})))
