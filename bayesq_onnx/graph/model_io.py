"""Loading and saving models: clear errors for bad files, atomic writes, no surprise mutation."""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BayesQError, first_line
from .cone import all_nodes

log = logging.getLogger(__name__)
PROTO_LIMIT = 2**31 - 1   # protobuf's limit on one serialized message (bytes)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with its external data, checked and normalized; the caller gets its own copy to edit."""
    return prepare_model(read_model(path), str(Path(path)), str(Path(path)))


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The file as it is, with its external data: no check, no normalization (for reading only)."""
    path = Path(path)
    if not path.is_file():
        raise BayesQError(f"model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf and external-data errors have many types
        raise BayesQError(f"cannot read {path} as an ONNX model: {first_line(e)}") from None


def prepare_model(model: onnx.ModelProto, source: str = "the model", path: str | None = None) -> onnx.ModelProto:
    """Check a model and normalize it in place (Constant weights -> initializers, unique node names).
    ``path``: the file it was read from (onnxruntime loads big models from there)."""
    if not model.graph.node:
        raise BayesQError(f"{source} is not a usable ONNX model (its graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        # exporters write models the checker refuses (e.g. graph outputs without a type) that
        # onnxruntime runs: only a model it cannot load either is an error
        why = ort_load_error(model, path)
        if why is not None:
            raise BayesQError(f"{source} fails onnx.checker: {first_line(e)}; onnxruntime cannot load it either: "
                              f"{why}") from None
        log.warning("%s fails onnx.checker (%s); onnxruntime loads it, so going on", source, first_line(e))
    constants_to_initializers(model)
    name_nodes(model)
    return model


def ort_load_error(model: onnx.ModelProto, path: str | None = None) -> str | None:
    """None if onnxruntime creates a session for the model (custom ops registered), else its reason."""
    from ..runtime.session import make_session   # the runtime layer sits above this one
    try:
        make_session(path if path is not None and model.ByteSize() > PROTO_LIMIT else model, fold=False,
                     unpack="never")
        return None
    except Exception as e:
        return first_line(e)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name, across the main graph and its subgraphs: sites, the lowering
    and reports refer to nodes by name (a weight's reader may sit in an If branch or a Loop body)."""
    nodes = list(all_nodes(model.graph))
    taken = {n.name for n in nodes if n.name}
    seen = set()
    for i, node in enumerate(nodes):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            taken.add(name)
        seen.add(node.name)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn top-level ``Constant`` nodes holding a tensor into initializers, so weights stored
    either way are found by the same code."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def rename_initializers(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Rename initializers, and the main graph's node inputs that read them, in place."""
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)


def to_array(t: onnx.TensorProto):
    return numpy_helper.to_array(t)


def check_python_io(model: onnx.ModelProto) -> None:
    """onnxruntime's Python API can neither feed nor return bfloat16 tensors: say so before any run."""
    inits = {t.name for t in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            if v.name not in inits and v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
                raise BayesQError(f"graph {kind} {v.name!r} is bfloat16, which onnxruntime's Python API cannot "
                                  f"pass; Cast it from/to float32 or float16 inside the graph")


def bfloat16_hint(model: onnx.ModelProto) -> str:
    """Why onnxruntime may refuse a bfloat16 model, to append to its message ("" for other models)."""
    types = [t.data_type for t in model.graph.initializer] + \
            [v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]]
    if onnx.TensorProto.BFLOAT16 not in types:
        return ""
    return ("; onnxruntime's CPU kernels do not compute MatMul, Gemm or Conv in bfloat16: convert the "
            "model to float16 or float32")


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` via a temp file and rename, so a failure leaves nothing half-written.
    Models over 2 GB go to one external-data file beside it (``<name>.data``), also renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _plain_permissions(tmp)
    data_name = path.name + ".data"
    tmp_data = None
    try:
        if model.ByteSize() > PROTO_LIMIT:
            tmp_data = f".{data_name}.tmp"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data, size_threshold=1024)
            # the model refers to its data by relative location: rewrite it to the final name
            m = onnx.load(tmp, load_external_data=False)
            for t in m.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            onnx.save_model(m, tmp)
            os.replace(path.parent / tmp_data, path.parent / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp_data and path.parent / tmp_data):
            if p and os.path.exists(p):
                os.unlink(p)
        raise
    return path


def save_json_atomic(obj, path) -> None:
    """A report as strict JSON, written like the models: temp file, then rename."""
    save_text_atomic(json.dumps(_strict_json(obj), indent=2, allow_nan=False), path)


def save_text_atomic(text: str, path) -> None:
    """UTF-8 text (a JSON or HTML report), written like the models: temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _plain_permissions(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_npz(path: str | os.PathLike, arrays) -> None:
    """Like ``np.savez`` (uncompressed, keys in the given order) but byte-for-byte reproducible:
    ``np.savez`` stamps each member with the current time."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def save_npz_atomic(arrays, path: str | os.PathLike) -> Path:
    """Reproducible bytes (:func:`write_npz`), written to a temp file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_npz(tmp, arrays)
        _plain_permissions(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BayesQError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _strict_json(o):
    """Plain JSON: numpy scalars as Python numbers, non-finite floats as null."""
    if isinstance(o, dict):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def _plain_permissions(path) -> None:
    """mkstemp makes 0600 files; what we write should get the permissions any new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_writable(path: str | os.PathLike) -> None:
    """Fail before the work, not after it, when ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise BayesQError(f"cannot write {path}: it is a directory")
    parent = path.absolute().parent
    while not parent.exists():  # the folders are made only when the result is written
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BayesQError(f"cannot write {path}: {parent} is not a writable directory")
