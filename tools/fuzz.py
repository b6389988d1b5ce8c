"""The fuzz property of tests/test_fuzz.py at scale: random small MLP / Conv / Gather / attention-like
graphs, budgets and options through ``bayesq-onnx compress``; each run must be refused in one line
(exit 2) or write a model that passes the full checker, loads, and matches the numpy reference ops
(tests/fuzzing.py).  Prints a summary; exit status 1 if anything crashed.

    python tools/fuzz.py --examples 1000 [--seed 0] [--show 3]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # this checkout's package, and tests/fuzzing.py

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import fuzzing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="how many random cases to run (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed: the same seed draws the same cases")
    ap.add_argument("--show", type=int, default=3, help="crashes printed in full, with their case and traceback")
    args = ap.parse_args()

    outcomes: list[tuple[fuzzing.Case, fuzzing.Outcome]] = []
    t0 = time.perf_counter()

    # every example is recorded, none fails: hypothesis would otherwise stop at the first crash and shrink it
    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=fuzzing.cases())
    def run(case):
        outcomes.append((case, fuzzing.run_case(case)))
        if len(outcomes) % 50 == 0:
            print(f"{len(outcomes)} examples, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    run()
    status = Counter(o.status for _, o in outcomes)
    crashes = [(c, o) for c, o in outcomes if o.status == "crash"]
    tracebacks = sum(any("Traceback" in d for d in o.details) for _, o in crashes)
    kinds = Counter(c.kind for c, o in outcomes if o.status == "checked")
    # refusals grouped by their wording (paths and numbers left out)
    reasons = Counter(re.sub(r"(?<![\w/])/\S+|\d+(\.\d+)?", "_", o.message)[:100] for _, o in outcomes
                      if o.status == "rejected")
    print(f"{len(outcomes)} examples in {time.perf_counter() - t0:.0f} s: {status['checked']} written and checked "
          f"({sum(o.outputs_checked for _, o in outcomes)} outputs against the reference ops; "
          f"{', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), {status['rejected']} refused in one line, "
          f"{len(crashes)} crashes ({tracebacks} with a traceback)")
    for r, n in reasons.most_common(6):
        print(f"  refused {n}x: {r}")
    for c, o in crashes[:args.show]:
        print(f"\ncrash: {o.message}\n  case: {c.describe()}\n" + "\n".join(o.details))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
