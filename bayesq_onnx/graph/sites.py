"""Find the weights we can quantize, and say why the others are left alone."""
from __future__ import annotations

import math
from collections import defaultdict
from fnmatch import fnmatchcase

import onnx
from onnx import helper

from ..errors import BayesQError
from ..types import SiteKind, SkippedSite, WeightSite
from .cone import all_nodes, subgraphs

# the weight types quantized (numerics in float32 views; formats store scales in the model's type)
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16"}
MIN_CONV_BLOCK = 16  # fewer input channels per group than this: Conv weights are grouped per output channel


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _uses(model: onnx.ModelProto):
    """Who reads each main-graph name: main-graph nodes, and nodes inside subgraphs (If branches,
    Loop and Scan bodies) that read it from the outer scope -- where a subgraph defines the name
    itself, that definition hides the outer one.  Also, keyed by the name of each node inside a
    subgraph (unique model-wide once model_io.name_nodes has run): ``hidden``, the names its
    enclosing subgraphs define (calibration cannot read them: the probe's extra outputs are
    main-graph tensors), and ``owner``, the op type of the main-graph node holding it; and the
    subgraphs' own initializers."""
    uses, hidden, owner, local_inits = defaultdict(list), {}, {}, []

    def walk(graph, local: frozenset, top: str | None):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name and name not in local:
                    uses[name].append((node, i))
            if top is not None and node.name:
                hidden[node.name], owner[node.name] = local, top
            for sub in subgraphs(node):
                local_inits.extend(sub.initializer)
                defined = {v.name for v in sub.input} | {t.name for t in sub.initializer} | \
                          {o for n in sub.node for o in n.output}
                walk(sub, local | defined, top or node.op_type)

    walk(model.graph, frozenset(), None)
    return uses, hidden, owner, local_inits


def _subgraph_names(model: onnx.ModelProto) -> set[str]:
    """Names read inside control-flow subgraphs."""
    return {i for g in (s for n in model.graph.node for s in subgraphs(n)) for n in all_nodes(g) for i in n.input}


def _classify(node, slot, shape, uses, hidden):
    """How one use sees the weight: (kind, perm, activation tensors, consumer names, consumers whose
    activation calibration cannot read) or a reason string.  ``hidden``: ``_uses``'s, per nested node."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"

    def found(kind, perm, readers, act_slot, extra=()):
        unseen = tuple(r.name for r in readers if r.input[act_slot] in hidden.get(r.name, ()))
        return (kind, perm, tuple(r.input[act_slot] for r in readers if r.name not in unseen),
                tuple(extra) + tuple(r.name for r in readers), unseen)

    if op == "MatMul" and slot == 1 and len(shape) == 2:
        return found(SiteKind.MATMUL, (1, 0), [node], 0)
    if op == "Gemm" and slot == 1 and len(shape) == 2:
        if _attr(node, "transA", 0):
            return "Gemm with transA=1"
        if _attr(node, "alpha", 1.0) != 1.0 or (len(node.input) > 2 and node.input[2] and _attr(node, "beta", 1.0) != 1.0):
            return "Gemm with alpha or beta != 1"
        return found(SiteKind.MATMUL, ((0, 1) if _attr(node, "transB", 0) else (1, 0)), [node], 0)
    if op == "Transpose" and slot == 0 and len(shape) == 2 and list(_attr(node, "perm", [1, 0])) == [1, 0]:
        if node.name in hidden:   # its readers are in the subgraph's scope, which _uses does not index
            return "transposed inside a control-flow subgraph"
        after = uses.get(node.output[0], [])
        if after and all(n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and s == 1 for n, s in after):
            return found(SiteKind.MATMUL, (0, 1), [n for n, _ in after], 0, extra=[node.name])
        return "transposed, then used by something other than MatMul's weight input"
    if op == "Conv" and slot == 1 and len(shape) == 4:
        if shape[1] < MIN_CONV_BLOCK:
            # too few input channels per group (depthwise: 1) to block along them: the view is one
            # row per output channel, its groups that channel's taps (identity perm: see _find_sites)
            return found(SiteKind.CONV, (0, 1, 2, 3), [node], 0)
        return found(SiteKind.CONV, (0, 2, 3, 1), [node], 0)
    if op == "Gather" and slot == 0 and len(shape) == 2 and _attr(node, "axis", 0) == 0:
        return found(SiteKind.GATHER, (0, 1), [node], 1)
    if op in ("MatMul", "Gemm", "Conv") and slot == 1:
        return f"{op} weight of rank {len(shape)}: not a layout any format here rewrites"
    return f"used by {op} (input {slot}), which no format here rewrites"


# bits per element of the float initializers that stay as they are (the all-weights figure of the report)
FLOAT_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
              onnx.TensorProto.DOUBLE: 64}


def float_initializer_bits(model: onnx.ModelProto, leave_out=()) -> tuple[int, int]:
    """Elements and stored bits of every float initializer not named in ``leave_out`` (any rank:
    skipped weights, biases, norms), each in its own type."""
    n = bits = 0
    for t in model.graph.initializer:
        if t.name not in leave_out and t.data_type in FLOAT_BITS:
            size = math.prod(t.dims)
            n, bits = n + size, bits + size * FLOAT_BITS[t.data_type]
    return n, bits


def site_matches(site: WeightSite, pattern: str) -> bool:
    """Whether an ``--exclude`` / ``--include`` / ``--pin`` pattern (fnmatch, case-sensitive) names the
    site: its initializer or any node that reads it."""
    return any(fnmatchcase(n, pattern) for n in (site.name, *site.consumers))


def find_sites(model: onnx.ModelProto, min_elements: int = 1024, exclude=(), include=(),
               pinned=()) -> tuple[list[WeightSite], list[SkippedSite]]:
    """Every float (float32, float16, bfloat16) initializer of rank >= 2 becomes a site or a skipped entry with its reason
    (rank-0/1 tensors -- biases, norms, shapes -- are not weights in our sense).

    Node names must be unique across the main graph and its subgraphs (``model_io.prepare_model``
    makes them so): consumers are named, and rewritten, by them.

    The user's selection (``Recipe.exclude`` / ``include``) applies to weights that would otherwise be
    sites: an excluded one stays as it is and is reported as skipped.  A pattern that names nothing
    is an error (a typo would otherwise silently quantize everything), as is a ``pinned`` pattern
    (``Recipe.pins``) that names no site left to quantize."""
    sites, skipped = _find_sites(model, min_elements)
    if exclude or include:
        names = {t.name for t in model.graph.initializer} | {n.name for n in all_nodes(model.graph)}
        for flag, patterns in (("--exclude", exclude), ("--include", include)):
            for p in patterns:
                if not any(fnmatchcase(n, p) for n in names):
                    raise BayesQError(f"{flag} {p!r} matches no initializer or node name in the model")
        kept = []
        for s in sites:
            hit = next((p for p in exclude if site_matches(s, p)), None)
            if hit is not None:
                skipped.append(SkippedSite(s.name, f"excluded by --exclude {hit}"))
            elif include and not any(site_matches(s, p) for p in include):
                skipped.append(SkippedSite(s.name, f"not matched by --include {' '.join(include)}"))
            else:
                kept.append(s)
        sites = kept
    for p in pinned:
        if not any(site_matches(s, p) for s in sites):
            raise BayesQError(f"--pin {p!r} matches no weight that is quantized (initializer or node name)")
    return sites, skipped


def _find_sites(model: onnx.ModelProto, min_elements: int) -> tuple[list[WeightSite], list[SkippedSite]]:
    uses, hidden, owner, local_inits = _uses(model)
    by_name = {n.name: n for n in all_nodes(model.graph)}
    graph_inputs = {i.name for i in model.graph.input}
    sites, skipped = [], []
    for init in model.graph.initializer:
        shape = tuple(init.dims)
        if len(shape) < 2 or init.name not in uses:
            continue
        if init.data_type not in FLOAT_TYPES:
            # integer tensors (shapes, indices) are not weights; a weight of another type is worth a note
            if any(not isinstance(_classify(n, s, shape, uses, hidden), str) for n, s in uses[init.name]):
                skipped.append(SkippedSite(init.name, f"dtype {onnx.TensorProto.DataType.Name(init.data_type)}: "
                                                      "only float32, float16 and bfloat16 weights are quantized"))
            continue
        if init.name in graph_inputs:
            skipped.append(SkippedSite(init.name, "also a graph input, so it can be overridden at run time"))
            continue
        size = math.prod(shape)
        if size < min_elements:
            skipped.append(SkippedSite(init.name, f"only {size} elements (< {min_elements}): not worth quantizing"))
            continue
        found = [_classify(n, s, shape, uses, hidden) for n, s in uses[init.name]]
        reasons = [f for f in found if isinstance(f, str)]
        if reasons:
            skipped.append(SkippedSite(init.name, reasons[0]))
            continue
        kinds = {(k, p) for k, p, _, _, _ in found}
        if kinds == {(SiteKind.GATHER, (0, 1)), (SiteKind.MATMUL, (0, 1))}:
            kinds = {(SiteKind.TIED, (0, 1))}  # an embedding table that is also the output head
        if len(kinds) > 1:
            skipped.append(SkippedSite(init.name, "shared by consumers that need different layouts: "
                                                  + ", ".join(sorted(f"{k}{p}" for k, p in kinds))))
            continue
        (kind, perm), = kinds
        permuted = [shape[p] for p in perm]
        if kind is SiteKind.CONV and perm == (0, 1, 2, 3):   # the flat view of a depthwise / few-channel Conv
            permuted = [shape[0], math.prod(shape[1:])]
        consumers = tuple(c for _, _, _, cs, _ in found for c in cs)
        sites.append(WeightSite(
            name=init.name, kind=kind,
            op_type="/".join(sorted({by_name[c].op_type for c in consumers} - {"Transpose"})),
            shape=shape, perm=perm, rows=math.prod(permuted[:-1]), L=permuted[-1],
            consumers=consumers,
            activations=tuple(dict.fromkeys(a for _, _, acts, _, _ in found for a in acts)),
            dtype=FLOAT_TYPES[init.data_type],
            subgraph="/".join(sorted({owner[c] for c in consumers if c in owner})),
            unseen=tuple(u for _, _, _, _, us in found for u in us),
        ))
    for t in local_inits:   # a subgraph's own weights: only the main graph's are rewritten
        if t.data_type in FLOAT_TYPES and len(t.dims) >= 2 and math.prod(t.dims) >= min_elements:
            skipped.append(SkippedSite(t.name, "an initializer of a control-flow subgraph (only the main "
                                               "graph's initializers are quantized)"))
    return sites, skipped


def statistics_note(site: WeightSite) -> dict:
    """Report fields for a weight read inside a subgraph: what its statistics come from."""
    if not site.subgraph:
        return {}
    if not site.unseen:
        how = ("calibration: its input is a main-graph tensor, seen on every sample whether or not the "
               f"{site.subgraph} runs that subgraph")
    elif not site.activations:
        how = (f"data-free: its input is computed inside the {site.subgraph} subgraph, which calibration "
               "cannot read; no statistics from the data (no X^T X: rounded to nearest without GPTQ error "
               "feedback; uniform curvature), its format and grid still chosen by end-to-end measurements")
    else:
        how = (f"partial: the inputs of {', '.join(site.unseen)} are computed inside the {site.subgraph} "
               "subgraph and not seen; X^T X from the other readers")
    return {"subgraph": site.subgraph, "statistics": how}
