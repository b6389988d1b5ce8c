"""Study: could kron's per-site end-to-end measurement stop a few segments below the site?

    python tools/study_cut_factors.py MODEL.onnx CALIB.npz [--hops 1,2,4,8] [--save rows.json]

kron measures each site's end-to-end factor by running the model from the site's segment to the
outputs (docs/design.md, "Loss tables"): half a forward pass per site, the tables' largest cost.
The cheaper route studied here runs a site's codes only ``h`` segments on, reads its error energy
``e_s(c) = ||x_c - x_c^ref||^2`` at that cut ``c``, and takes the rest of the way from one factor
per cut, ``F(c) = D / e(c)``.  For every site (the codes kron's factor is measured with, on kron's
samples) this records ``e_s`` at every later cut and the measured distortion ``D_s``, then predicts
``D_s = e_s(c) F(c)`` with ``F(c)`` the median of the other sites' ratios at that cut (sites at
least ``h`` segments above it): an optimistic factor, taken from the very measurements the route
would save.  Prints, per ``h``, the prediction's |log error| (median, 90th percentile, max) over
the sites at least ``h`` segments above the end, and the share of the measurements' segment runs
the route would keep (not counting the runs that would measure each cut's factor).  Costs one
measurement per site, as the tables make them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx.api import Analysis  # noqa: E402
from bayesq_onnx.config import Recipe  # noqa: E402
from bayesq_onnx.plan.proxy import _sum_sq  # noqa: E402
from bayesq_onnx.plan.tables import _hull_table, _scale_reference  # noqa: E402
from bayesq_onnx.runtime.stream import SegmentRun  # noqa: E402


def record(model: str, calib: str) -> tuple[int, list[dict]]:
    """Per site: its first segment ``k``, its error energy at every later cut, its distortion ``D``."""
    a = Analysis(model, Recipe(bits=4.0), calib=calib)
    dist = a._table_distortion
    run = SegmentRun(dist.probe, [s.name for s in a.sites], dist.data, dist.batch_size)
    n, rows = len(run.stream), []
    for block, qs in a.blocks():
        for s in block:
            q, fs = qs[s.name], a.candidates[s.name]
            _, hull = _hull_table(s, fs, q.layer_loss)
            ref = _scale_reference(s, fs, hull)
            if ref is None:
                continue
            overrides = {s.name: s.from_view(q.quick_codes(fs[ref]).dequantize())}
            k = run.first_segment(s.name)
            states, cuts = [dict(st) for st in run.starts[k]], {}
            for j in range(k, n):
                out = run.stream.advance(j, states, overrides)
                if j + 1 < n and run.stream.segments[j + 1] is not None:
                    c = run.stream.segments[j + 1].start
                    cuts[j + 1] = float(sum(_sum_sq(st[c], r[c]) for st, r in zip(states, run.starts[j + 1])))
            rows.append({"name": s.name, "k": k, "D": dist.of_outputs(out), "cuts": cuts})
            print(f"{s.name}: segment {k}, D {rows[-1]['D']:.3e}", file=sys.stderr)
    return n, rows


def summary(n: int, rows: list[dict], hops: list[int]) -> None:
    full = sum(n - r["k"] for r in rows)
    print("| h (segments) | median abs log error | 90th pct | max | segment runs kept |")
    print("|---|---|---|---|---|")
    for h in hops:
        errs, runs = [], 0
        for r in rows:
            c = r["k"] + h
            if c not in r["cuts"] or r["cuts"][c] <= 0:   # within h of the end: measured to it
                runs += n - r["k"]
                continue
            others = [o["D"] / o["cuts"][c] for o in rows
                      if o is not r and c - o["k"] >= h and o["cuts"].get(c, 0) > 0 and o["D"] > 0]
            if not others or r["D"] <= 0:
                continue
            errs.append(abs(np.log(r["cuts"][c] * np.exp(np.median(np.log(others))) / r["D"])))
            runs += h
        e = np.array(errs)
        print(f"| {h} | {np.median(e):.3f} | {np.percentile(e, 90):.3f} | {e.max():.3f} | {runs / full:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("--hops", default="1,2,4,8", help="segments measured below each site")
    ap.add_argument("--save", type=Path, help="write the recorded rows (JSON)")
    args = ap.parse_args()
    n, rows = record(args.model, args.calib)
    if args.save:
        args.save.write_text(json.dumps({"segments": n, "rows": rows}))
    summary(n, rows, [int(h) for h in args.hops.split(",")])


if __name__ == "__main__":
    main()
