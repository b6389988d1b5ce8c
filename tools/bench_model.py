"""Whole-model speed: fp32 ONNX models against their compressed versions, all under onnxruntime.

    python tools/bench_model.py [FP32.onnx COMPRESSED.onnx] [--shapes 1x64,4x64,16x64] [--threads 0]
                                [--clock wall|cpu] [--reps 15]
    python tools/bench_model.py --suite [--models minilm,fashion_mnist,efficientnet,smollm2] [--bits 3.0,4.0]
                                [--isas avx512,avx2] [--shapes ...] [--threads 0] [--clock wall|cpu]
                                [--reps 15] [--tune] [--out rows.csv] [--quiet]

**Two models.** Without paths: all-MiniLM-L6-v2 as ``bayesq-onnx demo`` leaves it in the cache
(``$BAYESQ_CACHE``, else ~/.cache/bayesq-onnx): ``minilm-*/model.onnx`` against
``demo/minilm.bayesq.3.onnx``; run ``bayesq-onnx demo`` once to write both.  Inputs are
``batch x seq`` (integer inputs: token ids below 1000, ones for a mask, zeros otherwise; float
inputs: normal noise), or ``batch`` alone for inputs whose other dimensions are fixed (images); a
shape the graph's fixed dimensions refuse is skipped.  Both models are timed in alternation as in
bench_kernels.py (batches of ~20 ms, rotating order, median); the table gives ms per run and
compressed / fp32 (< 1: faster).  ``--threads 1 --clock cpu`` measures the work on a machine shared
with other jobs.

**The suite** (``--suite``): each bench model of ``bayesq_onnx.assets`` compressed by the default
bayesq recipe at each of ``--bits`` and by onnxruntime's own formats at 4 bits (method rtn,
``custom_ops=False``: every MatMul weight MatMulNBits 4-bit g32, Conv weights blocked 4-bit
DequantizeLinear, embeddings GatherBlockQuantized 4-bit), the files cached under the asset cache's
``bench_model/`` (keyed by the asset and the recipe: a rerun does not recompress; delete the folder
after changing the compressor).  Per ISA of the bayesq kernels (``BAYESQ_ISA``, read when a session
creates its kernels; each ISA runs in a subprocess of its own, and one the CPU lacks is reported and
skipped; fp32 and MatMulNBits are onnxruntime's MLAS kernels, the same in every ISA's rows), per
shape, one alternating run times side by side: fp32; bayesq at each budget with
``make_session(unpack="never")`` (packed) and ``unpack="auto"`` (with ``--tune`` also ``auto`` on
the switch ``bayesq-onnx tune`` measures for it in that worker, ``-tuned``); MatMulNBits at accuracy level 0
(fp32 maths, the recipe's default) and 4 (int8 activations, onnxruntime's fast setting).  Token
models were exported at one length (MiniLM 64, SmolLM2 128) but compute at any: the suite names
that length free in every variant (in memory; the files stay as they are), so ``1x1`` is one token
(M = 1 in every MatMul; no KV cache), and a length a graph refuses (MiniLM's 512 positions) is
skipped.  The table gives ms per run and the ratio to fp32, and checks issue 12's goals: bayesq at
3 bits with ``auto`` no slower than fp32 at any shape, SmolLM2 one token (1x1) packed at 3 bits
<= 0.8x fp32.
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
from bench_kernels import options  # noqa: E402

from bayesq_onnx import Analysis, Recipe, compress  # noqa: E402
from bayesq_onnx.assets import default_cache, load_npz  # noqa: E402
from bayesq_onnx.runtime import custom_ops, tune  # noqa: E402
from bayesq_onnx.runtime.session import SwitchingSession, make_session, unpack_plan  # noqa: E402
from bayesq_onnx.runtime.tune import time_alternating  # noqa: E402

ONNX_INT = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
log = logging.getLogger("bench_model")


def default_models() -> tuple[Path, Path]:
    """The demo's compressed MiniLM and the fp32 model its report names (else the newest cached one)."""
    cache = default_cache()
    compressed = cache / "demo" / "minilm.bayesq.3.onnx"
    report = compressed.with_suffix(".json")
    fp32 = [Path(json.loads(report.read_text()).get("input", ""))] if report.is_file() else []
    fp32 = [p for p in fp32 if p.is_file()] or sorted(cache.glob("minilm-*/model.onnx"),
                                                       key=lambda p: p.stat().st_mtime)
    if not fp32 or not compressed.is_file():
        sys.exit(f"no MiniLM models in {cache}: run `bayesq-onnx demo` (it writes both), or pass two paths")
    return fp32[-1], compressed


def parse_shape(shape: str) -> tuple[int, int | None]:
    """``BATCHxSEQ`` or ``BATCH``."""
    batch, seq = (int(x) for x in shape.split("x")) if "x" in shape else (int(shape), None)
    return batch, seq


def feeds(model: onnx.ModelProto, batch: int, seq: int | None, rng) -> dict[str, np.ndarray] | None:
    """Inputs with ``batch`` first and ``seq`` in every other free dimension (fixed ones as the graph
    says), or None when the graph refuses it: a fixed batch, a free dimension and no ``seq``, or a
    ``seq`` that no input has room for (no free dimension and no fixed one of that length)."""
    out, seq_used = {}, False
    for vi in model.graph.input:
        t = vi.type.tensor_type
        dims = [d.dim_value or None for d in t.shape.dim]
        shape = [batch] + [d or seq for d in dims[1:]]
        if (dims and dims[0] not in (None, batch)) or None in shape:
            return None
        seq_used |= seq is not None and any(d in (None, seq) for d in dims[1:])
        if t.elem_type in ONNX_INT:
            dtype = ONNX_INT[t.elem_type]
            if "mask" in vi.name:
                out[vi.name] = np.ones(shape, dtype)
            elif "ids" in vi.name and "type" not in vi.name:
                out[vi.name] = rng.integers(0, 1000, shape).astype(dtype)
            else:
                out[vi.name] = np.zeros(shape, dtype)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out if seq is None or seq_used else None


def two_models(args) -> int:
    """The original mode: one fp32 model against one compressed model."""
    paths = [Path(p) for p in args.models] if args.models else list(default_models())
    protos = [onnx.load(str(p), load_external_data=False) for p in paths]
    ops = collections.Counter(n.op_type for n in protos[1].graph.node if n.domain == custom_ops.DOMAIN)
    sessions = [make_session(p, sess_options=options(args.threads)) for p in paths]

    isa = custom_ops.kernel_isa() if custom_ops.available() else "library not built"
    print(f"fp32:       {paths[0]}\ncompressed: {paths[1]}")
    print(f"bayesq ops: {', '.join(f'{k} {v}' for k, v in sorted(ops.items())) or 'none'} (kernels: {isa})")
    print(f"threads {args.threads or 'default'}, median of {args.reps} alternating batches, {args.clock} ms per run")
    print(f"{'shape':>8} {'fp32':>9} {'compressed':>11} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for shape in (args.shapes or "1x64,4x64,16x64").split(","):
        batch, seq = parse_shape(shape)
        f = feeds(protos[0], batch, seq, rng)
        if f is None or feeds(protos[1], batch, seq, rng) is None:
            print(f"{shape:>8}  skipped: the graph's fixed input dimensions refuse it")
            continue
        runs = {name: (lambda s=s: s.run(None, f)) for name, s in zip(("fp32", "compressed"), sessions)}
        t = time_alternating(runs, args.reps, _clock(args.clock), statistics.median)
        print(f"{shape:>8} {t['fp32']:9.2f} {t['compressed']:11.2f} {t['compressed'] / t['fp32']:6.2f}", flush=True)
    return 0


def _clock(name: str):
    return time.perf_counter if name == "wall" else time.process_time


# ----------------------------------------------------------------------------- the suite

TOKEN_SHAPES = "1x1,1x16,1x64,1x256,1x1024,4x256"   # 1 to 1024 tokens (4x256: MiniLM's 1024, under 512 positions)
IMAGE_SHAPES = "1,8,32"
NBITS_BLOCK = 32            # the MatMulNBits baseline's group: issue 12's kernel table used 4-bit g32


@dataclass(frozen=True)
class BenchModel:
    """One model of the suite: its fp32 file, calibration data and the recipe fields it needs."""

    name: str
    model: Path
    calib: dict = field(repr=False)
    recipe: dict = field(default_factory=dict)       # Recipe fields besides method and bits (both recipes)
    key: str = ""                                    # names its cached files (default: the model's folder)


def asset_model(name: str, cache: Path) -> BenchModel:
    """A bench model from the asset cache (built from packages on first use), with the calibration
    data bench_accuracy.py uses."""
    from bayesq_onnx import assets
    prepare = {"minilm": assets.prepare_minilm, "fashion_mnist": assets.prepare_fashion_mnist,
               "efficientnet": assets.prepare_efficientnet, "smollm2": assets.prepare_smollm2}[name]
    a = prepare(cache, progress=log.info)
    # SmolLM2: groups of 64 and 128 only, as bench_accuracy.py compresses it (half the closed-form work)
    recipe = {"batch_size": 4, "blocks": (64, 128)} if name == "smollm2" else {}
    return BenchModel(name, Path(a.model), load_npz(a.calib), recipe, Path(a.model).parent.name)


def nbits_recipe(fields: dict) -> dict:
    """onnxruntime's own 4-bit formats, one everywhere: rtn, no custom ops, 4-bit g32 only."""
    return {**fields, "method": "rtn", "custom_ops": False, "matmul_bits": (4,), "conv_bits": (4,),
            "gather_bits": (4,), "blocks": (NBITS_BLOCK,)}


def _cached(folder: Path, bm: BenchModel, fields: dict, bits: float, label: str) -> tuple[Path, Path]:
    """The cached model and report paths of one compression: named by the model's key and a hash of
    the recipe and budget."""
    h = hashlib.sha256(json.dumps([fields, bits], sort_keys=True, default=list).encode()).hexdigest()[:12]
    out = folder / f"{bm.key or bm.model.parent.name}.{bm.name}.{label}.{h}.onnx"
    return out, out.with_suffix(".json")


def compressed(bm: BenchModel, bits: tuple[float, ...], folder: Path) -> dict[str, Path]:
    """fp32, bayesq at each budget (``bq3``, ``bq4``, ...) and the MatMulNBits 4-bit model: files,
    compressed once and then read from ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"fp32": bm.model}
    todo = {}
    for b in bits:
        path, report = _cached(folder, bm, {"method": "bayesq", **bm.recipe}, b, f"bq{b:g}")
        out[f"bq{b:g}"] = path
        if not (path.is_file() and report.is_file()):
            todo[b] = (path, report)
    if todo:
        log.info("%s: bayesq at %s bits (cached as %s)", bm.name, ", ".join(f"{b:g}" for b in todo), folder)
        analysis = Analysis(bm.model, Recipe(bits=max(todo), **bm.recipe), calib=bm.calib)
        for b, (path, report) in sorted(todo.items()):
            analysis.compress(b, output=path, report=report)
    fields = nbits_recipe(bm.recipe)
    # a budget above 4-bit g32's stored bits (4 + 36/32 with fp32 scales): the uniform plan is that format
    path, report = _cached(folder, bm, fields, 8.0, "nbits4")
    if not (path.is_file() and report.is_file()):
        log.info("%s: MatMulNBits 4-bit", bm.name)
        compress(bm.model, Recipe(bits=8.0, **fields), calib=bm.calib, output=path, report=report)
    out["nbits4"] = path
    return out


def free_seq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the fixed non-batch dimensions of its integer inputs (a token model's length)
    named free, and without the graph's shape hints (value_info holds the export's length)."""
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type in ONNX_INT:
            for d in list(vi.type.tensor_type.shape.dim)[1:]:
                d.dim_param = "seq"
    del model.graph.value_info[:]
    return model


def _accuracy4(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MatMulNBits model at accuracy level 4 (int8 activations): the same weights."""
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            kept = [a for a in n.attribute if a.name != "accuracy_level"]
            del n.attribute[:]
            n.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", 4)])
    return model


def _load(path: Path, tokens: bool) -> onnx.ModelProto:
    m = onnx.load(str(path))
    return free_seq(m) if tokens else m


def _is_tokens(model: onnx.ModelProto) -> bool:
    return any(vi.type.tensor_type.elem_type in ONNX_INT for vi in model.graph.input)


def variant_sessions(files: dict[str, str], threads: int, tuned: bool = False) -> tuple[dict, onnx.ModelProto, dict[str, str]]:
    """Sessions of every timed variant, the fp32 proto (for the inputs) and a line per file saying
    what it holds (op counts, what ``auto`` does with the bayesq MatMuls).  ``tuned``: a bayesq
    model also runs ``auto`` on the switch ``bayesq-onnx tune`` measures for it here (runtime/tune.py)."""
    fp32 = onnx.load(files["fp32"], load_external_data=False)
    tokens = _is_tokens(fp32)
    fp32 = free_seq(fp32) if tokens else fp32
    isa = custom_ops.kernel_isa()
    sessions, notes = {"fp32": make_session(_load(Path(files["fp32"]), tokens), sess_options=options(threads))}, {}
    for label, path in files.items():
        if label == "fp32":
            continue
        m = _load(Path(path), tokens)
        ops = collections.Counter(n.op_type for n in m.graph.node if n.domain in (custom_ops.DOMAIN, "com.microsoft")
                                  or "quantize" in n.op_type)
        notes[label] = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))
        if label.startswith("bq"):
            n_mm = sum(n.domain == custom_ops.DOMAIN and n.op_type in ("MatMulAffine", "MatMulLut") for n in m.graph.node)
            rows = collections.Counter(r for _, r in unpack_plan(m, "auto"))
            notes[label] += (f"; auto on {isa}, of {n_mm} MatMuls: {n_mm - rows.total()} packed, {rows.pop(1, 0)} "
                             f"unpacked, " + ", ".join(f"{v} packed below {k} rows" for k, v in sorted(rows.items())))
            sessions[f"{label}-packed"] = make_session(m, sess_options=options(threads), unpack="never")
            sessions[f"{label}-auto"] = auto = make_session(m, sess_options=options(threads), unpack="auto")
            notes[label] += (f"; one switch for the model: fp32 from {auto.switch} rows ({auto.rows_input})"
                             if isinstance(auto, SwitchingSession) else "; an If per MatMul")
            if tuned:
                t = tune.measure(m, threads)
                notes[label] += f"; tuned here: fp32 from {t.packed_below} rows" if t.packed_below else \
                    "; tuned here: packed at every rows measured"
                sessions[f"{label}-tuned"] = make_session(m, sess_options=options(threads), tuning=t)
        else:
            sessions[f"{label}-acc0"] = make_session(m, sess_options=options(threads))
            sessions[f"{label}-acc4"] = make_session(_accuracy4(m), sess_options=options(threads))
        del m
    return sessions, fp32, notes


def time_isa(job: dict) -> dict:
    """The worker: time every model of ``job`` under the kernels this process was started with."""
    want, isa = job["isa"], custom_ops.kernel_isa()
    if isa != want:
        return {"isa": want, "skipped": f"BAYESQ_ISA={want}: kernels {isa!r} (this CPU or build lacks it)", "rows": []}
    rows, notes = [], {}
    rng = np.random.default_rng(0)
    clock = _clock(job["clock"])
    for name, spec in job["models"].items():
        sessions, fp32, notes[name] = variant_sessions(spec["files"], job["threads"], job.get("tune", False))
        for shape in spec["shapes"]:
            batch, seq = parse_shape(shape)
            f = feeds(fp32, batch, seq, rng)
            why = None if f is not None else "the graph's input dimensions refuse it"
            for s in sessions.values() if why is None else ():
                try:
                    s.run(None, f)
                except Exception as e:   # noqa: BLE001 -- onnxruntime's own errors: the graph refuses this shape
                    why = "onnxruntime: " + str(e).split("Status Message:")[-1].strip().splitlines()[0][:100]
                    break
            if why:
                log.info("%s %s %s: skipped (%s)", name, isa, shape, why)
                rows.append({"model": name, "isa": isa, "shape": shape, "skipped": why})
                continue
            runs = {k: (lambda s=s: s.run(None, f)) for k, s in sessions.items()}
            batches = time_alternating(runs, job["reps"], clock, np.asarray)   # ms of each batch, in order
            t = {k: float(np.median(v)) for k, v in batches.items()}
            # each batch against the fp32 batch of the same round (run next to it): the quartiles say
            # how far the machine's noise reaches
            paired = {k: np.percentile(v / batches["fp32"], [25, 75]).tolist() for k, v in batches.items()}
            rows.append({"model": name, "isa": isa, "shape": shape, "m": batch * (seq or 1), "ms": t,
                         "paired": paired})
            log.info("%s %s %s: %s", name, isa, shape,
                     "  ".join(f"{k} {v:.2f}" + ("" if k == "fp32" else f" ({v / t['fp32']:.2f})") for k, v in t.items()))
        del sessions
    return {"isa": isa, "notes": notes, "rows": rows}


def supported_isas() -> list[str]:
    """The vector kernel sets this CPU and build have (the scalar fallback is only timed when asked)."""
    old = os.environ.get("BAYESQ_ISA")
    try:
        out = []
        for isa in ("avx512", "avx2", "neon"):
            os.environ["BAYESQ_ISA"] = isa
            if custom_ops.kernel_isa() == isa:
                out.append(isa)
        return out
    finally:
        if old is None:
            os.environ.pop("BAYESQ_ISA", None)
        else:
            os.environ["BAYESQ_ISA"] = old


def run_isa(job: dict, quiet: bool = False) -> dict:
    """``time_isa(job)`` in a subprocess started with ``BAYESQ_ISA=job['isa']``."""
    with tempfile.TemporaryDirectory() as tmp:
        jpath, opath = Path(tmp) / "job.json", Path(tmp) / "out.json"
        jpath.write_text(json.dumps(job))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(jpath), str(opath)]
        if quiet:
            cmd.append("--quiet")
        r = subprocess.run(cmd, env={**os.environ, "BAYESQ_ISA": job["isa"]})
        if r.returncode or not opath.is_file():
            return {"isa": job["isa"], "skipped": f"the worker failed (exit {r.returncode})", "rows": []}
        return json.loads(opath.read_text())


def suite(models: list[BenchModel], bits=(3.0, 4.0), isas=None, shapes: str | None = None, reps: int = 15,
          threads: int = 0, clock: str = "wall", folder: Path | None = None, quiet: bool = False,
          tuned: bool = False) -> dict:
    """Compress (or find) every model's variants, then time them under each ISA.  Returns
    ``{"results": [time_isa output per ISA], "files": {model: {label: path}}, "reports": ...}``."""
    folder = folder or default_cache() / "bench_model"
    files, achieved = {}, {}
    for bm in models:
        files[bm.name] = {k: str(v) for k, v in compressed(bm, tuple(bits), folder).items()}
        achieved[bm.name] = {k: json.loads(Path(v).with_suffix(".json").read_text())["bits_per_weight"]
                             for k, v in files[bm.name].items() if k != "fp32"}
    results = []
    for isa in isas or supported_isas():
        job = {"isa": isa, "reps": reps, "threads": threads, "clock": clock, "tune": tuned, "models": {}}
        for bm in models:
            tokens = _is_tokens(onnx.load(str(bm.model), load_external_data=False))
            job["models"][bm.name] = {"files": files[bm.name],
                                      "shapes": (shapes or (TOKEN_SHAPES if tokens else IMAGE_SHAPES)).split(",")}
        results.append(run_isa(job, quiet))
    return {"results": results, "files": files, "bits": achieved}


def table_rows(out: dict) -> list[dict]:
    """One flat row per (model, ISA, shape, variant): ms, the ratio to fp32 (of the medians) and the
    quartiles of the batch-by-batch ratios."""
    rows = []
    for res in out["results"]:
        for r in res["rows"]:
            if "ms" not in r:
                continue
            for variant, ms in r["ms"].items():
                label = variant.rsplit("-", 1)[0]
                bits = 32.0 if variant == "fp32" else out["bits"][r["model"]][label]
                rows.append({"model": r["model"], "isa": r["isa"], "shape": r["shape"], "m": r["m"],
                             "variant": variant, "bits_per_weight": round(bits, 4), "ms": round(ms, 4),
                             "ratio": round(ms / r["ms"]["fp32"], 4), "paired_q1": round(r["paired"][variant][0], 4),
                             "paired_q3": round(r["paired"][variant][1], 4)})
    return rows


def goals(rows: list[dict]) -> list[str]:
    """Issue 12's whole-model goals, met or not, from the measured rows."""
    lines = []
    for variant in ("bq3-auto", "bq3-tuned"):
        auto3 = [r for r in rows if r["variant"] == variant]
        if not auto3:
            continue
        worst = max(auto3, key=lambda r: r["ratio"])
        slower = [r for r in auto3 if r["ratio"] > 1.0]
        beyond = [r for r in auto3 if r["paired_q1"] > 1.0]
        how = "unpack=auto" if variant == "bq3-auto" else "unpack=auto on the switch tuned here"
        lines.append(f"goal: bayesq 3.0 bits with {how} <= 1.0x fp32 at every shape: "
                     f"{'met' if not slower else f'NOT met at {len(slower)} of {len(auto3)}'} "
                     f"(worst {worst['ratio']:.2f}x: {worst['model']} {worst['isa']} {worst['shape']}); slower "
                     f"beyond the noise (3 in 4 paired batches slower) at {len(beyond)} of {len(auto3)}"
                     + "".join(f"; {r['model']} {r['isa']} {r['shape']} {r['ratio']:.2f}x" for r in beyond))
    m1 = [r for r in rows if r["variant"] == "bq3-packed" and r["model"] == "smollm2" and r["m"] == 1]
    if m1:
        lines += [f"goal: SmolLM2 one token (M=1) bayesq 3.0 bits packed <= 0.8x fp32 on {r['isa']}: "
                  f"{'met' if r['ratio'] <= 0.8 else 'NOT met'} ({r['ratio']:.2f}x)" for r in m1]
    else:
        lines.append("goal: SmolLM2 one token (M=1) packed <= 0.8x fp32: not measured in this run")
    return lines


def print_table(out: dict) -> None:
    for res in out["results"]:
        if res.get("skipped"):
            print(f"ISA {res['isa']}: skipped: {res['skipped']}")
        for model, notes in res.get("notes", {}).items():
            for k, v in notes.items():
                print(f"{model} {k} ({out['bits'][model][k]:.3f} bits/weight), {res['isa']}: {v}")
    done = [r for res in out["results"] for r in res["rows"]]
    variants = list(next((r["ms"] for r in done if "ms" in r), {}))
    print("\n| model | ISA | shape | M | fp32 ms | " + " | ".join(v for v in variants if v != "fp32") + " |")
    print("|---" * (5 + len(variants) - 1) + "|")
    for r in done:
        if "ms" not in r:
            print(f"| {r['model']} | {r['isa']} | {r['shape']} | - | skipped: {r['skipped']} |")
            continue
        base = r["ms"]["fp32"]
        cells = [f"{_ms(r['ms'][v])} ({r['ms'][v] / base:.2f})" + (" *" if r["paired"][v][0] > 1.0 else "")
                 for v in variants if v != "fp32"]
        print(f"| {r['model']} | {r['isa']} | {r['shape']} | {r['m']} | {_ms(base)} | " + " | ".join(cells) + " |")
    print("\nms per run (ratio of the medians to fp32's; *: slower than fp32 in 3 of 4 paired batches)")
    for line in goals(table_rows(out)):
        print(line)


def _ms(v: float) -> str:
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)


MODELS = ("minilm", "fashion_mnist", "efficientnet", "smollm2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="FP32.onnx COMPRESSED.onnx (default: the demo's MiniLM)")
    ap.add_argument("--shapes", default=None,
                    help="BATCHxSEQ (SEQ fills the free dimensions after the batch) or BATCH (fixed-size "
                    f"inputs, e.g. images), comma-separated (default: 1x64,4x64,16x64; suite: {TOKEN_SHAPES} "
                    f"for token models, {IMAGE_SHAPES} for images)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (with --threads 1, the work on a busy machine)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--suite", action="store_true", help="every bench model, budget, ISA and unpack policy")
    ap.add_argument("--models", dest="suite_models", default=",".join(MODELS), help="suite: bench models")
    ap.add_argument("--bits", default="3.0,4.0", help="suite: bayesq budgets (bits per weight)")
    ap.add_argument("--isas", default=None, help="suite: BAYESQ_ISA values (default: every vector set the CPU has)")
    ap.add_argument("--out", type=Path, default=None, help="suite: write the rows as CSV here")
    ap.add_argument("--tune", action="store_true", help="suite: also time auto on the switch `bayesq-onnx tune` "
                                                        "measures for each bayesq model here (bq*-tuned)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)   # JOB.json OUT.json: one ISA's timings
    args = ap.parse_args(argv)
    try:
        [parse_shape(x) for x in (args.shapes or "1").split(",")]
        bits = tuple(float(b) for b in args.bits.split(","))
    except ValueError as e:
        ap.error(f"--shapes or --bits: {e}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.worker:
        job = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(time_isa(job)))
        return 0
    if not args.suite:
        if len(args.models) not in (0, 2):
            ap.error("give both models or neither")
        return two_models(args)
    if args.models:
        ap.error("--suite takes no model paths (--models names bench models)")
    names = args.suite_models.split(",")
    if unknown := [n for n in names if n not in MODELS]:
        ap.error(f"unknown bench models {unknown}: expected some of {', '.join(MODELS)}")
    cache = default_cache()
    out = suite([asset_model(n, cache) for n in names], bits,
                args.isas.split(",") if args.isas else None, args.shapes, args.reps, args.threads, args.clock,
                quiet=args.quiet, tuned=args.tune)
    print(f"threads {args.threads or 'default'}, median of {args.reps} alternating batches, {args.clock} ms per run")
    print_table(out)
    if args.out:
        write_csv(table_rows(out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
