"""onnxruntime sessions for the models we read and write."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

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
                 sess_options: ort.SessionOptions | None = None, **kw) -> ort.InferenceSession:
    """An InferenceSession for any model bayesq-onnx writes (or any other model).  The bayesq
    custom-op library is registered by ``session_options``; pass ``sess_options`` made by it (or call
    ``custom_ops.register`` on your own) to keep bayesq ops loadable."""
    so = sess_options or session_options()
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = str(Path(model))
    return ort.InferenceSession(model, sess_options=so, providers=providers or DEFAULT_PROVIDERS, **kw)
