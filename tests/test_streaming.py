"""The streamed analysis (docs/design.md, "Streaming"): weights read memory-mapped from disk, data
passed through the model a segment at a time -- and the same numbers and bytes as the whole model
held at once."""
from __future__ import annotations

import gc
import os
import pickle

import numpy as np
import onnx
import pytest

import models
from bayesq_onnx import Analysis, Recipe, compress
from bayesq_onnx.calib.capture import capture_stats
from bayesq_onnx.calib.readers import batches
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.graph import model_io
from bayesq_onnx.plan.check import Contender, check_plans, decoded
from bayesq_onnx.plan.planner import uniform_plans
from bayesq_onnx.plan.proxy import OutputDistortion

CASES = {"residual": (models.residual, models.residual_data), "tied": (models.tied, models.tied_data),
         "cnn": (models.cnn, models.cnn_data), "loop": (models.loop, models.loop_data)}


def _save_external(tmp_path, name, model) -> str:
    p = tmp_path / f"{name}.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)   # onnx.save moves the tensors of the proto it is given out to the file
    onnx.save(copy, str(p), save_as_external_data=True, location=f"{name}.bin", size_threshold=256)
    return str(p)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inline_external_and_in_memory_models_give_the_same_bytes(tmp_path, case):
    """One model three ways -- a proto in memory, an inline file (spilled to a temp file and
    mapped), an external-data file (mapped where it is) -- compresses to the same bytes."""
    build, data = CASES[case]
    m = build()
    inline = tmp_path / f"{case}.onnx"
    onnx.save(m, str(inline))
    outs = []
    for i, src in enumerate([m, str(inline), _save_external(tmp_path, case + "_ext", m)]):
        out = tmp_path / f"q{i}.onnx"
        compress(src, Recipe(bits=3.0), calib=data(), output=out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_weights_are_memory_mapped_from_an_external_data_file(tmp_path):
    src = _save_external(tmp_path, "mlp", models.mlp())
    an = Analysis(src, Recipe(bits=4.0), calib=models.mlp_data())
    w = an.probe.weights["W1"]
    assert isinstance(w, np.memmap) and not w.flags.writeable
    np.testing.assert_array_equal(w, onnx.numpy_helper.to_array(next(t for t in models.mlp().graph.initializer
                                                                      if t.name == "W1")))


def test_half_precision_weights_stay_mapped_and_are_widened_only_when_read(tmp_path):
    """A float16 model's site weights are not held widened (that would be twice the model in the
    process's own memory): stored mapped; a read widens, readers share the copy while one of them
    holds it, and once nobody does it is gone (the next read widens again)."""
    import gc
    import weakref
    from bayesq_onnx.graph.float16 import to_half
    src = _save_external(tmp_path, "half", to_half(models.mlp(), "float16", keep_io_types=True))
    w = Analysis(src, Recipe(bits=4.0), calib=models.mlp_data()).probe.weights
    stored = w.stored("W1")
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16
    a, b = w["W1"], w["W1"]
    assert a.dtype == np.float32 and a is b and not a.flags.writeable and not np.shares_memory(a, stored)
    np.testing.assert_array_equal(a, stored.astype(np.float32))
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
    np.testing.assert_array_equal(w["W1"], stored.astype(np.float32))


def test_a_half_precision_model_runs_whole_a_segment_at_a_time():
    """Whole-model runs of a float16 model (reference outputs, the plan check's) go segment by segment,
    each segment's weights widened for its run, and give the whole session's outputs."""
    from bayesq_onnx.graph.float16 import to_half
    probe = Analysis(to_half(models.residual(), "float16", keep_io_types=True), Recipe(bits=4.0),
                     calib=models.residual_data()).probe
    data = models.residual_data()
    stream = probe._segments()
    assert stream is not None and len(stream) > 1
    got = list(probe.run(data, 16))
    weights = {k: probe.weights[k] for k in probe.weights}
    for out, feed in zip(got, batches(data, 16)):
        want = dict(zip(probe.outputs, probe.session.run(probe.outputs, {**feed, **weights})))
        for k in probe.outputs:
            # float16 activations: the sessions round an intermediate differently where onnxruntime
            # fuses across a cut; seen under one float16 ulp of the outputs' largest value, two allowed
            ulp = float(np.spacing(np.float16(np.abs(want[k]).max())))
            np.testing.assert_allclose(out[k], want[k], rtol=0, atol=2 * ulp)


def test_a_half_precision_segment_run_widens_only_the_weights_it_replaces(monkeypatch):
    """A segment run feeds the float16 weights it does not replace as stored, widening none of them
    (onnxruntime widens each as its reader runs): with no replacement, and with one (a measured
    site's); both give the outputs of a run on float32 weights (every weight replaced by its
    widened self) bit for bit."""
    from bayesq_onnx.graph.float16 import to_half
    from bayesq_onnx.runtime import probe as probe_mod
    from bayesq_onnx.runtime.stream import Stream
    an = Analysis(to_half(models.residual(), "float16", keep_io_types=True), Recipe(bits=4.0),
                  calib=models.residual_data())
    stream = Stream(an.probe, [s.name for s in an.sites])
    widened = []
    monkeypatch.setattr(probe_mod, "widen", lambda a: widened.append(a.shape) or a.astype(np.float32))
    assert len(stream) > 1
    for k in range(len(stream)):
        names = [t for t in stream.reads[k] if t in stream.weights]
        assert names and all(stream.weights.stored(t).dtype == np.float16 for t in names)
        every = {t: stream.weights[t] for t in names}    # widened, before the runs below count
        one = {names[-1]: every[names[-1]]}
        states = [stream.start(an.fit, 16) for _ in range(3)]
        for j in range(k):
            for st in states:
                stream.advance(j, st)
        widened.clear()
        got = [stream.advance(k, states[0]), stream.advance(k, states[1], one)]
        assert widened == []
        want = stream.advance(k, states[2], every)
        # sessions by the weights read as stored: all, all but the replaced one, none
        assert {len(half) for _, half in stream._sessions[k]} == {len(names), len(names) - 1, 0}
        for run in got:
            for g, w in zip(run, want):
                assert g.keys() == w.keys() and all(np.array_equal(g[n], w[n]) for n in g)


def test_widening_is_exact_for_every_float16():
    """onnxruntime's Cast widens as numpy does, bit for bit, over all 65536 float16 bit patterns
    (NaNs compared as NaNs: their payloads are not values), in any shape."""
    from bayesq_onnx.runtime.probe import widen
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 16, 16)
    got, want = widen(h), h.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == h.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    f = np.ones(3, np.float32)
    assert widen(f) is f


def test_array_spill_maps_large_arrays_back_and_keeps_small_ones():
    spill = model_io.ArraySpill()
    big = np.arange(model_io.SPILL_BYTES // 4 + 1, dtype=np.float32)
    small = np.arange(10, dtype=np.uint8)
    out = spill.put({"big": big, "small": small})
    assert isinstance(out["big"], np.memmap) and not out["big"].flags.writeable
    np.testing.assert_array_equal(out["big"], big)
    assert out["small"] is small
    assert spill.put({"again": out["big"]})["again"] is out["big"]   # already on disk: not written twice
    directory = spill._dir.name
    shipped = pickle.loads(pickle.dumps(spill))   # a Ray worker's copy spills into its own directory
    assert shipped._dir is None
    del spill, out
    gc.collect()
    assert not os.path.exists(directory)


@pytest.mark.parametrize("case", ["residual", "tied", "cnn"])
def test_streamed_statistics_equal_one_pass_of_the_whole_model(case):
    """Segment by segment (each site's activations read in the segment that reads its weight) the
    statistics are those of one whole-model pass."""
    build, data = CASES[case]
    an = Analysis(build(), Recipe(bits=4.0), calib=data())
    assert len(an.stream) > 1          # really cut
    whole = capture_stats(an.probe, an.sites, an.fit, an.batch)
    streamed = an.quantizers()
    for s in an.sites:
        want, got = whole[s.name].xtx, streamed[s.name].xtx
        if want is None:
            assert got is None
        else:   # the same float64 sums of the same float32 activations, from other sessions: rounding only
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("case", ["residual", "tied"])
def test_streamed_plan_check_equals_the_whole_model_distortion(case):
    """The plan check's score of a plan, run a segment at a time on weights decoded from the packed
    tensors, is the whole model's output distortion with all those weights at once."""
    build, data = CASES[case]
    an = Analysis(build(), Recipe(bits=4.0), calib=data())
    plans = uniform_plans(an.sites, an.candidates, 3.0 * an.n_weights)[:2]
    contenders = [Contender(p) for p in plans]
    packed, _, _ = an._round(contenders)
    _, report = check_plans(contenders, packed, an.sites, an.stream, an.probe, an.held, an.batch)
    whole = OutputDistortion(an.probe, an.held, an.batch)
    for c, arrays, entry in zip(contenders, packed, report["candidates"]):
        d = whole({s.name: decoded(c, arrays[s.name], s) for s in an.sites if s.name in arrays})
        assert entry["distortion"] > 0
        # float32 activations through differently cut sessions: relative 1e-5 covers their rounding
        assert entry["distortion"] == pytest.approx(d, rel=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_pass_reading_activations_computes_no_graph_output(case):
    """A pass that keeps only the site activations runs sessions cut down to them (onnxruntime would
    compute every node of a session, a language model's head included, whatever is fetched), and
    reads the same activations, bit for bit, as sessions computing everything."""
    build, data = CASES[case]
    an = Analysis(build(), Recipe(bits=3.0), calib=data())
    reading, full = an.stream, Analysis(build(), Recipe(bits=3.0), calib=data()).stream
    a, b = reading.start(an.fit, an.batch), full.start(an.fit, an.batch)
    for k in range(len(reading)):
        kept, every = reading.advance(k, a, None, reading.capture[k]), full.advance(k, b)
        for got, want in zip(kept, every):
            assert set(got) == set(reading.capture[k])
            assert all(np.array_equal(got[n], want[n]) for n in got)
    if reading._model is None:   # uncut (control flow): the probe's one session
        return
    outputs = set(an.probe.outputs)
    assert outputs <= {o for per_k in full._sessions for outs, _ in per_k for o in outs}
    assert not outputs & {o for per_k in reading._sessions for outs, _ in per_k for o in outs}


def test_missing_external_data_is_a_one_line_error(tmp_path):
    src = _save_external(tmp_path, "mlp", models.mlp())
    (tmp_path / "mlp.bin").unlink()
    with pytest.raises(BayesQError, match="external data of .* missing"):
        compress(src, Recipe(bits=4.0), calib=models.mlp_data())


def test_output_past_the_protobuf_limit_is_written_tensor_by_tensor(tmp_path, monkeypatch):
    """Past 2 GB (lowered here) the output's tensors go one by one to ``<name>.data``, copied from
    the mapped input where they are not quantized; the model reads back as the one written whole."""
    src = _save_external(tmp_path, "mlp", models.mlp())
    whole = compress(src, Recipe(bits=3.0), calib=models.mlp_data(), output=tmp_path / "whole.onnx")
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 1000)
    compress(src, Recipe(bits=3.0), calib=models.mlp_data(), output=tmp_path / "split.onnx")
    assert (tmp_path / "split.onnx.data").is_file()
    split = onnx.load(str(tmp_path / "split.onnx"))   # loads its external data back
    assert len(split.graph.initializer) == len(whole.model.graph.initializer)
    for a, b in zip(split.graph.initializer, whole.model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_side_tensors_come_from_the_inputs_shapes_not_from_a_forward_pass():
    """The residual model's blocks reshape by the Shape of the stream (a side tensor: read beside
    the cut, changed by no weight).  Its slice folds to constants for each batch shape: the side
    session reads no weight and runs no MatMul, and its values are the shapes the model computes,
    for full and for short batches alike."""
    from onnx import helper

    from bayesq_onnx.graph.cone import backward_slice
    from bayesq_onnx.graph.shapes import fold_shapes

    an = Analysis(models.residual(), Recipe(bits=3.0), calib=models.residual_data())
    stream, data = an.stream, models.residual_data(n=44)
    assert {"shp1", "shp2"} <= set(stream.side)
    states = stream.start(data, 16)                  # batches of 16, 16 and 12 rows
    for st in states:
        for k in range(3):
            np.testing.assert_array_equal(st[f"shp{k}"], [len(st["x"]), 64])
    assert len(stream._side_sessions) == 2          # one per batch shape
    for _, reads in stream._side_sessions.values():
        assert set(reads) <= {"x"}
    bound = [helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, [16, 64]) if v.name == "x" else v
             for v in stream.graph_inputs.values()]
    part = backward_slice(fold_shapes(stream._model, bound), stream.side)
    assert not any(n.op_type == "MatMul" for n in part)
    # without the input's size inference leaves the stream's shape open: nothing folds
    assert any(n.op_type == "MatMul" for n in backward_slice(fold_shapes(stream._model, list(stream.graph_inputs.values())),
                                                             stream.side))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_written_a_tensor_at_a_time_parses_as_itself(tmp_path, case):
    """model_io._write_whole: the model without its initializers, then one fragment per initializer
    (protobuf merges them), so that the packed tensors are never serialized all at once: the file
    parses to exactly the model, onnxruntime runs it, and the bytes repeat."""
    from bayesq_onnx.graph.model_io import _write_whole
    from bayesq_onnx.runtime.session import make_session

    build, data = CASES[case]
    m = build()
    m.doc_string, m.producer_name = "doc", "test"
    m.metadata_props.add(key="k", value="v")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _write_whole(m, str(a))
    _write_whole(m, str(b))
    assert onnx.load(str(a)).SerializeToString() == m.SerializeToString()
    assert a.read_bytes() == b.read_bytes()
    feed = {k: v[:4] for k, v in data().items()}
    np.testing.assert_array_equal(make_session(str(a)).run(None, feed)[0], make_session(m).run(None, feed)[0])


def test_a_blocks_room_is_asked_for_before_its_segment_runs(monkeypatch):
    """``Analysis.blocks(room=...)`` asks for each block's room before the segment that completes
    its statistics runs (a block that waits holds nothing: docs/design.md, "Streaming"), once per
    block, with the block's sites; the blocks it yields are the same as without it."""
    an = Analysis(models.residual(), Recipe(bits=3.0), calib=models.residual_data())
    ready = an._block_sites()
    log, advance = [], an.stream.advance

    def logged(k, *a, **kw):
        log.append(("segment", k))
        return advance(k, *a, **kw)

    monkeypatch.setattr(an.stream, "advance", logged)
    got = [[s.name for s in b] for b, _ in an.blocks(room=lambda sites: log.append(("room", [s.name for s in sites])))]
    assert got == [[s.name for s in b] for b in ready if b]
    for k, sites in enumerate(ready):
        if sites:
            i = log.index(("room", [s.name for s in sites]))
            assert log[i + 1] == ("segment", k)   # the room first, then the segment's forward pass


def test_forward_passes_with_their_weights_in_hand_are_as_many_as_the_workers(monkeypatch):
    """However many threads advance segments at once (the overlapped blocks' measurements), at most
    ``workers()`` hold a segment's weights inside a run (``parallel.run_slot``), and their results
    are those of the runs one at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from bayesq_onnx.parallel import use_workers
    an = Analysis(models.residual(), Recipe(bits=3.0), calib=models.residual_data())
    stream = an.stream
    want = [stream.advance(0, stream.start(an.fit, an.batch)) for _ in range(6)]
    inside, most, cv = [0], [0], threading.Condition()
    real = stream._session

    class Counted:   # the segment's session, counting the runs under way
        def __init__(self, session):
            self.session = session

        def run(self, *a):
            with cv:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                cv.notify_all()
                # wait for a second run where the slots let one in, so that the count does not hang on
                # the threads' timing (0.2 s: a run alone at the end only waits that long)
                cv.wait_for(lambda: inside[0] >= 2, timeout=0.2)
            try:
                return self.session.run(*a)
            finally:
                with cv:
                    inside[0] -= 1

    def counted(*a):
        session, *rest = real(*a)
        return Counted(session), *rest

    monkeypatch.setattr(stream, "_session", counted)
    with use_workers(2), ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: stream.advance(0, stream.start(an.fit, an.batch)), range(6)))
    assert most[0] == 2
    for g, w in zip(got, want):
        assert all(np.array_equal(g[b][n], w[b][n]) for b in range(len(w)) for n in w[b])
