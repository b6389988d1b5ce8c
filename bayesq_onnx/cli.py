"""Command line: the only place that parses arguments or sets up logging."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import METHODS
from .errors import BayesQError, first_line

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage block too)
        raise BayesQError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bayesq-onnx", description="BayesQ post-training weight quantization for ONNX models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="quantize a model's weights to a bit budget")
    c.add_argument("model", help="input .onnx model (never modified)")
    c.add_argument("--bits", type=float, required=True, help="budget: stored bits per quantized weight, all included")
    c.add_argument("--calib", help=".npz (keys = input names, axis 0 = samples) or a directory of them; "
                                   "without it, synthetic data is used (with a warning)")
    c.add_argument("-o", "--output", help="output model (default: MODEL.bq.onnx)")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--method", default="bayesq", help=f"one of {', '.join(sorted(METHODS))} (default: bayesq)")
    c.add_argument("--curvature", help="CURV.npz: diagonal curvature per initializer (e.g. gradient curvature)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress output")

    e = sub.add_parser("eval", help="compare a quantized model with its reference in onnxruntime")
    e.add_argument("ref")
    e.add_argument("quant")
    e.add_argument("--data", required=True, help=".npz of inputs (axis 0 = samples)")
    e.add_argument("--labels", help=".npy of integer labels, one per sample")
    e.add_argument("--json", help="write the metrics here as JSON")
    e.add_argument("--quiet", action="store_true")

    d = sub.add_parser("demo", help="the main job on a real model: all-MiniLM-L6-v2 on fortunes text")
    d.add_argument("--bits", type=float, default=3.0)
    d.add_argument("--cache", default=None, help="asset cache directory (default: $BAYESQ_CACHE or ~/.cache/bayesq-onnx)")
    d.add_argument("--method", default="bayesq")
    d.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bayesq_onnx").propagate = False
    try:
        args = _parser().parse_args(argv)
        _setup_logging(args.quiet)
        return {"compress": _compress, "eval": _eval, "demo": _demo}[args.command](args)
    except BayesQError as e:
        print(f"bayesq-onnx: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bayesq-onnx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("BAYESQ_DEBUG"):
            raise
        print(f"bayesq-onnx: internal error: {type(e).__name__}: {first_line(e)} "
              "(set BAYESQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("bayesq_onnx")
    logger.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("bayesq-onnx: %(message)s"))
    logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _recipe(args):
    from .config import Recipe
    try:
        return Recipe(bits=args.bits, method=args.method, seed=args.seed, curvature=args.curvature)
    except ValueError as e:
        raise BayesQError(str(e)) from None


def _compress(args) -> int:
    from .api import compress
    recipe = _recipe(args)
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".bq.onnx")
    if out.resolve() == Path(args.model).resolve():
        raise BayesQError("the output path is the input model: choose another -o")
    res = compress(args.model, recipe, calib=args.calib, output=out, report=args.report)
    r = res.report
    print(f"{out}: {r['bits_per_weight']:.3f} bits/weight stored ({r['code_bits_per_weight']:.3f} in codes), "
          f"{len(r['layers'])} weights quantized, {len(r['skipped'])} skipped, plan: {r['plan']}, "
          f"{r['output_bytes'] / 1e6:.2f} MB")
    return 0


def _eval(args) -> int:
    from .validate.compare import evaluate_files
    metrics = evaluate_files(args.ref, args.quant, args.data, args.labels)
    if args.json:
        from .graph.model_io import save_json_atomic
        save_json_atomic(metrics, args.json)
    print(json.dumps(metrics, indent=2))
    return 0


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(bits=args.bits, method=args.method, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
