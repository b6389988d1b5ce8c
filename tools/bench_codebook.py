"""Lloyd-Max codebooks: the numpy reference against the native fit (``custom_ops/src/codebook.cpp``),
side by side in one run.

    python tools/bench_codebook.py [--reps 3] [--spread 0.3]

Per matrix shape and number of levels: the median wall time of ``lloyd_max`` followed by
``expected_codebook_loss`` (per-row codebooks, the default ``auto`` start) on each path, their
ratio, the largest relative difference of the two paths' final losses and the share of rows whose
codebooks are identical.  Means ~ N(0, 0.02), sigma = ``spread`` x the row's min/max level spacing
(x U(0.5, 1.5)), weights gamma-distributed per element and per column.  Then two (768, 2048)
sites, 8 levels, one after the other and on two threads (as ``parallel.parallel_map`` runs
sites): the native call releases the GIL.  Needs the library built (``pip install -e .``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx.quantize import codebook_native  # noqa: E402
from bayesq_onnx.quantize.codebook import expected_codebook_loss, lloyd_max  # noqa: E402

PATHS = ("numpy", "native")


def use(path: str) -> None:
    if path == "numpy":
        os.environ["BAYESQ_CODEBOOK"] = "numpy"
    else:
        os.environ.pop("BAYESQ_CODEBOOK", None)


def posterior(rng, shape, levels, spread):
    mu = rng.normal(0.0, 0.02, shape)
    spacing = np.ptp(mu, axis=1, keepdims=True) / (levels - 1)
    sigma = spread * spacing * rng.uniform(0.5, 1.5, shape)
    weight = rng.gamma(2.0, 1.0, shape) * rng.gamma(2.0, 1.0, (1, shape[1]))
    return mu, sigma, weight


def fit(mu, sigma, weight, levels):
    cb = lloyd_max(mu, sigma, weight, levels)
    return cb, expected_codebook_loss(mu, sigma, weight, cb)


def median_time(f, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--spread", type=float, default=0.3, help="sigma / level spacing (about)")
    args = ap.parse_args()
    use("native")
    if codebook_native.library() is None:
        print("the native codebooks are not built (pip install -e .)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    print("| shape | levels | numpy s | native s | ratio | max rel loss diff | identical rows |")
    print("|---|---|---|---|---|---|---|")
    for shape in ((768, 768), (2048, 768)):
        for levels in (4, 8, 16):
            post = posterior(rng, shape, levels, args.spread)
            t, res = {}, {}
            for path in PATHS:
                use(path)
                t[path], res[path] = median_time(lambda: fit(*post, levels), args.reps)
            (cb_n, loss_n), (cb_c, loss_c) = res["numpy"], res["native"]
            rel = np.max(np.abs(loss_c - loss_n) / loss_n)
            print(f"| {shape} | {levels} | {t['numpy']:.2f} | {t['native']:.2f} | {t['numpy'] / t['native']:.1f} | "
                  f"{rel:.1e} | {np.mean(np.all(cb_n == cb_c, axis=1)):.3f} |")
    sites = [posterior(rng, (768, 2048), 8, args.spread) for _ in range(2)]
    for path in PATHS:
        use(path)
        serial, _ = median_time(lambda: [fit(*s, 8) for s in sites], args.reps)
        with ThreadPoolExecutor(2) as ex:
            threads, _ = median_time(lambda: list(ex.map(lambda s: fit(*s, 8), sites)), args.reps)
        print(f"two (768, 2048) sites, 8 levels, {path}: one after the other {serial:.2f} s, "
              f"on two threads {threads:.2f} s ({threads / serial:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
