"""GPU kernel timings of the bayesq CUDA kernels (``libbayesq_cuda.so``), side by side in one run with
the device's own copy bandwidth and cuBLAS's fp16 GEMV / GEMM (torch.matmul on the dense weight).

    python tools/bench_gpu.py [--shapes 4096x4096,4096x14336,14336x4096] [--bits 3,4] [--kinds affine,lut]
                              [--block 32] [--gemm-rows 512] [--reps 15] [--csv out.csv]

Shapes are K x N: ``Y = A (M, K) @ W (K, N)``, A and Y float16, the packed weight's scales / levels
float16: affine formats in groups of ``--block``, codebooks one per row (block 0, as the allocator
offers them).  Rows of the table:
- ``copy``: a 1 GiB device-to-device copy, GB/s counting what is read and written: the bandwidth a
  kernel can hope for.
- GEMV (M = 1): ours and cuBLAS fp16 on the dense weight; GB/s counts the bytes each reads (our packed
  codes, scales, zero points / levels; cuBLAS the fp16 weight), and ``of copy`` is that over the copy's.
- GEMM (M = ``--gemm-rows``): ours fused (decode into fp16 tiles, tensor cores), the other route
  (our dequantize kernel into a temporary fp16 W, then cuBLAS: path "cublas"), and cuBLAS fp16 on a
  dense weight; TFLOP/s and the time over cuBLAS's.
Candidates of a case are timed in alternation (``--reps`` rounds in a rotating order, each a batch of
launches between two CUDA events); medians.  Each product is also checked against cuBLAS on the same
decoded weight (``max err``, relative to the output's largest magnitude).  Random codes: the numbers
say nothing about accuracy.  Needs torch with CUDA; imports only numpy and torch from outside.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx.formats import BayesqLut, BayesqUniform, LutCodes, UniformCodes  # noqa: E402
from bayesq_onnx.formats.bayesq_uniform import groups  # noqa: E402
from bayesq_onnx.runtime import cuda  # noqa: E402


def packed_weight(kind: str, bits: int, K: int, N: int, block: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    G = groups(K, block)
    codes = rng.integers(0, 1 << bits, (N, K), dtype=np.uint8)
    if kind == "lut":
        q = LutCodes(codes=codes, lut=(0.02 * rng.standard_normal((N, G, 1 << bits))).astype(np.float32), bits=bits,
                     block=block)
        fmt = BayesqLut(bits, block, "float16")
    else:
        q = UniformCodes(codes=codes, scale=rng.uniform(0.001, 0.01, (N, G)).astype(np.float32),
                         zero_point=np.full((N, G), 1 << (bits - 1), np.uint8), bits=bits, block=block)
        fmt = BayesqUniform(bits, block, "float16")
    return fmt.pack(fmt.stored_codes(q))


def timed(torch, fns: dict, reps: int, batch: int) -> dict[str, float]:
    """Median seconds per call of each function, in alternation."""
    for f in fns.values():   # warm up (and first-launch costs)
        f()
    torch.cuda.synchronize()
    names, times = list(fns), {k: [] for k in fns}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fns[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / batch)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--kinds", default="affine,lut")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--gemm-rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--csv", type=Path)
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    rows = []

    src = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t = timed(torch, {"copy": lambda: dst.copy_(src)}, a.reps, 5)["copy"]
    copy_bw = 2 * src.numel() * 4 / t
    rows.append(dict(case="copy 1 GiB", route="device copy", ms=t * 1e3, rate=f"{copy_bw / 1e9:.0f} GB/s", vs="1.00"))
    del src, dst

    for shape in a.shapes.split(","):
        K, N = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(K + N)
        A1 = torch.from_numpy(rng.standard_normal((1, K)).astype(np.float16)).to(dev)
        Am = torch.from_numpy(rng.standard_normal((a.gemm_rows, K)).astype(np.float16)).to(dev)
        dense = (0.01 * torch.randn((K, N), device=dev)).half()
        for kind in a.kinds.split(","):
            for bits in (int(b) for b in a.bits.split(",")):
                block = a.block if kind == "affine" else 0
                host = packed_weight(kind, bits, K, N, block, bits)
                packed = {k: torch.from_numpy(v).to(dev) for k, v in host.items()}
                wbytes = sum(v.nbytes for v in host.values())
                kw = dict(K=K, N=N, bits=bits, block=block)
                W16 = cuda.dequantize(packed, inner=N, dtype=torch.float16, **kw)
                case = f"{K}x{N} {kind}{bits} g{block}"
                # correctness against cuBLAS on the same decoded weight
                for M, A, path in ((1, A1, "gemv"), (a.gemm_rows, Am, "gemm"), (a.gemm_rows, Am, "cublas")):
                    ref = (A.float() @ W16.float())
                    got = cuda.matmul(packed, A, path=path, **kw).float()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    rows.append(dict(case=f"{case} M={M}", route=f"check {path}", ms=0.0, rate=f"max err {err:.1e}", vs=""))
                g = timed(torch, {"ours": lambda: cuda.matmul(packed, A1, path="gemv", **kw),
                                  "cublas": lambda: A1 @ dense}, a.reps, 20)
                for name, nbytes in (("ours", wbytes), ("cublas", dense.numel() * 2)):
                    rows.append(dict(case=f"{case} M=1", route=f"GEMV {name}", ms=g[name] * 1e3,
                                     rate=f"{nbytes / g[name] / 1e9:.0f} GB/s",
                                     vs=f"{nbytes / g[name] / copy_bw:.2f} of copy"))
                fl = 2.0 * a.gemm_rows * K * N
                m = timed(torch, {"fused": lambda: cuda.matmul(packed, Am, path="gemm", **kw),
                                  "dequant+cublas": lambda: cuda.matmul(packed, Am, path="cublas", **kw),
                                  "cublas": lambda: Am @ dense}, a.reps, 5)
                for name in ("fused", "dequant+cublas", "cublas"):
                    rows.append(dict(case=f"{case} M={a.gemm_rows}", route=f"GEMM {name}", ms=m[name] * 1e3,
                                     rate=f"{fl / m[name] / 1e12:.1f} TFLOP/s", vs=f"{m[name] / m['cublas']:.2f}x cuBLAS"))
                print(f"  {case}: GEMV {g['ours'] * 1e6:.0f} us ({wbytes / g['ours'] / copy_bw:.2f} of copy), "
                      f"GEMM {m['fused'] / m['cublas']:.2f}x cuBLAS", flush=True)
                del packed, W16

    width = max(len(r["case"]) for r in rows)
    print(f"\n{'case':<{width}}  {'route':<20} {'ms':>9}  {'rate':>16}  vs")
    for r in rows:
        ms = f"{r['ms']:9.4f}" if r["ms"] else " " * 9
        print(f"{r['case']:<{width}}  {r['route']:<20} {ms}  {r['rate']:>16}  {r['vs']}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
