"""The probe's model run one segment at a time (graph/cone.segments of every site weight), so that
data passes through a model far larger than memory with only one segment's tensors live: the
analysis reads each segment's site activations as it goes and replaces a segment's weights with
their quantized values as it runs.  A model that cannot be cut (subgraphs) is one segment: the
probe's whole session."""
from __future__ import annotations

import threading

import numpy as np
from onnx import TensorProto, helper

from ..calib.readers import batches
from ..graph.cone import backward_slice, segments, submodel
from ..graph.model_io import ArraySpill
from ..graph.shapes import fold_shapes
from ..parallel import run_slot
from .probe import Probe, _session


class Stream:
    def __init__(self, probe: Probe, names: list[str], activations: dict[str, tuple[str, ...]] | None = None):
        """``names``: the site weights (the cuts are those of their forward cone); ``activations``:
        the inputs each of them reads, to be captured (:attr:`capture`)."""
        self.probe, self.weights = probe, probe.weights
        self._lock = threading.Lock()   # sessions are made on first use, by whichever thread comes first
        activations = activations or {}
        acts = list(dict.fromkeys(a for n in names for a in activations.get(n, ())))
        if probe.model is None:
            self._whole(names, acts)
            return
        names = set(names)
        m, g = probe.model, probe.model.graph
        self._model = m
        segs = segments(g, names, probe.outputs)
        self.graph_inputs = {v.name: v for v in g.input}
        inside = {o for sg in segs for n in sg.nodes for o in n.output}
        inits = {t.name for t in g.initializer}
        self.reads, self.outs, self.ends, self._sessions = [], [], [], []
        made = [{o for n in sg.nodes for o in n.output} for sg in segs]
        for sg, made_here in zip(segs, made):
            reads = list(dict.fromkeys(i for n in sg.nodes for i in n.input if i and i not in made_here and i not in inits))
            outs = [sg.end] if sg.end is not None else [o for o in probe.outputs if o in inside]
            self.reads.append(reads)
            self.outs.append(outs)
            self.ends.append(sg.end)
            self._sessions.append({})   # by the outputs they compute and the weights they read as
                                        # stored, made on first use (when the types of their inputs are known)
        self.segments = segs
        # each site activation is captured once, in the first segment where a site reads it along
        # with its weight (a tied table: the indices in the first, the head's input in the last)
        self.capture: list[list[str]] = [[] for _ in segs]
        where: dict[str, int] = {}
        for name in names:
            for a in activations.get(name, ()):
                k = next((k for k, sg in enumerate(segs) if name in self.reads[k] and
                          any(a in n.input for n in sg.nodes)), None)
                if k is not None:
                    where[a] = min(k, where.get(a, k))
        for a, k in where.items():
            self.capture[k].append(a)
            if a in made[k] and a not in self.outs[k]:
                self.outs[k].append(a)
        # what the segments read from outside them that is neither a graph input nor a cut: masks,
        # positions (independent of the weights), computed once per batch by their own slice
        cuts = {sg.start for sg in segs if sg.start is not None}
        self.side = list(dict.fromkeys(t for r in self.reads for t in r
                                       if t not in self.graph_inputs and t not in cuts and t not in inside))
        self._side_sessions = {}   # by the graph inputs' shapes, made on first use (they do not pickle: parallel.py)
        # the segments that read each weight
        self.readers: dict[str, list[int]] = {}
        for k, r in enumerate(self.reads):
            for t in r:
                if t in names:
                    self.readers.setdefault(t, []).append(k)

    def _whole(self, names, acts) -> None:
        p = self.probe
        self.segments = [None]
        self.graph_inputs = {}
        self.reads = [[i.name for i in p.session.get_inputs()]]
        self.outs = [list(dict.fromkeys([*p.outputs, *acts]))]
        self.capture = [acts]
        self.ends = [None]
        self.side = []
        self._side_sessions = {}
        self._sessions = [{}]
        self._model = None
        self.readers = {n: [0] for n in names}

    def __len__(self) -> int:
        return len(self.reads)

    def last_reader(self, name: str) -> int:
        """The last segment that reads weight ``name`` (a tied embedding: the head's), or the last."""
        return max(self.readers.get(name, [len(self) - 1]))

    def first_reader(self, name: str) -> int | None:
        """The first segment that reads weight ``name`` (None: none does)."""
        return min(self.readers[name]) if name in self.readers else None

    def start(self, data: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
        """One state per batch: its graph inputs and the side tensors; :meth:`advance` adds each cut."""
        states = [dict(feed) for feed in batches(data, batch_size)]
        for st in states if self.side else ():
            session, reads = self._side(st)
            st.update(zip(self.side, session.run(self.side, {k: st[k] if k in st else self.weights[k] for k in reads})))
        return states

    def _side(self, state: dict[str, np.ndarray]):
        """The session computing the side tensors of batches of ``state``'s input shapes, and the graph
        inputs it reads: the slice of the graph that computes them, its ``Shape`` nodes folded for
        those shapes (``fold_shapes``), so that it reads the masks, not the whole model (a
        0.1B Llama's took 0.5 s a batch, 0.6 of a forward pass, before: its reshape targets are
        the shapes of its hidden states)."""
        key = tuple((k, state[k].shape) for k in self.graph_inputs if k in state)
        with self._lock:
            if key not in self._side_sessions:
                bound = {k: helper.make_tensor_value_info(k, v.type.tensor_type.elem_type, list(self._value(k, state).shape))
                         if k in state or k in self.weights else v for k, v in self.graph_inputs.items()}
                part = backward_slice(fold_shapes(self._model, list(bound.values())), self.side)
                reads = [k for k in dict.fromkeys(i for n in part for i in n.input) if k in self.graph_inputs]
                self._side_sessions[key] = (_session(submodel(self._model, part, [bound[k] for k in reads], self.side),
                                                     True, self.probe.external), reads)
            return self._side_sessions[key]

    def advance(self, k: int, states: list[dict[str, np.ndarray]], overrides: dict[str, np.ndarray] | None = None,
                keep: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        """Run segment ``k`` on each state (with ``overrides`` of the weights it reads): the state
        moves on to its end cut (the start cut is dropped), and its outputs -- the site activations
        captured in it (:attr:`capture`), and at the last segment the graph outputs -- are returned
        per batch; only those named in ``keep``, if given (a language model's logits are 200 MB a
        batch of 8 x 128 tokens at 49152 words: a pass that reads activations should not hold them).
        What nobody keeps is not computed: onnxruntime runs every node of a session whatever is
        fetched, so a segment run for fewer outputs has a session of its own, cut down to them (a
        pass reading the head's input skips the head itself: on the 0.1B Llama a 768 x 32000
        MatMul, on SmolLM2 a fifth of the forward pass)."""
        overrides = overrides or {}
        wanted = None if keep is None else [o for o in self.outs[k] if o in keep or o == self.ends[k]]
        # the float16 weights a run does not replace are read as stored (mapped): onnxruntime widens
        # each as its reader runs, then frees it, where widened here the segment's would be held for
        # the run (a 1B Llama's MLP: 138 MB a run; a measurement replaces one of its weights)
        session, outs, reads, half = self._session(k, states[0], wanted, overrides.keys())
        start = self.segments[k].start if self.segments[k] is not None else None
        results = []
        with run_slot():
            # the weights the session reads, once for every batch
            weights = {t: overrides[t] if t in overrides else self.weights.stored(t) if t in half else self.weights[t]
                       for t in reads if t in overrides or t in self.weights}
            for st in states:
                feed = {t: weights[t] if t in weights else st[t] for t in self.reads[k] if t in weights or t in st}
                out = dict(zip(outs, session.run(outs, {t: feed[t] for t in reads}))) if outs else {}
                for a in self.capture[k]:     # read, not computed, here: a graph input, a side tensor, the start cut
                    if a not in out and a in feed:
                        out[a] = feed[a]
                if start is not None:
                    st.pop(start, None)
                if self.ends[k] is not None:
                    st[self.ends[k]] = out[self.ends[k]]
                results.append(out if keep is None else {a: out[a] for a in keep})
        return results

    # pickled (parallel.py's Ray workers) without sessions: they are made again on first use
    def __getstate__(self):
        return {k: v for k, v in {**self.__dict__, "_sessions": [{} for _ in self._sessions],
                                  "_side_sessions": {}}.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _session(self, k: int, state: dict[str, np.ndarray], wanted: list[str] | None = None, replaced=()):
        """Segment ``k``'s session computing ``wanted`` of its outputs (None: all): the session, the
        outputs it fetches, the tensors it reads and the float16 weights it reads as stored -- all
        but those ``replaced`` (whose replacements must reach their readers unrounded): the probe's
        Cast of each to float16 then casts to its own type, which onnxruntime drops, and its reader
        gets the float16 weight as the model has it.  One session per set of replaced weights a
        segment is run with (a measured site's own, a sequential pass's block)."""
        if self._model is None:        # the whole model, uncut
            return self.probe.session, self.outs[0], self.reads[0], frozenset()
        outs = [o for o in (self.outs[k] if wanted is None else wanted) if o not in self.graph_inputs]
        half = frozenset(t for t in self.reads[k] if t in self.weights and t not in replaced
                         and self.weights.stored(t).dtype == np.float16)
        with self._lock:
            if (tuple(outs), half) not in self._sessions[k]:
                nodes = self.segments[k].nodes
                if outs != [o for o in self.outs[k] if o not in self.graph_inputs]:
                    nodes = backward_slice(nodes, outs)
                used = {i for n in nodes for i in n.input}
                reads = [t for t in self.reads[k] if t in used]
                inputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT16, list(self.weights.stored(t).shape))
                          if t in half else
                          self.graph_inputs[t] if t in self.graph_inputs else
                          helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(self._value(t, state).dtype),
                                                        None)
                          for t in reads]
                session = _session(submodel(self._model, nodes, inputs, outs), True, self.probe.external) if outs else None
                self._sessions[k][tuple(outs), half] = session, outs, reads
        return (*self._sessions[k][tuple(outs), half], half)

    def _value(self, t: str, state: dict[str, np.ndarray]) -> np.ndarray:
        """``t``'s value in ``state``, or the weight as stored (for its shape: not widened)."""
        return self.weights.stored(t) if t in self.weights else state[t]


class SegmentRun:
    """The model on fixed ``data`` from any segment on, with some weights replaced: the states at
    every segment's start come from one reference pass (with the masks and positions the segments
    read beside the cut, independent of the weights), so a measurement runs only from the first
    segment its weights change.  Each kept state holds one cut: a few MB on a few samples."""

    def __init__(self, probe: Probe, names: list[str], data: dict[str, np.ndarray], batch_size: int):
        self.stream = stream = Stream(probe, names)
        states = stream.start(data, batch_size)
        self.starts, self._spill = [], ArraySpill()
        for k in range(len(stream)):
            # the other arrays (masks, positions) are shared, not copied; each cut waits on disk
            # (44 cuts of a 1B Llama on 8 x 64 tokens: 184 MB)
            cut = stream.segments[k].start if stream.segments[k] is not None else None
            self.starts.append([{**st, **self._spill.put({cut: st[cut]})} if cut in st else dict(st) for st in states])
            stream.advance(k, states, None, [])

    def first_segment(self, name: str) -> int | None:
        return self.stream.first_reader(name)

    def outputs_from(self, k: int, overrides: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The graph outputs per batch, running segments ``k`` onwards with ``overrides``."""
        return self._run(k, len(self.stream), overrides)[1]

    def cut_from(self, k: int, stop: int, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The cut segment ``stop`` starts from, per batch, running segments ``k`` to ``stop - 1``
        with ``overrides``; its reference value is ``starts[stop][b][cut]``."""
        cut = self.stream.segments[stop].start
        return [st[cut] for st in self._run(k, stop, overrides)[0]]

    def _run(self, k: int, stop: int, overrides: dict[str, np.ndarray]):
        """The states after segments ``k`` to ``stop - 1`` with ``overrides``, and the last one's outputs."""
        states, out = [dict(st) for st in self.starts[k]], None
        for j in range(k, stop):
            out = self.stream.advance(j, states, overrides)
        return states, out
