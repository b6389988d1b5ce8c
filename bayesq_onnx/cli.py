"""Command line: the only place that parses arguments or sets up logging."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import METHODS, TABLE_SOURCES, TARGETS
from .errors import BayesQError, first_line

log = logging.getLogger("bayesq_onnx.cli")
EXIT_BAD_INPUT = 2
PROG = "bayesq-onnx"
COMMANDS = ("compress", "eval", "curvature", "demo")

# a few words per loss-table source for --tables; a source added to config.TABLE_SOURCES without an
# entry here is still offered, under its bare name
TABLES_HELP = {
    "auto": "the default for the curvature given (kron; closed_form with --curvature)",
    "kron": "each candidate's predicted layer error times the site's end-to-end factor, measured once "
            "per site (fast)",
    "proxy": "each candidate measured end to end on calibration data (slow: a dozen passes per weight)",
    "closed_form": "the closed form alone (for curvature files)",
}


class _UsageError(BayesQError):
    """A malformed command line (argparse's complaint), already prefixed with the subcommand."""


class _Exit(Exception):
    """--help or --version done: leave main() with this status (argparse would sys.exit)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """One line, exit 2 for a bad command line (argparse's default prints the usage block and exits
    itself).  The message names the subcommand; main() adds the "bayesq-onnx: error:" prefix once."""

    def error(self, message):
        command = self.prog[len(PROG):].strip() if self.prog.startswith(PROG) else self.prog
        raise _UsageError(f"{command}: {message}" if command else message)

    def exit(self, status=0, message=None):
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version(PROG)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__
        return __version__


def _tables_help() -> str:
    what = "; ".join(f"{t}: {TABLES_HELP[t]}" if t in TABLES_HELP else t for t in TABLE_SOURCES)
    return f"where the allocator's loss tables come from (bayesq only) -- {what} (default: auto)"


def _parser(lenient: bool = False) -> argparse.ArgumentParser:
    """The command line.  ``lenient``: nothing is required (a parse that only looks for unknown
    arguments, whose message must win over a "required" one: a misspelt --bits is reported as such)."""
    req = not lenient
    p = _Parser(prog=PROG, description="BayesQ post-training weight quantization for ONNX models.",
                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compress", help="quantize a model's weights to a bit budget", allow_abbrev=False)
    c.add_argument("model", help="input .onnx model (never modified)")
    c.add_argument("--bits", type=float, required=req,
                   help="budget: stored bits per quantized weight, all included")
    c.add_argument("--calib", help=".npz (keys = input names, axis 0 = samples) or a directory of them; "
                                   "without it, synthetic data is used (with a warning)")
    c.add_argument("-o", "--output", help="output model (default: MODEL.bq.onnx)")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--method", default="bayesq", help=f"one of {', '.join(sorted(METHODS))} (default: bayesq)")
    c.add_argument("--curvature", help="CURV.npz: diagonal curvature per initializer and sample (bayesq-onnx curvature)")
    c.add_argument("--tables", default="auto", choices=TABLE_SOURCES, help=_tables_help())
    c.add_argument("--target", default="ort-cpu", help=f"one of {', '.join(TARGETS)}: ort-cpu runs formats beyond "
                   "onnxruntime's with the bayesq custom-op library; portable rebuilds them with standard ops")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic calibration data (default 0; everything else is deterministic)")
    c.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    e = sub.add_parser("eval", help="compare a quantized model with its reference in onnxruntime",
                       allow_abbrev=False)
    e.add_argument("ref", help="reference .onnx model (e.g. the fp32 original)")
    e.add_argument("quant", help="the .onnx model to compare with it (e.g. written by compress)")
    e.add_argument("--data", required=req, help=".npz of inputs (keys = input names, axis 0 = samples)")
    e.add_argument("--labels", help=".npy of integer labels, one per sample (or per position: the logits' "
                                    "shape without its last axis); accuracy of both models on logits outputs")
    e.add_argument("--json", help="write all the metrics here as JSON (the terminal gets a summary)")
    e.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    g = sub.add_parser("curvature", help="diagonal curvature of a model's weights (CURV.npz for compress --curvature)",
                       allow_abbrev=False)
    g.add_argument("model", help="input .onnx model (never modified)")
    g.add_argument("--calib", required=req,
                   help=".npz (keys = input names, axis 0 = samples) or a directory of them")
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
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the sampled labels and Hutchinson probes (default 0)")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's; on a busy machine 1 is often faster)")
    g.add_argument("-o", dest="out", required=req, help="CURV.npz to write")
    g.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    d = sub.add_parser("demo", help="the main job on a real model: all-MiniLM-L6-v2 on fortunes text",
                       allow_abbrev=False)
    d.add_argument("--bits", type=float, default=3.0, help="budget in stored bits per weight (default 3.0)")
    d.add_argument("--cache", default=None, help="asset cache directory (default: $BAYESQ_CACHE or ~/.cache/bayesq-onnx)")
    d.add_argument("--baseline", default="gptq", help="the uniform method bayesq is compared with at the same "
                   f"stored bits: one of {', '.join(sorted(m for m in METHODS if m != 'bayesq'))} (default: gptq)")
    d.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown argument is named before any other complaint about the command line
    (argparse checks required arguments first, so ``--bitz 3`` would read as "--bits is required")."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, unknown = _parser().parse_known_args(argv)
        command = args.command
    except _UsageError:
        try:  # the same line parsed with nothing required: only to find unknown arguments
            lenient, unknown = _parser(lenient=True).parse_known_args(argv)
        except _UsageError:
            unknown = []
        if not unknown:
            raise
        command = lenient.command
    if unknown:
        raise _UsageError(f"{command + ': ' if command else ''}unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        print(_parser().format_help(), end="")
        raise _UsageError(f"a command is required: one of {', '.join(COMMANDS)} (see the usage above)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bayesq_onnx").propagate = False
    try:
        args = _parse(argv)
        _setup_logging(args.quiet)
        return {"compress": _compress, "eval": _eval, "curvature": _curvature, "demo": _demo}[args.command](args)
    except _Exit as e:
        return e.status
    except BayesQError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("BAYESQ_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {first_line(e)} "
              "(set BAYESQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


class _Formatter(logging.Formatter):
    """``bayesq-onnx: message`` for progress, ``bayesq-onnx: warning: message`` for warnings."""

    def format(self, record):
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{PROG}: {level}{record.getMessage()}"


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("bayesq_onnx")
    logger.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Formatter())
    logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _recipe(args):
    from .config import Recipe
    try:
        recipe = Recipe(bits=args.bits, method=args.method, seed=args.seed, curvature=args.curvature,
                        tables=args.tables, target=args.target)
    except ValueError as e:
        raise BayesQError(str(e)) from None
    if args.tables != "auto" and recipe.method_spec.planner != "knapsack":
        log.warning("--tables does nothing with --method %s (it plans one uniform format, without loss tables)",
                    args.method)
    return recipe


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
    print(_eval_summary(metrics, args.json))
    return 0


def _eval_summary(m: dict, json_path: str | None) -> str:
    """A few lines for the terminal: per output its agreement with the reference (all metrics: --json)."""
    def num(x, fmt=".4g"):
        return "n/a" if x is None else format(x, fmt)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [f"{m['quant_model']} vs {m['ref_model']}: {m['n_samples']} samples "
             f"(onnxruntime {m['quant_seconds']:.2f} s vs {m['ref_seconds']:.2f} s)"]
    for name, o in m["outputs"].items():
        if "cosine" in o:
            parts = [f"cosine {num(o['cosine'], '.4f')} (min {num(o['cosine_min'], '.4f')})"]
        else:
            parts = [f"exact match {pct(o['exact_match'])}"]
        parts.append(f"max abs error {num(o['max_abs_error'])} (reference max abs {num(o['ref_max_abs'])})")
        if o.get("logits"):
            parts.append(f"top-1 agreement {pct(o['top1_agreement'])}, KL {num(o['kl'])} nats")
            if "accuracy_ref" in o:
                parts.append(f"accuracy {pct(o['accuracy_ref'])} -> {pct(o['accuracy_quant'])} "
                             f"({o['n_labelled']} labelled)")
        if o["nonfinite_ref"] or o["nonfinite_quant"]:
            parts.append(f"non-finite values {o['nonfinite_ref']} -> {o['nonfinite_quant']}")
        lines.append(f"  {name}: " + "; ".join(parts))
    if json_path:
        lines.append(f"all metrics in {json_path}")
    return "\n".join(lines)


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
    if args.baseline not in METHODS or args.baseline == "bayesq":
        raise BayesQError(f"--baseline must be a uniform method, one of "
                          f"{sorted(m for m in METHODS if m != 'bayesq')}; got {args.baseline!r}")
    run_demo(bits=args.bits, baseline=args.baseline, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
