"""Loading and saving models: clear errors for bad files, atomic writes, no surprise mutation."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import BayesQError, first_line
from .cone import all_nodes

log = logging.getLogger(__name__)
PROTO_LIMIT = 2**31 - 1   # protobuf's limit on one serialized message (bytes)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with its external data, checked and normalized; the caller gets its own copy to edit."""
    return prepare_model(read_model(path), str(Path(path)), str(Path(path)))


class WeightFiles:
    """Where the external data of a model opened by :func:`open_model` lives.  Its tensors stay on
    disk and are memory-mapped when read: file-backed pages, which the kernel drops and reloads as
    it needs, not the process's own memory -- a model far larger than that memory can be analysed
    one part at a time.  ``WeightFiles(None)``: a model held wholly in memory."""

    def __init__(self, base: str | os.PathLike | None, tmp: tempfile.TemporaryDirectory | None = None):
        self.base, self._tmp = (Path(base) if base is not None else None), tmp   # tmp: kept alive with us

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        """The tensor's values: read-only and memory-mapped when stored as external data."""
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        shape = tuple(t.dims)
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.base / info["location"], dtype, "r", int(info.get("offset", 0)), shape)

    def materialize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` with every external tensor read into it (in place): a self-contained proto."""
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.raw_data = np.ascontiguousarray(self.array(t)).tobytes()
                del t.external_data[:]
                t.ClearField("data_location")   # unset, as in a model never stored externally: the same bytes
        return model


class ArraySpill:
    """Arrays moved out of the process's memory: each written once to a private temporary directory
    and read back memory-mapped (file-backed pages, as :class:`WeightFiles`'s).  For the packed
    tensors of every plan a budget compares, which would otherwise all be held until the model is
    written (a 1B-weight model's: about 350 MB per plan at 3 bits).  Arrays under
    :data:`SPILL_BYTES` stay as they are; the directory goes with the object."""

    def __init__(self):
        self._dir: tempfile.TemporaryDirectory | None = None
        self._count = 0
        self._lock = threading.Lock()   # passes that run at once spill from their own threads

    def put(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: self._put(a) for k, a in arrays.items()}

    def __getstate__(self):   # shipped to a Ray worker: its own arrays arrive as copies, its spills are its own
        return {}

    def __setstate__(self, state):
        self.__init__()

    def _put(self, a: np.ndarray) -> np.ndarray:
        if a.nbytes < SPILL_BYTES or isinstance(a, np.memmap):
            return a
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="bayesq-packed-")
            path = Path(self._dir.name) / f"{self._count}.npy"
            self._count += 1
        np.save(path, np.ascontiguousarray(a))
        return np.load(path, mmap_mode="r")


def has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


SPILL_BYTES = 1 << 16   # inline initializers this big or bigger are moved out of the proto (open_model)
_ALIGN = 1 << 16        # offsets in the spill file: page-aligned, so onnxruntime can map them too


def open_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, WeightFiles]:
    """The model's graph with its weights left on disk, checked and normalized like :func:`load_model`:
    initializers stored as external data stay where they are; in a model without external data, the
    big inline ones are first written to a temporary file (the proto's copy is freed), so that
    either way weights are read memory-mapped, one at a time (:class:`WeightFiles`)."""
    path = Path(path)
    if not path.is_file():
        raise BayesQError(f"model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BayesQError(f"cannot read {path} as an ONNX model: {first_line(e)}") from None
    if has_external(model):
        files = WeightFiles(path.parent)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                _check_external(t, path.parent, path)
    else:
        files = _spill(model)
        # a fresh copy without the moved tensors: protobuf frees a cleared field's bytes only with the
        # whole message (its arena), so the loaded one would keep the weights resident (0.5 GB of a
        # 0.1B-weight model's RssAnon)
        model = onnx.ModelProto.FromString(model.SerializeToString())
    return prepare_model(model, str(path), str(path), files), files


def _check_external(t: onnx.TensorProto, base: Path, path: Path) -> None:
    info = {e.key: e.value for e in t.external_data}
    where = info.get("location", "")
    f = (base / where).resolve()
    need = int(info.get("offset", 0)) + int(info.get("length", 0) or
                                           math.prod(t.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
    if not where or Path(where).is_absolute() or base.resolve() not in f.parents or not f.is_file() \
            or f.stat().st_size < need:
        raise BayesQError(f"cannot read {path} as an ONNX model: the external data of {t.name!r} ({where!r}) is "
                          f"missing, outside the model's folder, or too short")


def _spill(model: onnx.ModelProto) -> WeightFiles:
    """Move the big inline initializers of ``model`` to a temporary file (:data:`SPILL_BYTES`)."""
    big = [t for t in model.graph.initializer if t.ByteSize() >= SPILL_BYTES]
    if not big:
        return WeightFiles(None)
    tmp = tempfile.TemporaryDirectory(prefix="bayesq-weights-")
    with open(Path(tmp.name) / "weights.bin", "wb") as f:
        for t in big:
            data = np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()
            f.write(b"\0" * (-f.tell() % _ALIGN))
            offset = f.tell()
            f.write(data)
            for k in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(k)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=k, value=v)
    return WeightFiles(tmp.name, tmp)


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy onnx.checker can check in memory, without the bytes it does not read: external
    initializers (whose files the checker looks for relative to the working directory) and big
    inline ones become graph inputs of the same type and shape.  The checker serializes what it is
    given and parses it again: a 1B model's packed tensors copied twice over, its run's peak."""
    m = _without_initializers(model)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() >= SPILL_BYTES:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            m.graph.initializer.add().CopyFrom(t)
    return m


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The file as it is, with its external data: no check, no normalization (for reading only)."""
    path = Path(path)
    if not path.is_file():
        raise BayesQError(f"model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf and external-data errors have many types
        raise BayesQError(f"cannot read {path} as an ONNX model: {first_line(e)}") from None


def prepare_model(model: onnx.ModelProto, source: str = "the model", path: str | None = None,
                  files: WeightFiles | None = None) -> onnx.ModelProto:
    """Check a model and normalize it in place (Constant weights -> initializers, unique node names).
    ``path``: the file it was read from (onnxruntime loads big models from there); ``files``: where
    its external data is (:func:`open_model`)."""
    if not model.graph.node:
        raise BayesQError(f"{source} is not a usable ONNX model (its graph has no nodes)")
    try:
        onnx.checker.check_model(checkable(model))
    except Exception as e:
        # exporters write models the checker refuses (e.g. graph outputs without a type) that
        # onnxruntime runs: only a model it cannot load either is an error
        why = ort_load_error(model, path, files)
        if why is not None:
            raise BayesQError(f"{source} fails onnx.checker: {first_line(e)}; onnxruntime cannot load it either: "
                              f"{why}") from None
        log.warning("%s fails onnx.checker (%s); onnxruntime loads it, so going on", source, first_line(e))
    constants_to_initializers(model)
    name_nodes(model)
    return model


def ort_load_error(model: onnx.ModelProto, path: str | None = None, files: WeightFiles | None = None) -> str | None:
    """None if onnxruntime creates a session for the model (custom ops registered), else its reason."""
    from ..runtime.session import make_session   # the runtime layer sits above this one
    try:
        make_session(path if path is not None and model.ByteSize() > PROTO_LIMIT else model, fold=False,
                     unpack="never", external_data=files.base if files is not None else None)
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


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, files: WeightFiles | None = None) -> Path:
    """Write ``model`` to ``path`` via a temp file and rename, so a failure leaves nothing half-written.
    ``files``: where its external tensors are (``open_model``).  A model that fits one protobuf is
    written whole; a bigger one goes to an external-data file beside it (``<name>.data``), written
    tensor by tensor (external ones copied from their files in chunks), also renamed into place;
    the model then refers to that file."""
    path = Path(path)
    files = files or WeightFiles(None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _plain_permissions(tmp)
    data_name = path.name + ".data"
    tmp_data = None
    try:
        if not fits(model, files):
            tmp_data = path.parent / f".{data_name}.tmp"
            _write_external(model, files, tmp_data, data_name)
            onnx.save_model(model, tmp)
            os.replace(tmp_data, path.parent / data_name)
        else:
            _write_whole(files.materialize(model), tmp)
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp_data):
            if p and os.path.exists(p):
                os.unlink(p)
        raise
    return path


def _write_whole(model: onnx.ModelProto, path: str) -> None:
    """``model`` into one protobuf file without serializing it in one piece, which would copy every
    packed tensor at once (a 1B Llama at 3 bits: 0.44 GB, the run's peak memory at its end).  A
    message field met twice merges, and a repeated one appends (protobuf's encoding), so the model
    without its initializers, then each initializer in a fragment of its own, parse as the model."""
    head = _without_initializers(model)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        for t in model.graph.initializer:
            piece = onnx.ModelProto()
            piece.graph.initializer.add().CopyFrom(t)
            f.write(piece.SerializeToString())


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` but its graph's initializers (never copied: they may be GBs)."""
    m = onnx.ModelProto()
    _copy_fields(model, m, skip="graph")
    _copy_fields(model.graph, m.graph, skip="initializer")
    return m


def _copy_fields(src, dst, skip: str) -> None:
    """Every field set in message ``src`` but ``skip``, copied into ``dst``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def fits(model: onnx.ModelProto, files: WeightFiles) -> bool:
    """Whether ``model``, its external tensors read in, fits one protobuf."""
    ext = sum(files.array(t).nbytes for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return model.ByteSize() + ext <= PROTO_LIMIT


def _write_external(model: onnx.ModelProto, files: WeightFiles, data_path: Path, data_name: str) -> None:
    """Every initializer of 1 KiB or more into ``data_path``, one at a time (page-aligned), ``model``
    rewritten to refer to it as ``data_name``."""
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            external = t.data_location == onnx.TensorProto.EXTERNAL
            if not external and t.ByteSize() < 1024:
                continue
            a = np.ascontiguousarray(files.array(t))
            f.write(b"\0" * (-f.tell() % _ALIGN))
            offset = f.tell()
            flat = a.reshape(-1).view(np.uint8)
            for i in range(0, flat.size, 1 << 26):    # 64 MiB at a time: a mapped weight is never read whole
                f.write(flat[i:i + (1 << 26)].tobytes())
            for k in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(k)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(flat.size))):
                t.external_data.add(key=k, value=v)


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
