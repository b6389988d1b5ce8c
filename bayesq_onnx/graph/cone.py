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


@dataclass(frozen=True)
class Cone:
    nodes: list[onnx.NodeProto]      # the nodes the sources reach, in graph order
    frontier: list[str]              # tensors the cone reads that it does not compute (not initializers)
    outputs: list[str]               # graph outputs the cone computes (the others do not change)


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
            reached.update(o for o in n.output if o)
    inits = {t.name for t in graph.initializer}
    frontier = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in reached and i not in inits))
    return Cone(nodes, frontier, [o.name for o in graph.output if o.name in reached])


def backward_slice(graph: onnx.GraphProto, targets: list[str], exclude: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes (not in ``exclude``) needed to compute ``targets``, in graph order."""
    skip = {id(n) for n in exclude}
    needed, keep = set(targets), []
    for n in reversed(graph.node):
        if id(n) not in skip and any(o in needed for o in n.output):
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
