"""The rows per call from which a model's MatMuls run faster unpacked, measured on this machine.

`auto`'s table (session.PACKED_BELOW) holds one machine's switches, and machines disagree: where
they were measured (a Zen 4 EPYC) SmolLM2's packed model ran 1.10x fp32 at 8 tokens, on a Xeon
with a 300 MB L3 0.58x, and MiniLM, whose fp32 weights fit that cache, 0.94x.  ``bayesq-onnx tune``
measures the model itself: its bayesq MatMuls, packed and unpacked, one after another in one graph
as in a forward pass (so the weights come from where the model's come from: cache or memory), at
growing rows per call, and writes the switch beside the model (``MODEL.switch.json``) with the
machine it holds for; ``make_session(path, unpack="auto")`` reads it there.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..errors import BayesQError
from ..graph.model_io import save_json_atomic
from . import custom_ops

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SUFFIX = ".switch.json"


@dataclass(frozen=True)
class Tuning:
    machine: dict                  # what the measurement holds for (machine_key)
    packed_below: int | None       # rows from which fp32 runs; None: packed at every rows measured
    ratios: dict[int, float]       # packed time / fp32 time, per rows measured


def machine_key(threads: int) -> dict:
    """The CPU, the kernels in use, onnxruntime and the threads: a switch holds only where all match."""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "isa": custom_ops.kernel_isa(), "onnxruntime": ort.__version__, "threads": threads}


def switch_from(ratios: dict[int, float]) -> int | None:
    """The fewest rows at which packed is no faster than fp32 (packed / fp32 time >= 1), or None when
    it is faster at every rows measured.  One switch cannot follow a ratio that dips under 1 again
    at more rows (MiniLM on AVX-512: 1.20 at 16 rows, 0.96 at 128): fp32 from the first crossing
    never costs more than fp32, where packed from the last would."""
    return next((rows for rows in sorted(ratios) if ratios[rows] >= 1.0), None)


def time_alternating(runs: dict[str, Callable[[], object]], reps: int, clock=time.perf_counter,
                     stat=statistics.median) -> dict[str, float]:
    """ms per call of each function: batches of ~20 ms of each, in a rotating order, ``reps`` times
    (machines are shared: what runs side by side sees the same load).  Each batch follows one
    untimed call: a few-millisecond model's first call after another's ran up to 20% slower on
    the caches that one left (MiniLM at 4-16 tokens), which is no cost of the model's own."""
    counts = {}
    for name, f in runs.items():
        f()                                      # warm-up (first-run allocations, caches)
        t = time.perf_counter()
        f()
        once = time.perf_counter() - t
        counts[name] = max(1, min(200, int(0.02 / max(once, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotate who goes first
            f, n = runs[name], counts[name]
            f()
            t = clock()
            for _ in range(n):
                f()
            times[name].append((clock() - t) / n)
    return {k: stat(v) * 1e3 for k, v in times.items()}


def matmuls_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The bayesq MatMuls of ``model`` that ``auto`` would switch (main graph, constant weights), in
    graph order, each on an input of its own (``x<i>``: rows x K, float32) and with the initializers
    they read."""
    from .session import unpack_plan
    nodes = [n for n, _ in unpack_plan(model, "always")]
    if not nodes:
        raise BayesQError("the model has no bayesq MatMul with constant weights: nothing to tune")
    used = {i for n in nodes for i in n.input[1:] if i}
    inits = [t for t in model.graph.initializer if t.name in used]
    copies, inputs, outputs = [], [], []
    for i, n in enumerate(nodes):
        c = onnx.NodeProto()
        c.CopyFrom(n)
        K, N = (next(a.i for a in n.attribute if a.name == k) for k in ("K", "N"))
        c.input[0], c.output[0] = f"x{i}", f"y{i}"
        copies.append(c)
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["rows", K]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", N]))
    g = helper.make_graph(copies, "matmuls", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def measure(model: onnx.ModelProto, threads: int = 0, rows=ROWS, reps: int = 5,
            progress: Callable[[str], None] = lambda line: None) -> Tuning:
    """Time the model's MatMuls (matmuls_only) packed and unpacked at each of ``rows``, side by side,
    on ``threads`` intra-op threads (0: onnxruntime's default)."""
    from .session import make_session, session_options
    mm = matmuls_only(model)

    def options():
        so = session_options()
        so.intra_op_num_threads = threads
        return so

    packed, fp32 = (make_session(mm, sess_options=options(), unpack=u) for u in ("never", "always"))
    clock = time.process_time if threads == 1 else time.perf_counter   # one thread: CPU time, steadier
    rng = np.random.default_rng(0)
    ratios = {}
    for m in rows:
        feeds = {i.name: rng.standard_normal((m, i.type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)
                 for i in mm.graph.input}
        t = time_alternating({"packed": lambda: packed.run(None, feeds), "fp32": lambda: fp32.run(None, feeds)},
                             reps, clock)
        ratios[m] = t["packed"] / t["fp32"]
        progress(f"tune: {m} rows: packed {t['packed']:.2f} ms, fp32 {t['fp32']:.2f} ms ({ratios[m]:.2f})")
    return Tuning(machine_key(threads), switch_from(ratios), ratios)


def sidecar(model_path: str | Path) -> Path:
    return Path(str(model_path) + SUFFIX)


def _file(model_path: str | Path) -> dict:
    """Which file was measured: its size and modification time (a model compressed again to the
    same path is another model)."""
    st = Path(model_path).stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def save(tuning: Tuning, path: str | Path, model_path: str | Path) -> None:
    """``tuning`` of the model at ``model_path``, as JSON at ``path`` (temp file, then rename)."""
    save_json_atomic({**asdict(tuning), "ratios": {str(k): v for k, v in tuning.ratios.items()},
                      "model": _file(model_path)}, path)


def load(model_path: str | Path, threads: int) -> Tuning | None:
    """The tuning written beside ``model_path`` when it holds for that file as it is now, this
    machine and ``threads``; None where there is none, it is unreadable, or it does not hold."""
    try:
        d = json.loads(sidecar(model_path).read_text())
        tuning = Tuning(d["machine"], d["packed_below"], {int(k): float(v) for k, v in d["ratios"].items()})
        same_file = d["model"] == _file(model_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return tuning if same_file and custom_ops.available() and tuning.machine == machine_key(threads) else None
