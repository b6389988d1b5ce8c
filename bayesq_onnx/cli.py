"""Command line: the only place that parses arguments or sets up logging."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import METHODS, TARGETS
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
    c.add_argument("--curvature", help="CURV.npz: diagonal curvature per initializer and sample (bayesq-onnx curvature)")
    c.add_argument("--target", default="ort-cpu", help=f"one of {', '.join(TARGETS)}: ort-cpu runs formats beyond "
                   "onnxruntime's with the bayesq custom-op library; portable rebuilds them with standard ops")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress output")

    e = sub.add_parser("eval", help="compare a quantized model with its reference in onnxruntime")
    e.add_argument("ref")
    e.add_argument("quant")
    e.add_argument("--data", required=True, help=".npz of inputs (axis 0 = samples)")
    e.add_argument("--labels", help=".npy of integer labels, one per sample")
    e.add_argument("--json", help="write the metrics here as JSON")
    e.add_argument("--quiet", action="store_true")

    g = sub.add_parser("curvature", help="diagonal curvature of a model's weights (CURV.npz for compress --curvature)")
    g.add_argument("model", help="input .onnx model (never modified)")
    g.add_argument("--calib", required=True, help=".npz (keys = input names, axis 0 = samples) or a directory of them")
    g.add_argument("--source", default="fisher", help="fisher (default), hutchinson or activation")
    g.add_argument("--probes", type=int, help="hutchinson: Rademacher probes (default 32); fisher: labels sampled "
                                              "per input (default: the exact expectation when affordable, else 1)")
    g.add_argument("--likelihood", default="categorical", help="categorical (default: softmax over the last axis) "
                                                               "or gaussian (unit variance: embeddings, regression)")
    g.add_argument("--labels", help=".npy, one entry per sample (default: labels from the model's own predictive)")
    g.add_argument("--output", dest="output_name", help="the model output the likelihood is over (default: the first)")
    g.add_argument("--evidence", type=float, default=1.0, help="multiply the curvature by this (training samples; "
                                                                "default 1: the curvature of the mean loss)")
    g.add_argument("--kfac", help="also write K-FAC factors A/<weight>, G/<weight> of linear sites here (fisher)")
    g.add_argument("--report", help="write settings, timing and the estimator's spread here as JSON")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, help="torch threads (default: torch's; on a busy machine 1 is often faster)")
    g.add_argument("-o", dest="out", required=True, help="CURV.npz to write")
    g.add_argument("--quiet", action="store_true", help="no progress output")

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
        return {"compress": _compress, "eval": _eval, "curvature": _curvature, "demo": _demo}[args.command](args)
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
        return Recipe(bits=args.bits, method=args.method, seed=args.seed, curvature=args.curvature,
                      target=args.target)
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


def _curvature(args) -> int:
    import math

    from .curvature.compute import compute_curvature
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise BayesQError("the output path is the input model: choose another -o")
    if args.report:
        from .graph.model_io import check_writable
        check_writable(args.report)
    res = compute_curvature(args.model, args.calib, source=args.source, probes=args.probes,
                            likelihood=args.likelihood, labels=args.labels, output=args.output_name, seed=args.seed,
                            evidence=args.evidence, threads=args.threads, path=args.out, kfac_path=args.kfac)
    info = res.info
    what = info["source"]
    if what != "activation":
        fi = info.get("fisher")
        how = ("given labels" if info["labels"] == "given" else
               "exact expectation over the model's labels" if fi and fi["mode"] == "exact" else
               f"{fi['draws']} sampled label(s) per input" if fi else "KL from the model's own predictive")
        what += f", {info['likelihood']} over {info['output']!r}, {how}"
    print(f"{args.out}: {what}: {info['tensors']} tensors, {info['weights']} weights, "
          f"{info['samples']} samples, {info['seconds']:.1f} s")
    h = info.get("hutchinson")
    if h:
        s = h["rel_stderr_summary"]
        if s["median"] is not None:
            totals = s["totals_median"] if s["totals_median"] is not None else float("nan")
            need = (f"about {max(1, round(h['probes'] * (s['median'] / 0.1) ** 2))} probes for 10% per tensor"
                    if math.isfinite(s["median"]) else "the median tensor has no signal above the noise yet")
            print(f"  {h['probes']} probes: relative standard error per tensor median {s['median']:.3g}, "
                  f"max {s['max']:.3g} ({s['worst']}), of the tensors' totals median {totals:.3g}; "
                  f"{need} (the error falls as 1/sqrt(probes))")
        print(f"  {h['clipped_negative']} negative estimates ({100 * h['clipped_share']:.2f}%) clipped to 0, "
              "each tensor rescaled to its unclipped total")
    if args.report:
        from .graph.model_io import save_json_atomic
        save_json_atomic(info, args.report)
    return 0


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(bits=args.bits, method=args.method, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
