"""The part of a graph a few tensors reach, and the part that feeds it.

Changing one weight changes only the nodes downstream of it (its *forward cone*); everything else
is the same as in a reference run.  So a measurement of one site's candidates runs the tensors that
enter the cone (its *frontier*) once, through the *prefix* that computes them, and then only the
cone for each candidate: about half a forward pass on average over a network's sites.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper


def _reads_shape(n: onnx.NodeProto) -> bool:
    return n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx")


@dataclass(frozen=True)
class Cone:
    nodes: list[onnx.NodeProto]      # the nodes the sources reach, in graph order
    frontier: list[str]              # tensors the cone reads that it does not compute (not initializers)
    outputs: list[str]               # graph outputs the cone computes (the others do not change)


def subgraphs(node: onnx.NodeProto):
    """The graphs a node holds (If's branches, Loop's and Scan's bodies)."""
    for a in node.attribute:
        yield from ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)


def all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of the subgraphs inside it, at any depth (parents first)."""
    for n in graph.node:
        yield n
        for sub in subgraphs(n):
            yield from all_nodes(sub)


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Nodes with subgraphs (If, Loop, Scan) may read outer tensors their inputs do not list, so a
    cone through them could miss a dependency: callers then run the whole graph."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
               for a in n.attribute)


def forward_cone(graph: onnx.GraphProto, sources: set[str]) -> Cone:
    """The nodes reached from ``sources`` (graph inputs or initializers), in graph (topological) order."""
    reached, nodes = set(sources), []
    for n in graph.node:
        if any(i in reached for i in n.input if i):
            nodes.append(n)
            if not _reads_shape(n):   # new weights never change a shape: what reads one is not downstream
                reached.update(o for o in n.output if o)
    inits = {t.name for t in graph.initializer}
    computed = {o for n in nodes for o in n.output}
    frontier = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in computed and i not in inits))
    return Cone(nodes, frontier, [o.name for o in graph.output if o.name in reached])


def backward_slice(nodes, targets) -> list[onnx.NodeProto]:
    """The nodes of ``nodes`` (in their order: a graph's, or any topologically ordered part of
    it) needed to compute the tensors ``targets``, directly or through each other."""
    needed, keep = set(targets), []
    for n in reversed(list(nodes)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


def submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[str]) -> onnx.ModelProto:
    """``model`` cut down to ``nodes`` (with only the initializers they read), fed by ``inputs``."""
    g = model.graph
    used = {i for n in nodes for i in n.input}
    known = {v.name: v for v in [*g.output, *g.value_info]}
    graph = helper.make_graph(nodes, g.name + "_part", inputs,
                              [known.get(o) or onnx.ValueInfoProto(name=o) for o in outputs],
                              [t for t in g.initializer if t.name in used])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


@dataclass(frozen=True)
class Segment:
    nodes: list[onnx.NodeProto]      # a run of the sources' cone, in graph order
    start: str | None                # the cut it starts from (None: the first, fed by the sources)
    end: str | None                  # the cut it ends at (None: the last, ending at the graph outputs)


def segments(graph: onnx.GraphProto, sources: set[str], outputs: list[str]) -> list[Segment]:
    """The forward cone of ``sources`` cut into segments at single tensors that everything the
    sources change passes through (the residual stream between transformer sublayers, the feature
    map between CNN blocks), one cut before each source's first reader that follows a cut, the
    latest such one: a segment holds whole blocks, and whatever changes in it leaves through its
    end.  ``outputs``: the graph outputs that count (not the probe's extra ones).  A model with no
    such tensor is one segment."""
    cone = forward_cone(graph, sources).nodes
    # nodes that only reshape weights (a Transpose feeding a MatMul) run with their readers: their
    # outputs are weights too, not part of the stream the cuts are looked for in
    data = {v.name for v in graph.input} - sources
    for n in graph.node:
        if any(i in data for i in n.input):
            data.update(o for o in n.output if o)
    # and what reads a shape is left to the reference run: it is the same whatever the weights
    cone = [n for n in cone if not _reads_shape(n)]
    prep = [n for n in cone if not any(i in data for i in n.input)]
    nodes = [n for n in cone if any(i in data for i in n.input)]
    weights = set(sources) | {o for n in prep for o in n.output}
    produced = {o for n in nodes for o in n.output if o}
    last_use = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in produced:
                last_use[t] = i
    for o in outputs:
        if o in produced:
            last_use[o] = len(nodes)                 # a graph output stays live to the end
    cuts, live = {}, set()                           # node index -> the one tensor live after it
    for i, n in enumerate(nodes):
        live.update(o for o in n.output if last_use.get(o, -1) > i)
        live.difference_update(t for t in n.input if last_use.get(t) == i)
        if len(live) == 1:
            cuts[i] = next(iter(live))
    readers = [i for i, n in enumerate(nodes) if any(t in weights for t in n.input)]
    kept = []
    for r in readers:
        before = [i for i in cuts if i < r and (not kept or i > kept[-1])]
        if before:
            kept.append(max(before))
    bounds = [-1, *kept, len(nodes) - 1]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        part = nodes[a + 1:b + 1]
        reads = {i for n in part for i in n.input if i}
        out.append(Segment(backward_slice(prep, reads) + part, cuts.get(a),
                           cuts.get(b) if b < len(nodes) - 1 else None))
    return out


def linear_tail(segment: Segment, outputs: list[str]) -> tuple[str, bool] | None:
    """``(W, transposed)`` when ``segment`` is only ``y = x @ W`` (``x @ W^T`` with ``transposed``:
    a tied head reading the embedding through a Transpose) plus perhaps a bias, ``x`` its start
    cut and ``y`` the one output that counts: a change of ``x`` then changes ``y`` by ``dx @ W``,
    which a distortion can read from ``x`` alone (plan/proxy.py).  Else None."""
    nodes, x = list(segment.nodes), segment.start
    if x is None or len(outputs) != 1:
        return None
    std = all(n.domain in ("", "ai.onnx") for n in nodes)
    transposed = bool(nodes) and nodes[0].op_type == "Transpose" and \
        [list(a.ints) for a in nodes[0].attribute if a.name == "perm"] in ([], [[1, 0]])
    weight = nodes[0].input[0] if transposed else None
    rest = nodes[1:] if transposed else nodes
    if not std or not 1 <= len(rest) <= 2:
        return None
    mm = rest[0]
    if mm.op_type != "MatMul" or mm.input[0] != x or (transposed and mm.input[1] != nodes[0].output[0]):
        return None
    y = mm.output[0]
    if len(rest) == 2:
        if rest[1].op_type != "Add" or y not in rest[1].input:
            return None
        y = rest[1].output[0]
    return (weight if transposed else mm.input[1], transposed) if y == outputs[0] else None
