"""What every asset's ONNX export shares: readable initializer names and a checked, atomic save."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..graph.model_io import rename_initializers


def torchscript_export(module, args: tuple, input_names: Sequence[str], output_names: Sequence[str], opset: int):
    """``module`` (eval mode, BatchNorm folded by constant folding) as an ``onnx.ModelProto`` through
    the TorchScript exporter (``dynamo=False``: what all the assets were checked with), every input
    and output dynamic along axis 0.  The exporter's warnings (its own deprecation, tracer notes
    on fixed shapes) are not the user's to act on and are silenced."""
    import tempfile
    import warnings

    import onnx
    import torch

    dyn = {k: {0: "batch"} for k in (*input_names, *output_names)}
    with tempfile.TemporaryDirectory(prefix="bayesq-export-") as tmp, torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = str(Path(tmp) / "raw.onnx")
        torch.onnx.export(module, args, raw, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dyn, opset_version=opset, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.EVAL, dynamo=False)
        return onnx.load(raw)


def _scope(node_name: str) -> str:
    """The torch module path of an exported node: ``/stages/stages.0/conv1/Conv`` -> ``stages.0.conv1``
    (a container's name is dropped where its child repeats it)."""
    parts = node_name.strip("/").split("/")[:-1]
    return ".".join(p for p, nxt in zip(parts, parts[1:] + [""]) if not nxt.startswith(p + "."))


def name_by_scope(model, rules: Mapping[str, Sequence[tuple[int, str]]]) -> None:
    """Give the exporter's ``onnx::<Op>_<n>`` initializers their torch names: the tensor at input
    ``slot`` of an ``op_type`` node becomes ``<module path>.<suffix>`` (``rules[op_type]`` lists
    the ``(slot, suffix)`` pairs), so that sites, reports and torch-side curvature match by name.
    Names already taken, and tensors read by several nodes, keep the first name found."""
    inits = {t.name for t in model.graph.initializer}
    taken = inits | {v for n in model.graph.node for v in n.output}
    renames: dict[str, str] = {}
    for node in model.graph.node:
        scope = _scope(node.name)
        for slot, suffix in rules.get(node.op_type, ()):
            if len(node.input) <= slot:
                continue
            old, new = node.input[slot], f"{scope}.{suffix}"
            if old in inits and old.startswith("onnx::") and old not in renames and scope and new not in taken:
                renames[old] = new
                taken.add(new)
    rename_initializers(model, renames)


def save_export(model, path: Path, doc: str, meta: Mapping[str, str]) -> None:
    """Document, fully check and write ``model`` to ``path`` (temp file, then rename)."""
    import onnx

    model.doc_string = doc
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model, full_check=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
