"""Command line: the only place that parses arguments or sets up logging."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import DEVICES, METHODS, SAMPLING_MODES, SPARSE_PATTERNS, TABLE_SOURCES, TARGETS
from .errors import BayesQError, first_line

log = logging.getLogger("bayesq_onnx.cli")
EXIT_BAD_INPUT = 2
PROG = "bayesq-onnx"
COMMANDS = ("export", "calib", "compress", "eval", "crosscheck", "predict", "report", "inspect", "tune", "curvature",
            "demo")

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

    x = sub.add_parser("export", help="a PyTorch module or a transformers model directory to ONNX (needs torch)",
                       allow_abbrev=False)
    x.add_argument("source", help="FILE.py:FACTORY (FACTORY() returns a torch.nn.Module; give --input) or a "
                                  "transformers model directory (config.json and weights, loaded offline; "
                                  "inputs input_ids and attention_mask, output logits)")
    x.add_argument("-o", "--output", required=req,
                   help="the .onnx to write; the parameter->initializer map goes beside it as NAME.params.json")
    x.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                   help="an example input of the module, in forward's order, e.g. x:1x64 or ids:2x16:int64 "
                        "(dtype float32, float16, int64, int32 or bool; default float32; floats are random "
                        "normal, integers 0); axis 0 is exported as a dynamic batch axis")
    x.add_argument("--output-names", metavar="A,B", help="names of the module's outputs (default: output, or "
                                                         "output_0, output_1, ...; transformers: logits)")
    x.add_argument("--seq-len", type=int, default=16,
                   help="transformers: length of the example sequence (the axis stays dynamic; default 16)")
    x.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "torchscript"),
                   help="torch's exporter: auto (default) tries dynamo (needs the onnxscript package) and "
                        "falls back to TorchScript where it fails")
    x.add_argument("--opset", type=int, help="ONNX opset to export to (default: 17 with TorchScript, 18 with "
                                               "dynamo, the lowest it implements)")
    x.add_argument("--compress-bits", type=float, metavar="BITS",
                   help="then compress the exported model at this budget (as compress --bits) to "
                        "NAME.bq.onnx, its report to NAME.bq.json")
    x.add_argument("--calib", help="with --compress-bits: the calibration .npz (default: synthetic data, "
                                   "with a warning)")
    x.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    k = sub.add_parser("calib", help="build a calibration .npz for a model: from text, images or at random",
                       allow_abbrev=False)
    k.add_argument("model", help="the .onnx model the data is for (its input names, dtypes and shapes are checked)")
    k.add_argument("-o", "--output", required=req, help="the .npz to write")
    src = k.add_mutually_exclusive_group(required=req)
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file, one sample per non-empty line "
                                                    "(needs --tokenizer)")
    src.add_argument("--images", metavar="DIR", help="a folder of images (png, jpg, ...; the first --samples "
                                                     "by file name) for a model with one (N, C, H, W) float input")
    src.add_argument("--random", action="store_true",
                     help="random but valid data from the graph (what compress uses without --calib)")
    k.add_argument("--tokenizer", metavar="tokenizer.json", help="--text: the tokenizer (tokenizers package)")
    k.add_argument("--seq-len", type=int, help=f"--text: tokens per sample when the model's sequence axis is "
                                               f"dynamic (default 64); longer lines are cut, shorter padded")
    k.add_argument("--samples", type=int, default=64, help="how many samples at most (default 64)")
    k.add_argument("--size", metavar="HxW", help="--images: size when the model's height/width are dynamic")
    k.add_argument("--crop", action="store_true", help="--images: scale the shorter side to the size and crop "
                                                       "the centre (default: stretch to the size)")
    k.add_argument("--mean", metavar="M[,M,M]", default="0",
                   help="--images: subtracted per channel after scaling to [0, 1] (default 0; e.g. "
                        "0.485,0.456,0.406)")
    k.add_argument("--std", metavar="S[,S,S]", default="1",
                   help="--images: then divided by, per channel (default 1; e.g. 0.229,0.224,0.225)")
    k.add_argument("--seed", type=int, default=0, help="--random: the seed (default 0)")
    k.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    c = sub.add_parser("compress", help="quantize a model's weights to a bit budget", allow_abbrev=False)
    c.add_argument("model", help="input .onnx model (never modified)")
    # recipe options default to None: given ones override --recipe's values, the others keep them
    c.add_argument("--bits", type=float,
                   help="budget: stored bits per quantized weight, all included (required unless --recipe)")
    c.add_argument("--calib", help=".npz (keys = input names, axis 0 = samples) or a directory of them; "
                                   "without it, synthetic data is used (with a warning)")
    c.add_argument("-o", "--output", help="output model (default: MODEL.bq.onnx)")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--html", metavar="REPORT.html", help="write the report as a self-contained HTML page here "
                   "(bits per layer against sensitivity, budget curve, size breakdown, skipped weights, recipe)")
    c.add_argument("--recipe", metavar="FILE", help="start from a saved recipe: a JSON recipe or a report "
                   "(which holds the one it used); options given here override its values")
    c.add_argument("--method", help=f"one of {', '.join(sorted(METHODS))} (default: bayesq)")
    c.add_argument("--curvature", help="CURV.npz: diagonal curvature per initializer and sample (bayesq-onnx curvature)")
    c.add_argument("--tables", choices=TABLE_SOURCES, help=_tables_help())
    c.add_argument("--target", help=f"one of {', '.join(TARGETS)}: ort-cpu runs formats beyond "
                   "onnxruntime's with the bayesq custom-op library; portable rebuilds them with standard ops "
                   "(default: ort-cpu)")
    c.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="keep the weights whose initializer or consumer node name matches PATTERN (fnmatch: "
                        "*, ?, [..]) as they are; reported as skipped (repeatable)")
    c.add_argument("--include", action="append", metavar="PATTERN",
                   help="quantize only weights whose initializer or consumer node name matches (repeatable; "
                        "--exclude wins)")
    c.add_argument("--pin", action="append", metavar="PATTERN=BITS",
                   help="weights matching PATTERN may only take formats with BITS code bits (32: fp32, 16: a float16 or "
                        "bfloat16 weight kept, within the budget); the first matching pin applies (repeatable)")
    c.add_argument("--sparse", nargs="?", const=",".join(f"{k}:{m}" for k, m in SPARSE_PATTERNS), metavar="PATTERNS",
                   help="offer the knapsack N:M sparse formats too (KEEP:OF, comma-separated; default "
                        f"{','.join(f'{k}:{m}' for k, m in SPARSE_PATTERNS)}): in each run of OF weights along the "
                        "reduction axis the posterior keeps KEEP, the rest are pruned (MatMul and Conv weights)")
    c.add_argument("--scaled-codebooks", metavar="BITS",
                   help="the code widths (comma-separated) at which the knapsack is offered one Lloyd-Max codebook "
                        "per weight scaled per row (fp16 levels once and an fp16 scale per row, instead of each "
                        "row's own levels: 0.3 fewer bits per weight at 3 bits on a 384-wide row); 'none': not "
                        "offered (default: 2,3,4)")
    c.add_argument("--distill", type=int, metavar="STEPS",
                   help="tune the chosen plan's scales and codebook levels toward the fp32 outputs for STEPS Adam "
                        "steps on the calibration data (needs torch); held-back data decides whether the tuned "
                        "model ships (default: off)")
    c.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="round the blocks in graph order, each calibrated on the outputs of the blocks already "
                        "quantized, as the reference GPTQ pipeline does; --no-sequential: every block calibrated "
                        "on the fp32 model (default: on for gptq, off for the others)")
    c.add_argument("--threads", type=int, help="sites analysed in parallel (as BAYESQ_WORKERS; default: the "
                                               "cores, at most 4; the output does not depend on it)")
    c.add_argument("--device", choices=DEVICES, help="where GPTQ's rounding runs: cpu (default), cuda (torch on "
                   "the GPU; the output bytes can differ from cpu's) or auto (cuda when torch sees a GPU)")
    c.add_argument("--ray", metavar="ADDRESS", help="run the per-site work as tasks on a Ray cluster: auto "
                   "(RAY_ADDRESS, or the cluster `ray start` runs here), local (start one on this machine for this "
                   "run), or HOST:PORT / ray://HOST:PORT; needs the ray extra; the output does not depend on it")
    c.add_argument("--seed", type=int,
                   help="seed of the synthetic calibration data (default 0; everything else is deterministic)")
    c.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")
    c.add_argument("--keep-posterior", action="store_true",
                   help="keep the Laplace posterior of every MatMul and Conv weight: means in the allocated formats, "
                        "standard deviations log-quantized alike, weights drawn in the graph; --bits then budgets "
                        "both together (docs/design.md, 'Keeping the posterior')")
    c.add_argument("--labels", help="--keep-posterior: .npy of one integer class per calibration sample; the prior "
                                    "precision is tuned on the held-back ones (lowest NLL)")
    c.add_argument("--prior-precision", type=float, help="--keep-posterior: this prior precision instead of tuning it")
    c.add_argument("--sampling", choices=SAMPLING_MODES,
                   help="--keep-posterior: vpq draws weights from the stored means and standard deviations at "
                        "each run; jq also rounds each draw to its weight's bits; spq stores --sets fixed "
                        "quantized weight sets, picked by the input bq_sample (default vpq)")
    c.add_argument("--sets", type=int, help="--sampling spq: weight sets stored (default 8)")
    c.add_argument("--evidence", type=float, help="training samples the weights were fitted on: scales the "
                                                  "curvature into the posterior's precision (default 1e6)")
    c.add_argument("--gptq-damp", type=float, metavar="D",
                   help="GPTQ's dampening: D times the mean diagonal of X^T X added to it (the reference's "
                        "percdamp; default 0.01)")

    e = sub.add_parser("eval", help="compare a quantized model with its reference in onnxruntime",
                       allow_abbrev=False)
    e.add_argument("ref", help="reference .onnx model (e.g. the fp32 original)")
    e.add_argument("quant", help="the .onnx model to compare with it (e.g. written by compress)")
    e.add_argument("--data", required=req, help=".npz of inputs (keys = input names, axis 0 = samples)")
    e.add_argument("--labels", help=".npy of integer labels, one per sample (or per position: the logits' "
                                    "shape without its last axis); accuracy of both models on logits outputs")
    e.add_argument("--json", help="write all the metrics here as JSON (the terminal gets a summary)")
    e.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    x = sub.add_parser("crosscheck", help="run one model on several runtimes (onnxruntime CPU packed / unpacked, "
                                          "CUDA, TensorRT) through polygraphy and compare their outputs",
                       allow_abbrev=False)
    x.add_argument("model", help=".onnx model (e.g. written by compress)")
    x.add_argument("--data", required=req, help=".npz of inputs (keys = input names, axis 0 = samples)")
    x.add_argument("--runtimes", help="comma-separated, the first the reference: cpu-packed, cpu-unpacked, cuda, "
                                      "tensorrt (default: every one this onnxruntime offers)")
    x.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance per element (default 1e-3)")
    x.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance per element (default 1e-3)")
    x.add_argument("--json", help="write the comparison here as JSON")
    x.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    pr = sub.add_parser("predict", help="S forward samples of a --keep-posterior model per input: predictive "
                                        "mean and its uncertainty (total, aleatoric, epistemic)", allow_abbrev=False)
    pr.add_argument("model", help=".onnx model (one that samples its weights, or any classifier)")
    pr.add_argument("--data", required=req, help=".npz of inputs (keys = input names, axis 0 = samples)")
    pr.add_argument("--samples", type=int, help="forward samples per input (default 16; an spq model: its sets)")
    pr.add_argument("--seed", type=int, help="seed of the weight draws (default: the one compress stored)")
    pr.add_argument("--batch-size", type=int, default=64, help="inputs per run (default 64; the draws depend on it)")
    pr.add_argument("--labels", help=".npy of integer classes: accuracy, NLL and ECE of the predictive mean")
    pr.add_argument("-o", "--output", help="write per input: mean (N, C), total, aleatoric, epistemic (.npz)")
    pr.add_argument("--json", help="write the summary here as JSON")
    pr.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    r = sub.add_parser("report", help="a compress report (JSON) as a self-contained HTML page", allow_abbrev=False)
    r.add_argument("report", metavar="REPORT.json", help="the report compress --report wrote")
    r.add_argument("-o", "--output", metavar="REPORT.html",
                   help="the HTML page to write (default: REPORT.json with the suffix .html)")
    r.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    i = sub.add_parser("inspect", help="list what a model file stores: quantized weights, formats, bits, sizes "
                       "(read from the graph, nothing is run)", allow_abbrev=False)
    i.add_argument("model", help="the .onnx model, compressed or not")
    i.add_argument("--json", action="store_true", help="print the listing as JSON on stdout (for scripts)")
    i.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

    t = sub.add_parser("tune", help="measure on this machine the rows per call from which a compressed model's "
                       "MatMuls run faster unpacked; make_session(unpack='auto') then uses it", allow_abbrev=False)
    t.add_argument("model", help="the compressed .onnx model (read only)")
    t.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads, as the sessions that will use it run (default 0: its default)")
    t.add_argument("--rows", help="rows per call to time, separated by commas (default 1,2,4,...,256)")
    t.add_argument("--reps", type=int, default=5, help="alternating timing rounds per row count (default 5)")
    t.add_argument("-o", "--output", help="where to write it (default: beside the model, where make_session looks)")
    t.add_argument("--quiet", action="store_true", help="no progress output (warnings still print)")

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
    d.add_argument("--baseline", default="gptq", help="the method bayesq is compared with at the same "
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
    if args.command == "compress" and args.bits is None and args.recipe is None:
        raise _UsageError("compress: the following arguments are required: --bits (or --recipe)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bayesq_onnx").propagate = False
    try:
        args = _parse(argv)
        _setup_logging(args.quiet)
        return {"export": _export, "calib": _calib, "compress": _compress, "eval": _eval,
                "crosscheck": _crosscheck, "predict": _predict, "report": _report,
                "inspect": _inspect, "tune": _tune, "curvature": _curvature, "demo": _demo}[args.command](args)
    except _Exit as e:
        return e.status
    except BayesQError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line unless asked for the traceback
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            print(f"{PROG}: error: onnxruntime is not installed: install bayesq-onnx with the `cpu` extra "
                  "(onnxruntime) or the `gpu` extra (onnxruntime-gpu)", file=sys.stderr)
            return EXIT_BAD_INPUT
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
    """The recipe: --recipe's (if given) with every option given on the command line put over it."""
    from dataclasses import replace

    from .config import Recipe
    given = {"bits": args.bits, "method": args.method, "seed": args.seed, "curvature": args.curvature,
             "tables": args.tables, "target": args.target, "evidence": args.evidence, "device": args.device,
             "gptq_damp": args.gptq_damp,
             "exclude": tuple(args.exclude) if args.exclude else None,
             "include": tuple(args.include) if args.include else None,
             "pins": tuple(_pin(p) for p in args.pin) if args.pin else None, "distill": args.distill,
             "sequential": args.sequential,
             "sparse": _sparse(args.sparse) if args.sparse is not None else None,
             "scaled_lut_bits": _widths(args.scaled_codebooks) if args.scaled_codebooks is not None else None}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        recipe = replace(Recipe.load(args.recipe), **given) if args.recipe else Recipe(**given)
    except ValueError as e:
        raise BayesQError(str(e)) from None
    if args.tables is not None and args.tables != "auto" and not recipe.method_spec.allocates:
        log.warning("--tables does nothing with --method %s (it plans one uniform format, without loss tables)",
                    recipe.method)
    elif args.tables is not None and args.tables != "auto" and recipe.method_spec.tables is not None:
        log.warning("--tables does nothing with --method %s (its loss tables are always %s)",
                    recipe.method, recipe.method_spec.tables)
    if args.sequential and not recipe.method_spec.gptq:
        log.warning("--sequential does nothing with --method %s (its codes are rounded to nearest, without the "
                    "calibration statistics)", recipe.method)
    return recipe


def _sparse(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        keep, sep, of = part.strip().partition(":")
        if not sep or not keep.isdigit() or not of.isdigit():
            raise BayesQError(f"--sparse expects KEEP:OF patterns, comma-separated (e.g. '2:4,6:8'), got {text!r}")
        out.append((int(keep), int(of)))
    return tuple(out)


def _widths(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise BayesQError(f"--scaled-codebooks expects code widths, comma-separated (e.g. '3,4'), or 'none', got {text!r}")
    return tuple(int(p) for p in parts)


def _pin(text: str) -> tuple[str, int]:
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern or not bits.strip().isdigit() or int(bits) < 1:
        raise BayesQError(f"--pin expects NAME_PATTERN=BITS (e.g. 'lm_head*=8'), got {text!r}")
    return pattern, int(bits)


def _compress(args) -> int:
    from .api import compress
    from .parallel import use_ray, use_workers
    recipe = _recipe(args)
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".bq.onnx")
    if out.resolve() == Path(args.model).resolve():
        raise BayesQError("the output path is the input model: choose another -o")
    if args.html:
        from .graph.model_io import check_writable
        if Path(args.html).resolve() in (out.resolve(), Path(args.model).resolve()):
            raise BayesQError("--html would overwrite the model: choose another path")
        check_writable(args.html)
    if args.ray is not None and args.threads is not None:
        log.warning("--threads does nothing with --ray (the cluster's CPUs decide)")
    keep = _keep_posterior(args)
    with use_workers(args.threads), use_ray(args.ray):
        if keep is None:
            res = compress(args.model, recipe, calib=args.calib, output=out, report=args.report)
        else:
            from .bayesian import compress_bayesian
            res = compress_bayesian(args.model, recipe, keep, calib=args.calib, labels=args.labels, output=out,
                                    report=args.report)
    try:
        if args.html:
            _write_html(res.report, args.html)
    except BaseException:
        # all or nothing: a model without the report asked for (Ctrl-C, a full disk) is removed too
        for p in (out, out.with_name(out.name + ".data"), args.report):
            if p is not None:
                Path(p).unlink(missing_ok=True)
        raise
    print(_compress_summary(out, res.report))
    return 0


def _keep_posterior(args):
    """The --keep-posterior settings, or None; its options without it are an error."""
    from .config import KeepPosterior
    given = {"mode": args.sampling, "sets": args.sets, "prior": args.prior_precision}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.keep_posterior:
        if given or args.labels:
            raise BayesQError("--labels, --prior-precision, --sampling and --sets need --keep-posterior")
        return None
    try:
        return KeepPosterior(seed=args.seed or 0, **given)
    except ValueError as e:
        raise BayesQError(str(e)) from None


def _predict(args) -> int:
    from .validate.uncertainty import predict_file
    summary = predict_file(args.model, args.data, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                           labels=args.labels, output=args.output)
    if args.json:
        from .graph.model_io import save_json_atomic
        save_json_atomic(summary, args.json)
    parts = [f"{summary['n_inputs']} inputs x {summary['samples']} samples ({summary['kind']})",
             f"mean entropy {summary['total']:.4f} = aleatoric {summary['aleatoric']:.4f} + "
             f"epistemic {summary['epistemic']:.4f} nats"]
    if "accuracy" in summary:
        parts.append(f"accuracy {100 * summary['accuracy']:.2f}%, NLL {summary['nll']:.4f}, ECE {summary['ece']:.4f}")
    print(f"{args.model}: " + "; ".join(parts))
    return 0


def _write_html(report: dict, path) -> None:
    from .graph.model_io import save_text_atomic
    from .report_html import render_html
    text = render_html(report)
    try:
        save_text_atomic(text, path)
    except OSError as e:
        raise BayesQError(f"cannot write {path}: {e.strerror or first_line(e)}") from None


def _report(args) -> int:
    import json
    src = Path(args.report)
    out = Path(args.output) if args.output else src.with_suffix(".html")
    if out.resolve() == src.resolve():
        raise BayesQError("the output path is the report itself: choose another -o")
    if not src.is_file():
        raise BayesQError(f"report not found: {src}")
    try:
        report = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BayesQError(f"cannot read {src} as JSON: {first_line(e)}") from None
    from .graph.model_io import check_writable
    check_writable(out)
    _write_html(report, out)
    print(f"{out}: {len(report['layers'])} layers, {len(report.get('skipped') or [])} skipped")
    return 0


def _inspect(args) -> int:
    import json

    from .graph.inspect import inspect_model, summary_lines
    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else "\n".join(summary_lines(info)))
    return 0


def _tune(args) -> int:
    from .graph.model_io import read_model
    from .runtime import tune
    try:
        rows = tuple(sorted({int(r) for r in args.rows.split(",")})) if args.rows else tune.ROWS
    except ValueError:
        raise BayesQError(f"--rows {args.rows!r}: expected row counts separated by commas") from None
    if not rows or rows[0] < 1 or args.reps < 1 or args.threads < 0:
        raise BayesQError("--rows must be positive, --reps at least 1 and --threads at least 0")
    model = read_model(args.model)
    t = tune.measure(model, args.threads, rows, args.reps, log.info)
    out = Path(args.output) if args.output else tune.sidecar(args.model)
    tune.save(t, out, args.model)
    where = (f"packed at every row count measured (up to {rows[-1]})" if t.packed_below is None else
             "fp32 at every row count measured" if t.packed_below == 1 else
             f"packed below {t.packed_below} rows, fp32 from there")
    print(f"{out}: {where} on this machine ({t.machine['isa']}, {t.machine['threads'] or 'default'} threads)")
    return 0


def _compress_summary(out: Path, r: dict) -> str:
    return (f"{out}: {r['bits_per_weight']:.3f} bits/weight stored ({r['code_bits_per_weight']:.3f} in codes; "
            f"{r['bits_per_weight_all']:.3f} over all float weights), "
            f"{len(r['layers'])} weights quantized, {len(r['skipped'])} skipped, plan: {r['plan']}, "
            f"{r['output_bytes'] / 1e6:.2f} MB")


def _export(args) -> int:
    from .graph.model_io import check_writable, save_json_atomic
    from .torch_export import ExampleInput, export_source, parameter_map_json

    out = Path(args.output)
    params_json = out.with_suffix(".params.json")
    bq_out, bq_report = out.with_suffix(".bq.onnx"), out.with_suffix(".bq.json")
    inputs = tuple(_example_input(t, ExampleInput) for t in args.input)
    if Path(args.source).is_dir() and inputs:
        raise BayesQError("--input is for module sources: a transformers model takes input_ids and attention_mask")
    if args.calib and args.compress_bits is None:
        raise BayesQError("--calib does nothing without --compress-bits")
    if args.compress_bits is not None:
        from .config import Recipe
        try:
            recipe = Recipe(bits=args.compress_bits)
        except ValueError as e:
            raise BayesQError(str(e).replace("--bits", "--compress-bits")) from None
    for p in (out, params_json) + ((bq_out, bq_report) if args.compress_bits is not None else ()):
        check_writable(p)
    names = tuple(n.strip() for n in args.output_names.split(",")) if args.output_names else ()
    res = export_source(args.source, out, inputs=inputs, output_names=names, seq_len=args.seq_len,
                        exporter=args.exporter, opset=args.opset)
    save_json_atomic(parameter_map_json(res.pmap), params_json)
    mapped = sum(1 for loc in res.pmap.values() if loc.uses)
    print(f"{out}: {res.source} exported, inputs {', '.join(res.input_names)}, outputs "
          f"{', '.join(res.output_names)}; {mapped} of {len(res.pmap)} parameters mapped ({params_json}); "
          f"onnxruntime vs torch max abs difference {res.max_abs_error:.2g}")
    if args.compress_bits is not None:
        from .api import compress
        rep = compress(out, recipe, calib=args.calib, output=bq_out, report=bq_report).report
        print(_compress_summary(bq_out, rep))
    return 0


def _example_input(text: str, cls):
    name, _, rest = text.partition(":")
    shape_text, _, dtype = rest.partition(":")
    dims = shape_text.lower().split("x")
    if not name or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise BayesQError(f"--input expects NAME:SHAPE[:DTYPE] with SHAPE like 2x16, got {text!r}")
    return cls(name, tuple(int(d) for d in dims), dtype or "float32")


def _calib(args) -> int:
    from .calib import build
    from .graph.model_io import check_writable, load_model, save_npz_atomic

    out = Path(args.output)
    if out.resolve() == Path(args.model).resolve():
        raise BayesQError("the output path is the input model: choose another -o")
    if args.samples < 1:
        raise BayesQError(f"--samples must be >= 1, got {args.samples}")
    if args.text and not args.tokenizer:
        raise BayesQError("--text needs --tokenizer tokenizer.json")
    unused = [f for f, v, use in (("--tokenizer", args.tokenizer, args.text), ("--seq-len", args.seq_len, args.text),
                                   ("--size", args.size, args.images), ("--crop", args.crop, args.images),
                                   ("--mean", args.mean != "0", args.images), ("--std", args.std != "1", args.images))
              if v and not use]
    if unused:
        raise BayesQError(f"{', '.join(unused)} only applies to "
                          + ("--text" if unused[0] in ("--tokenizer", "--seq-len") else "--images"))
    check_writable(out)
    model = load_model(args.model)
    if args.random:
        data = build.random_calibration(model, args.samples, args.seed)
    elif args.text:
        data = build.text_calibration(model, args.text, args.tokenizer, args.samples, args.seq_len)
    else:
        opts = build.ImageOptions(size=_size(args.size) if args.size else None, crop=args.crop,
                                  mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"))
        data = build.image_calibration(model, args.images, args.samples, opts)
    save_npz_atomic(data, out)
    print(f"{out}: " + ", ".join(f"{k} {v.dtype} {'x'.join(map(str, v.shape))}" for k, v in data.items()))
    return 0


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise BayesQError(f"--size expects HxW, e.g. 224x224, got {text!r}")
    return int(h), int(w)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BayesQError(f"{flag} expects numbers separated by commas, got {text!r}") from None


def _eval(args) -> int:
    from .validate.compare import evaluate_files
    metrics = evaluate_files(args.ref, args.quant, args.data, args.labels)
    if args.json:
        from .graph.model_io import save_json_atomic
        save_json_atomic(metrics, args.json)
    print(_eval_summary(metrics, args.json))
    return 0


def _crosscheck(args) -> int:
    """Exit 0 when every runtime matched the first within the tolerances, 1 when one did not."""
    from .validate.crosscheck import crosscheck_files
    runtimes = args.runtimes.split(",") if args.runtimes else None
    res = crosscheck_files(args.model, args.data, runtimes, rtol=args.rtol, atol=args.atol)
    if args.json:
        from .graph.model_io import save_json_atomic
        save_json_atomic(res, args.json)
    print(f"{res['model']}: {res['n_samples']} samples on {', '.join(res['runtimes'])} "
          f"(tolerance: abs {res['atol']:g} or rel {res['rtol']:g} per element)")
    for p in res["pairs"]:
        print(f"  {p['runtimes'][1]} vs {p['runtimes'][0]}: {'matched' if p['passed'] else 'MISMATCH'}")
        for name, o in p["outputs"].items():
            print(f"    {name}: max abs diff {o['max_abs_diff']:.3g}, max rel diff {o['max_rel_diff']:.3g}"
                  f"{'' if o['passed'] else ' (outside the tolerance)'}")
    return 0 if res["passed"] else 1


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
        raise BayesQError(f"--baseline must be a baseline method, one of "
                          f"{sorted(m for m in METHODS if m != 'bayesq')}; got {args.baseline!r}")
    run_demo(bits=args.bits, baseline=args.baseline, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
