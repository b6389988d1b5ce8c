"""onnxruntime sessions for the models we read and write."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from ..graph import model_io
from . import custom_ops

DEFAULT_PROVIDERS = ["CPUExecutionProvider"]


def session_options(**entries) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # onnxruntime's warnings are not ours to show users
    # keep DequantizeLinear->MatMul exact: without this ORT fuses it into int8-activation MatMulNBits
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for k, v in entries.items():
        so.add_session_config_entry(k, str(v))
    custom_ops.register(so)  # bayesq ops, when the library was built (custom_ops.py)
    return so


def make_session(model: str | os.PathLike | bytes | onnx.ModelProto, providers=None,
                 sess_options: ort.SessionOptions | None = None, fold: bool = True, **kw) -> ort.InferenceSession:
    """An InferenceSession for any model bayesq-onnx writes (or any other model).  The bayesq
    custom-op library is registered by ``session_options``; pass ``sess_options`` made by it (or call
    ``custom_ops.register`` on your own) to keep bayesq ops loadable.

    ``fold``: bayesq ``Dequantize*`` nodes on constant weights (Conv and other non-MatMul
    consumers), and blocked ``DequantizeLinear`` ones, are evaluated once here and become float32
    initializers, as onnxruntime itself folds plain ``DequantizeLinear`` of constants at load (it
    folds neither custom ops nor blocked int2/int4 ones).  Their consumers then get
    onnxruntime's prepacked kernels (NCHWc convolutions) instead of re-decoding the weights and
    running unpacked on every call (EfficientNet-lite0 at 3.0 bits: 1.6x fp32's time without this).
    The file stays compressed; in memory those weights are float32, as with ``DequantizeLinear``."""
    so = sess_options or session_options()
    providers = providers or DEFAULT_PROVIDERS
    if fold:
        folded = _fold_dequantize(model, so, providers)
        model = folded if folded is not None else model
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = str(Path(model))
    return ort.InferenceSession(model, sess_options=so, providers=providers, **kw)


def _fold_dequantize(model, so: ort.SessionOptions, providers) -> onnx.ModelProto | None:
    """``model`` with its foldable Dequantize nodes replaced by their outputs, or None when it has
    none (or would not fit one protobuf once folded)."""
    if isinstance(model, (str, os.PathLike)):
        path, model = model, onnx.load(str(model), load_external_data=False)   # tensors only if needed
    elif isinstance(model, bytes):
        path, model = None, onnx.load_from_string(model)
    else:
        path = None
    nodes = _foldable(model)
    if not nodes:
        return None
    if path is not None:
        load_external_data_for_model(model, str(Path(path).parent))
    g = model.graph
    used = {i for n in nodes for i in n.input if i}
    part = helper.make_graph(nodes, "fold", [], [onnx.ValueInfoProto(name=n.output[0]) for n in nodes],
                             [t for t in g.initializer if t.name in used])
    part = helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    values = ort.InferenceSession(part.SerializeToString(), sess_options=so, providers=providers).run(None, {})
    fold = {id(n) for n in nodes}
    keep = [n for n in g.node if id(n) not in fold]
    still = {i for n in keep for i in n.input} | {o.name for o in g.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    inits = [t for t in g.initializer if t.name in still]
    inits += [numpy_helper.from_array(v, n.output[0]) for n, v in zip(nodes, values)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out if out.ByteSize() <= model_io.PROTO_LIMIT else None


def _foldable(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Dequantize nodes on initializers (main graph only) that onnxruntime leaves in the graph: the
    bayesq ones, and blocked ``DequantizeLinear`` (int2/int4 Conv weights) whose consumers are not a
    MatMul (there onnxruntime fuses it into MatMulNBits itself)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
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
