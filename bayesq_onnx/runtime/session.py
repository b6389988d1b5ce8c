"""onnxruntime sessions for the models we read and write."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from ..errors import BayesQError
from ..graph import model_io
from ..graph.cone import all_nodes, subgraphs
from ..graph.shapes import leading_dims, packed_outputs, rows_follow
from . import custom_ops, tune

DEFAULT_PROVIDERS = ["CPUExecutionProvider"]


def session_options(providers=None, **entries) -> ort.SessionOptions:
    """Options with the bayesq ops registered: the build with the CUDA ops where ``providers`` (the
    session's) include ``CUDAExecutionProvider`` (custom_ops.register); ``entries``: session config entries."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # onnxruntime's warnings are not ours to show users
    # keep DequantizeLinear->MatMul exact: without this ORT fuses it into int8-activation MatMulNBits
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for k, v in entries.items():
        so.add_session_config_entry(k, str(v))
    custom_ops.register(so, providers)  # bayesq ops, when the library was built (custom_ops.py)
    return so


UNPACK = ("auto", "never", "always")

# ---- the unpack rule ------------------------------------------------------------------------------
# A packed bayesq MatMul decodes its weight on every call; unpacked at load (fp32 MatMul on the
# dequantized weight) it runs at onnxruntime's fp32 speed.  Reading a third of the bytes wins while the
# product is bound by memory (few rows per call) and loses once fp32's FMAs are the bound and decoding
# shows.  M (rows per call) is only known per call, so `auto` keeps both forms of a weight (memory: the
# fp32 weight plus the packed one).  Where every switching MatMul reads a fixed share of one graph
# input (a transformer: one row per token), a SwitchingSession runs the packed graph below one switch
# for the model and an fp32 twin from it on; elsewhere an `If` on the input's size runs each MatMul
# packed below its switch and fp32 from it on (one If holds every MatMul from one to the last after it
# that switches at the same rows, and the nodes between: _switch_regions).  Ifs cost 1-3% of fp32's
# time from 8 tokens on SmolLM2, however few (docs/design.md); the twin costs nothing per call.
# PACKED_BELOW[isa] = (affine codes up to 3 bits, codebooks up to 3 bits, affine from 4 bits, codebooks
# from 4 bits): the rows per call from which fp32 runs; 5-8 bits take 4 bits' (not measured).  A set
# without one (NEON: no ARM machine; scalar, 70x fp32) unpacks.  Measured one shape at a time with
# tools/bench_kernels.py --cold --auto (enough copies that the weights come from memory, as in a model)
# --threads 1 --clock cpu --reps 7 --ms 1,4,5,6,7,8,16 --shapes 4096x4096,576x1536 (onnxruntime 1.32, one
# thread of a shared 2-core Zen 4 EPYC, AVX2 forced with BAYESQ_ISA against the same MLAS fp32); packed /
# fp32 time, AVX-512 then AVX2, where the switch falls:
#   3-bit affine:   M = 4 0.76-0.96, 0.92-1.02;  M = 5 0.93-1.24, 1.15-1.35
#   3-bit codebook: M = 6 0.85-1.03, 0.91-0.94;  M = 7 0.88-1.06, 0.87-1.01;  M = 8 1.10-1.20, 1.12-1.16
#   4-bit affine:   M = 4 1.37-1.39, 1.09 (576 x 1536 and 4096 x 4096 at M = 2: 0.71-0.93 in an earlier run)
#   4-bit codebook: M = 4 0.97-1.09 (AVX-512);  M = 4 0.82-0.92, M = 5 1.10-1.11 (AVX2)
# so with these switches every product measured runs within 1.04x of fp32 at every M measured (below
# the switch the packed cells, from it the If's fp32 MatMul, 0.98-1.04x; the copies share one If, whose
# own cost whole models show: README "Measured").  Whole models agree (tools/bench_model.py --suite,
# SmolLM2 and MiniLM at 3.0 and 4.0 bits): packed ran 0.61-0.84x fp32 at 4 tokens and 1.02-1.26x from
# 8.  Smaller weights (MiniLM's 384-wide, timed the same way) looked faster packed still at 16-64
# rows, which MiniLM's whole model did not bear out (kept packed at 16 rows: 1.07x), so the switch does
# not depend on the shape.  The table is one machine's: on a shared 2-core Intel Xeon (300 MB of L3)
# with AVX-512 SmolLM2's packed model ran 0.58x fp32 at 8 tokens and 0.85x at 64 (AVX2 there: 0.88x,
# 1.53x), where the table runs fp32 from 4-7 rows.  `bayesq-onnx tune` measures a model's own switch
# on the machine it runs on (runtime/tune.py), which then takes the table's place.
PACKED_BELOW: dict[str, tuple[int, int, int, int]] = {"avx512": (5, 7, 4, 4), "avx2": (5, 8, 4, 5)}

# A model whose bayesq MatMul weights are this few in all is unpacked whatever the table says: its
# fp32 weights (4 MB) stay in cache between calls, where fp32 wins, and the If's microseconds are most
# of a product's time (Fashion-MNIST's 64 x 128 and 128 x 10 layers at one row: packed 1.03-1.05x,
# with the If 1.06-1.08x of fp32's whole-model time).
SMALL_MODEL = 1 << 20


def packed_below(bits: int, lut: bool, isa: str) -> int:
    """``auto``'s switch for a bayesq MatMul weight of ``bits``-bit codes (``lut``: a codebook) when the
    kernels in use are ``isa``: the packed op runs calls of fewer rows, the fp32 MatMul the others
    (1: always fp32)."""
    switch = PACKED_BELOW.get(isa)
    return switch[2 * (bits > 3) + lut] if switch else 1


def make_session(model: str | os.PathLike | bytes | onnx.ModelProto, providers=None,
                 sess_options: ort.SessionOptions | None = None, fold: bool = True, unpack: str = "auto",
                 external_data: str | os.PathLike | None = None, tuning: tune.Tuning | None = None,
                 **kw) -> ort.InferenceSession:
    """An InferenceSession for any model bayesq-onnx writes (or any other model).  The bayesq
    custom-op library is registered by ``session_options``; pass ``sess_options`` made by it (or call
    ``custom_ops.register`` on your own) to keep bayesq ops loadable, given the same ``providers`` for
    the bayesq ops to run on ``CUDAExecutionProvider`` (made here, the options get them).

    ``fold``: bayesq ``Dequantize*`` nodes on constant weights (Conv and other non-MatMul
    consumers), and blocked ``DequantizeLinear`` ones, are evaluated once here and become float32
    initializers, as onnxruntime itself folds plain ``DequantizeLinear`` of constants at load (it
    folds neither custom ops nor blocked int2/int4 ones).  Their consumers then get
    onnxruntime's prepacked kernels (NCHWc convolutions) instead of re-decoding the weights and
    running unpacked on every call (EfficientNet-lite0 at 3.0 bits: 1.6x fp32's time without this).
    The file stays compressed; in memory those weights are float32, as with ``DequantizeLinear``.

    ``unpack``: what happens to bayesq ``MatMulAffine`` / ``MatMulLut`` nodes on constant weights
    (``auto`` means ``never`` where ``providers`` include ``CUDAExecutionProvider``).
    ``never``: they stay packed (memory at the packed size).  ``always``: each becomes an fp32
    ``MatMul`` (+ ``Add`` for a bias) on its weight dequantized once here, bit-exactly (in memory
    only; the file stays small).  ``auto``: both, packed for calls below :func:`packed_below`'s
    switch (measured per kernel set and format) and fp32 from it on: a :class:`SwitchingSession`
    (the packed graph and an fp32 twin, one switch for the model) where the MatMuls' rows follow
    one graph input, else an ``If`` on the rows per call around each MatMul (consecutive MatMuls
    with the same switch, and the nodes between them, share one); a small model's weights
    (``SMALL_MODEL``), and those of kernel sets never measured, are unpacked only.  Where ``bayesq-onnx tune`` measured the model on this machine (its
    ``MODEL.switch.json``, runtime/tune.py: same CPU, kernels, onnxruntime and intra-op threads),
    that switch holds for all its MatMuls instead of the table; ``tuning`` (tune.measure's) gives
    one for a model passed as a proto.

    ``external_data``: the folder a proto's external tensors are stored relative to
    (``model_io.open_model``).  onnxruntime maps them from there, and is told not to prepack weights,
    which would copy every one into the process's memory: the session then costs little more than
    the files' pages."""
    if unpack not in UNPACK:
        raise BayesQError(f"unpack={unpack!r}: expected one of {', '.join(UNPACK)}")
    providers = providers or DEFAULT_PROVIDERS
    if unpack == "auto" and custom_ops.wants_cuda(providers):
        unpack = "never"   # the switch points are the CPU kernels'; on the GPU the packed ops have a GEMM
    so = sess_options or session_options(providers)
    if external_data is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data))
        so.add_session_config_entry("session.disable_prepacking", "1")
    if tuning is None and unpack == "auto" and isinstance(model, (str, os.PathLike)):
        tuning = tune.load(model, so.intra_op_num_threads)
    proto, folder = _read(model)   # parsed once for all the rewrites below
    if unpack == "auto":
        switching = _whole_model_switch(proto, tuning)
        if switching is not None:
            packed, fp32 = (_rewrite(proto, so, providers, fold, u, folder=folder) for u in ("never", "always"))
            if fp32 is not None:
                return SwitchingSession(_loadable(packed if packed is not None else model), _loadable(fp32),
                                        *switching, sess_options=so, providers=providers, **kw)
    rewritten = _rewrite(proto, so, providers, fold, unpack, tuning, folder)
    model = rewritten if rewritten is not None else model
    return ort.InferenceSession(_loadable(model), sess_options=so, providers=providers, **kw)


def _loadable(model) -> str | bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return str(Path(model)) if isinstance(model, (str, os.PathLike)) else model


class SwitchingSession(ort.InferenceSession):
    """``auto``'s session for a model whose switching MatMuls all multiply one row per ``ratio``
    elements of one graph input (a transformer's: one per token of ``input_ids``): the packed
    graph for calls of fewer rows than the switch, and from it on an fp32 twin with every bayesq
    MatMul unpacked, a session of its own.  No ``If`` stands in either graph, so each runs as fast
    as onnxruntime runs it alone (an ``If`` per MatMul, or one for the whole model, cost 1-3% of
    fp32's time from 8 tokens on, mostly in allocations outside onnxruntime's memory pattern).
    Memory: the packed weights and the fp32 ones, as with ``If``s, plus the other initializers
    (norms, packed embeddings) once more.  ``run`` chooses by the input's size; other entry points
    (``run_with_ort_values``, I/O binding) run the packed graph: bind on ``session_for(feed)``
    (``fp32`` is the twin)."""

    def __init__(self, packed: str | bytes, fp32: str | bytes, rows_input: str, ratio: int, switch: int, **kw):
        super().__init__(packed, **kw)
        self.fp32 = ort.InferenceSession(fp32, **kw)
        self.rows_input, self.ratio, self.switch = rows_input, ratio, switch

    def session_for(self, input_feed: dict) -> ort.InferenceSession:
        """The session ``run`` runs ``input_feed`` on: this one (packed) or the fp32 twin."""
        x = input_feed.get(self.rows_input)
        return self.fp32 if x is not None and np.size(x) >= self.switch * self.ratio else self

    def run(self, output_names, input_feed, run_options=None):
        s = self.session_for(input_feed)
        return (super() if s is self else s).run(output_names, input_feed, run_options)


def _whole_model_switch(model: onnx.ModelProto, tuned: tune.Tuning | None) -> tuple[str, int, int] | None:
    """``(input, ratio, switch)`` where SwitchingSession can serve ``auto``: every MatMul that
    unpack_plan switches reads one row per ``ratio`` elements of graph input ``input``
    (graph.shapes.rows_follow).  One switch for the model: the tuned one, else the weight-weighted
    median of the table's (SmolLM2 at 3 bits: its codebooks' 7 rows, not its affine weights' 5,
    which then run packed at 5 and 6 rows, 0.93-1.24x their fp32 time while the whole model runs
    about 0.6x).  None where the rule fails: the If graph then switches each MatMul."""
    plan = [(n, s) for n, s in unpack_plan(model, "auto", tuned) if s > 1]
    follows = rows_follow(model, sorted({n.input[0] for n, _ in plan})) if plan else None
    if follows is None:
        return None
    weight = {}
    for n, s in plan:
        at = {a.name: a.i for a in n.attribute}
        weight[s] = weight.get(s, 0) + at["K"] * at["N"]
    half, seen = sum(weight.values()) / 2, 0
    for s in sorted(weight):
        seen += weight[s]
        if seen >= half:
            break
    return (*follows, s)


def _read(model) -> tuple[onnx.ModelProto, str | None]:
    """``model`` as a proto, its external tensors not loaded, and the folder they are stored
    relative to (None for a proto or bytes, whose tensors are in it)."""
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model), load_external_data=False), str(Path(model).parent)
    if isinstance(model, bytes):
        return onnx.load_from_string(model), None
    return model, None


def _rewrite(model, so: ort.SessionOptions, providers, fold: bool, unpack: str,
             tuned: tune.Tuning | None = None, folder: str | None = None) -> onnx.ModelProto | None:
    """``model`` with its foldable Dequantize nodes replaced by their outputs and its unpackable
    MatMuls by fp32 ones (``fold``, ``unpack``, ``tuned`` as in make_session and unpack_plan), or None
    when there is nothing to do (or the result would not fit one protobuf).  ``folder``: where a
    proto's external tensors are, loaded into it here if it is rewritten."""
    if not isinstance(model, onnx.ModelProto):
        model, folder = _read(model)
    folds = _foldable(model) if fold else []
    switching = unpack_plan(model, unpack, tuned) if unpack != "never" else []
    unpacks = [n for n, _ in switching]
    switches = {id(n): rows for n, rows in switching}
    if not folds and not unpacks:
        return None
    if folder is not None:
        load_external_data_for_model(model, folder)   # tensors only now that they are needed
    g = model.graph
    # one session evaluates every weight: the Dequantize nodes as they are, and for each MatMul the
    # Dequantize op of its format on the same inputs and attributes (W (K, N), bit-exact)
    unpacked_w = {id(n): f"{n.output[0]}__bq_unpacked_W" for n in unpacks}
    deq = [helper.make_node(n.op_type.replace("MatMul", "Dequantize"), list(n.input[1:_n_weight_inputs(n) + 1]),
                            [unpacked_w[id(n)]], domain=custom_ops.DOMAIN,
                            **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in unpacks]
    nodes = folds + deq
    # with the standard nodes that compute constants they read (scaled codebooks' levels)
    consts = _constants(g)
    made = _producers(consts, [i for n in nodes for i in n.input])
    used = {i for n in made + nodes for i in n.input if i}
    part = helper.make_graph(made + nodes, "fold", [], [onnx.ValueInfoProto(name=n.output[0]) for n in nodes],
                             [t for t in g.initializer if t.name in used])
    part = helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    values = ort.InferenceSession(part.SerializeToString(), sess_options=so, providers=providers).run(None, {})
    gone = {id(n) for n in folds} | set(unpacked_w)
    exact_casts = _may_have_float16(model)

    # the main graph in order, each node with its switch (rows from which it runs fp32): > 1 for a
    # MatMul `auto` keeps both ways, 0 for any other node, -1 for one no If may hold (a subgraph's
    # outer names would need renaming; an unpacked-only MatMul's weight must stay one node's to
    # be prepacked once)
    body = []
    for n in g.node:
        if id(n) in unpacked_w and switches[id(n)] > 1:
            body.append((n, switches[id(n)]))
        elif id(n) in unpacked_w:
            body += [(m, -1) for m in _fp32_matmul(n, unpacked_w[id(n)], exact_casts)]
        elif id(n) not in gone:
            body.append((n, -1 if any(subgraphs(n)) else 0))
    inputs = [n.input[0] for n, s in body if s > 1]
    keep = _switch_regions(body, leading_dims(model, inputs) if inputs else {}, unpacked_w, exact_casts,
                           {o.name for o in g.output})
    # the constants nothing reads any more (a scaled codebook's levels once its MatMul is unpacked)
    folding = {id(n) for n in consts.values() if n is not None}   # standard nodes computing constants
    while True:
        read = {i for n in keep for m in [n, *(x for sub in subgraphs(n) for x in all_nodes(sub))] for i in m.input}
        dead = [n for n in keep if id(n) in folding and not (set(n.output) & (read | {o.name for o in g.output}))]
        if not dead:
            break
        keep = [n for n in keep if n not in dead]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    computed = {o for n in keep for o in n.output}   # what moved into an If's branches is no longer named here
    kept_info = [v for v in out.graph.value_info if v.name in computed]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    # initializers read inside subgraphs (from the outer scope) stay too
    still = {i for n in all_nodes(out.graph) for i in n.input} | {o.name for o in g.output}
    new_inits = [t for t in g.initializer if t.name in still]
    new_inits += [numpy_helper.from_array(v, n.output[0]) for n, v in zip(nodes, values)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(new_inits)
    if not exact_casts:   # float32 activations: the packed ops' output shapes, for onnxruntime's fusions
        named = {v.name for v in out.graph.value_info}
        out.graph.value_info.extend(v for v in packed_outputs(out, (custom_ops.DOMAIN,)) if v.name not in named)
    return out if out.ByteSize() <= model_io.PROTO_LIMIT else None


def _n_weight_inputs(n: onnx.NodeProto) -> int:
    """Inputs after A that hold the packed weight: B, lut (LUT) or B, scales, zero_points (affine)."""
    return 2 if n.op_type == "MatMulLut" else 3


def _fp32_matmul(n: onnx.NodeProto, w: str, casts: bool) -> list[onnx.NodeProto]:
    """Nodes computing what bayesq MatMul ``n`` computes, on its dequantized weight ``w`` (float32):
    A @ W (+ bias) in fp32, into n's output.  ``casts``: A may be float16, so A and
    the bias are converted to float32 and the result rounded once to A's type (CastLike), as the op
    does; onnxruntime keeps such casts even between float32 tensors (a copy per call), hence only when
    needed."""
    a, y = n.input[0], n.output[0]
    nw = _n_weight_inputs(n)
    bias = n.input[nw + 1] if len(n.input) > nw + 1 else ""
    p = f"{y}__bq_unpacked"
    if not casts:
        if not bias:
            return [helper.make_node("MatMul", [a, w], [y])]
        return [helper.make_node("MatMul", [a, w], [f"{p}_Y"]), helper.make_node("Add", [f"{p}_Y", bias], [y])]
    out = [helper.make_node("CastLike", [a, w], [f"{p}_A"]),
           helper.make_node("MatMul", [f"{p}_A", w], [f"{p}_Y"])]
    last = f"{p}_Y"
    if bias:
        out += [helper.make_node("CastLike", [bias, w], [f"{p}_bias"]),
                helper.make_node("Add", [last, f"{p}_bias"], [f"{p}_Yb"])]
        last = f"{p}_Yb"
    out.append(helper.make_node("CastLike", [last, a], [y]))
    return out


def _switch_regions(body: list[tuple[onnx.NodeProto, int]], rows: dict, weights: dict, casts: bool,
                    graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """The main graph's nodes with its switching MatMuls (``body``, as _rewrite makes it) behind as
    few ``If``s as their switches allow (an If costs 5-15 microseconds a call).  Each If spans the
    nodes from one switching MatMul to the last of those after it with the same switch, up to a
    node no If may hold, a MatMul with another switch, or one whose rows per call shape inference
    tells apart (``rows``: graph.shapes.leading_dims, by input name).  Its condition is
    ``Size(A) >= switch * K`` on the first one's input; its branches are the span with those
    MatMuls fp32 (on their dequantized weights, ``weights``) and packed.  It takes the MatMuls it
    spans to multiply as many rows as the first, as a transformer's do (every token), which
    inference does not always follow (MiniLM's export loses it at a broadcast).  Where one has fewer (a
    pooled head) it runs fp32 where packed might be faster; where one had more, packed past its
    switch: only speed is at stake, never the result."""
    last_read = {}
    for i, (n, _) in enumerate(body):
        for m in [n, *(x for sub in subgraphs(n) for x in all_nodes(sub))]:
            last_read.update((name, i) for name in m.input if name)
    last_read.update((name, len(body)) for name in graph_outputs)
    out, i = [], 0
    while i < len(body):
        n, switch = body[i]
        if switch <= 1:
            out.append(n)
            i += 1
            continue
        ends, j = i, i + 1
        while j < len(body) and body[j][1] >= 0:
            m, s = body[j]
            if s > 1:
                r, rm = rows[n.input[0]], rows[m.input[0]]
                if s != switch or None not in (r, rm) and rm != r:
                    break
                ends = j
            j += 1
        span = body[i:ends + 1]
        produced = {o for m, _ in span for o in m.output if o}
        needed = [o for m, _ in span for o in m.output if o and last_read.get(o, -1) > ends]
        if needed:
            out += _switch_on_rows(span, needed, produced, weights, casts)
        i = ends + 1
    return out


def _switch_on_rows(span, needed: list[str], produced: set[str], weights: dict, casts: bool) -> list[onnx.NodeProto]:
    """One ``If`` computing ``needed`` from the nodes of ``span`` ((node, switch) pairs, the first a
    switching MatMul, all of them switching at the same rows): the switching MatMuls packed for
    calls of fewer rows, and fp32 from there on.  Each branch renames what it computes."""
    first, rows = span[0]
    K = next(at.i for at in first.attribute if at.name == "K")
    cond = f"{first.output[0]}__bq_rows_ge_{rows}"

    def branch(suffix, fp32):
        nodes = []
        for n, s in span:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for field in (c.input, c.output):
                names = [x + suffix if x in produced else x for x in field]
                del field[:]
                field.extend(names)
            nodes += _fp32_matmul(c, weights[id(n)], casts) if fp32 and s > 1 else [c]
        return helper.make_graph(nodes, cond + suffix, [], [onnx.ValueInfoProto(name=o + suffix) for o in needed])

    return [helper.make_node("Size", [first.input[0]], [f"{cond}_size"]),
            helper.make_node("Constant", [], [f"{cond}_limit"], value=numpy_helper.from_array(np.int64(rows * K))),
            helper.make_node("GreaterOrEqual", [f"{cond}_size", f"{cond}_limit"], [cond]),
            helper.make_node("If", [cond], needed, then_branch=branch("__bq_fp32", True),
                             else_branch=branch("__bq_packed", False))]


def _may_have_float16(model: onnx.ModelProto) -> bool:
    """Whether any activation of the main graph can be float16: a float16 graph input, output,
    value_info, initializer or Constant, or a Cast to float16 (bayesq scale / LUT tables excepted: their
    type is independent of the activations').  Without any, float16 has no way in."""
    g = model.graph
    F16 = TensorProto.FLOAT16
    tables = {n.input[2 if n.op_type.startswith(("MatMul", "Gather")) else 1] for n in g.node   # scales / lut
              if n.domain == custom_ops.DOMAIN and len(n.input) > 2}
    if any(v.type.tensor_type.elem_type == F16 for v in [*g.input, *g.output, *g.value_info]):
        return True
    if any(t.data_type == F16 and t.name not in tables for t in g.initializer):
        return True
    for n in g.node:
        for a in n.attribute:
            if (n.op_type == "Cast" and a.name == "to" and a.i == F16) or (a.type == onnx.AttributeProto.TENSOR
                                                                            and a.t.data_type == F16):
                return True
        if any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute):
            return True    # subgraphs: not looked into
    return False


def unpack_plan(model: onnx.ModelProto, unpack: str, tuned: tune.Tuning | None = None) -> list[tuple[onnx.NodeProto, int]]:
    """bayesq MatMul nodes (main graph) whose weight inputs are all constant (:func:`_constants`) and that ``unpack``
    unpacks, each with the rows per call from which the unpacked form runs (``always``: 1; ``auto``:
    the model's switch measured on this machine, ``tuned``, where there is one, else packed_below's);
    none before opset 15 (CastLike)."""
    if not custom_ops.available():
        return []          # nothing could run them or dequantize them: the session reports that
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        return []
    inits = _constants(model.graph)
    isa = custom_ops.kernel_isa() if unpack == "auto" else ""
    if isa.startswith("invalid"):
        return []          # a bad BAYESQ_ISA: the session's own kernels report it
    nodes = [n for n in model.graph.node if n.domain == custom_ops.DOMAIN and n.op_type in ("MatMulAffine", "MatMulLut")
             and all(i in inits for i in n.input[1:_n_weight_inputs(n) + 1] if i)]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    if unpack == "always":
        return [(n, 1) for n in nodes]
    if tuned is not None:   # measured on the model itself: it overrides the table and SMALL_MODEL
        return [] if tuned.packed_below is None else [(n, tuned.packed_below) for n in nodes]
    if sum(a["K"] * a["N"] for a in attrs) < SMALL_MODEL:
        return [(n, 1) for n in nodes]
    return [(n, packed_below(a["bits"], n.op_type == "MatMulLut", isa)) for n, a in zip(nodes, attrs)]


def _constants(g: onnx.GraphProto) -> dict[str, onnx.NodeProto | None]:
    """The main graph's constant tensors: initializers (None), and the outputs of standard ops whose
    inputs are all constant (their node): a scaled codebook's per-group levels
    (``bayesq_nodes.scaled_lut_nodes``), which onnxruntime would fold when it loads the model."""
    out: dict[str, onnx.NodeProto | None] = {t.name: None for t in g.initializer}
    for n in g.node:   # graph order is topological
        if n.domain in ("", "ai.onnx") and not any(subgraphs(n)) and all(i in out for i in n.input if i):
            out.update((o, n) for o in n.output)
    return out


def _producers(consts: dict, names) -> list[onnx.NodeProto]:
    """The nodes that compute the constants ``names`` (and what they read), in graph order."""
    need, seen, todo = [], set(), [i for i in names if i]
    while todo:
        n = consts.get(todo.pop())
        if n is not None and id(n) not in seen:
            seen.add(id(n))
            need.append(n)
            todo += [i for i in n.input if i]
    order = {id(n): k for k, n in enumerate(consts.values()) if n is not None}
    return sorted(need, key=lambda n: order[id(n)])


def _foldable(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Dequantize nodes on initializers (main graph only) that onnxruntime leaves in the graph: the
    bayesq ones, and blocked ``DequantizeLinear`` (int2/int4 Conv weights) whose consumers are not a
    MatMul (there onnxruntime fuses it into MatMulNBits itself)."""
    g = model.graph
    inits = _constants(g)
    consumers: dict[str, set[str]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)

    def blocked_dq(n) -> bool:
        return (n.domain in ("", "ai.onnx") and n.op_type == "DequantizeLinear"
                and any(a.name == "block_size" and a.i > 0 for a in n.attribute)
                and not consumers.get(n.output[0], set()) & {"MatMul", "Gemm"})

    return [n for n in g.node if all(i in inits for i in n.input if i)
            and ((n.domain == custom_ops.DOMAIN and n.op_type.startswith("Dequantize")) or blocked_dq(n))]
