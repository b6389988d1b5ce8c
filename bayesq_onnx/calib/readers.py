"""Calibration data: read and check it against the graph's inputs, or synthesize a fallback."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ..errors import BayesQError, first_line
from ..graph.model_io import check_python_io

log = logging.getLogger(__name__)

SYNTHETIC_DIM = 16  # length given to dynamic non-batch axes (e.g. sequence) in synthetic data


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed axes, None for dynamic ones


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    check_python_io(model)
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def load_calibration(path: str | Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """An ``.npz`` (keys = input names, axis 0 = samples) or a directory of them, concatenated
    in file-name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise BayesQError(f"calibration directory {path} holds no .npz files")
    elif path.is_file():
        files = [path]
    else:
        raise BayesQError(f"calibration data not found: {path}")
    parts = [_read_npz(f, specs) for f in files]
    return {s.name: np.concatenate([p[s.name] for p in parts]) for s in specs}


def _read_npz(f: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        z = np.load(f, allow_pickle=False)
    except Exception as e:
        raise BayesQError(f"cannot read calibration file {f}: {first_line(e)}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise BayesQError(f"calibration file {f} is not an .npz archive of named inputs")
    try:
        with z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise BayesQError(f"cannot read calibration file {f}: {first_line(e)}") from None
    return check_calibration(arrays, specs, f"calibration file {f}")


def check_calibration(arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Names, dtypes and shapes must match the graph's inputs exactly (no silent casts)."""
    want = {s.name for s in specs}
    missing, extra = want - set(arrays), set(arrays) - want
    if missing or extra:
        raise BayesQError(f"{where}: keys do not match the model inputs: "
                          f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    for s in specs:
        a = np.asarray(arrays[s.name])
        if a.dtype != s.dtype:
            raise BayesQError(f"{where}: input {s.name!r} has dtype {a.dtype}, the model expects {s.dtype}")
        if a.ndim != len(s.shape) or any(d is not None and d != ad for d, ad in zip(s.shape[1:], a.shape[1:])):
            raise BayesQError(f"{where}: input {s.name!r} has shape {a.shape}, the model expects "
                              f"(samples, ...) matching {tuple('?' if d is None else d for d in s.shape)}")
        if a.shape[0] == 0:
            raise BayesQError(f"{where}: input {s.name!r} has no samples")
        if s.dtype.kind == "f" and not np.isfinite(a).all():
            raise BayesQError(f"{where}: input {s.name!r} contains NaN or Inf")
    if len({len(arrays[s.name]) for s in specs}) > 1:
        raise BayesQError(f"{where}: inputs have different sample counts: "
                          + ", ".join(f"{s.name}={len(arrays[s.name])}" for s in specs))
    return {s.name: np.asarray(arrays[s.name]) for s in specs}


def synthetic_calibration(model: onnx.ModelProto, specs: list[InputSpec], n: int, seed: int) -> dict[str, np.ndarray]:
    """Fallback when no data is given: floats ~ N(0, 1); integer inputs that index an embedding
    (Gather) uniform over its rows; names containing "mask" all ones; other integers 0/1.
    Dynamic axes other than the first get length SYNTHETIC_DIM.  Good enough to exercise every
    weight, not to represent real data."""
    rng = np.random.default_rng(seed)
    vocab = _gather_vocab(model)
    unit = fixed_batch(specs) or 1
    n = -(-n // unit) * unit
    data = {}
    for s in specs:
        shape = (n,) + tuple(SYNTHETIC_DIM if d is None else d for d in s.shape[1:])
        if s.dtype.kind == "f":
            data[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            data[s.name] = np.ones(shape, s.dtype)
        elif "mask" in s.name.lower():
            data[s.name] = np.ones(shape, s.dtype)
        else:
            data[s.name] = rng.integers(0, vocab.get(s.name, 2), size=shape).astype(s.dtype)
    return data


def _gather_vocab(model: onnx.ModelProto) -> dict[str, int]:
    inits = {t.name: t for t in model.graph.initializer}
    vocab = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and len(node.input) > 1:
            vocab[node.input[1]] = min(vocab.get(node.input[1], 1 << 62), inits[node.input[0]].dims[0])
    return vocab


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size the graph insists on (a fixed axis 0), or None when axis 0 is dynamic."""
    sizes = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if len(sizes) > 1:
        raise BayesQError(f"the model's inputs have different fixed batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def split(data: dict[str, np.ndarray], holdout: float, unit: int = 1) -> tuple[dict, dict]:
    """Deterministic split: the last ``holdout`` share of samples (a multiple of ``unit``, the
    model's fixed batch) is held back.  When nothing can be held back both parts are the whole set."""
    n = n_samples(data)
    k = int(round(n * holdout / unit)) * unit
    if k == 0 or k == n:
        return data, data
    return {a: v[:n - k] for a, v in data.items()}, {a: v[n - k:] for a, v in data.items()}


def take(data: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in data.items()}


def batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    for i in range(0, n, batch_size):
        yield {k: v[i:i + batch_size] for k, v in data.items()}


def n_samples(data: dict[str, np.ndarray]) -> int:
    return len(next(iter(data.values())))
