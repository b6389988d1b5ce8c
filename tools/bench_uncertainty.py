"""Uncertainty kept through compression: the Fashion-MNIST CNN (the asset) as a Bayesian model, fp32
and compressed with ``--keep-posterior``, scored in and out of distribution.

    python tools/bench_uncertainty.py [--bits 4,3] [--samples 16] [--sets 8] [--n-id 1000] [--json out.json]

Data (nothing downloaded): the prior precision is tuned on test images 5000..5511 (labelled, never
scored; the last quarter held back for it), in-distribution scores come from test images
0..n_id-1, out-of-distribution inputs are scikit-learn's 8x8 digits resized to 28x28 (bilinear),
uniform noise images, and test images turned upside down (horizontal flips were training
augmentation, vertical ones not).  Rows:

- ``fp32``: the trained network; ``fp32 Laplace``: its posterior (fp32 means and standard
  deviations), weights drawn in the graph;
- ``bayesq B``: the deterministic compressed model at B bits/weight;
- ``vpq B`` / ``jq B``: means and standard deviations within B bits per stored value
  (``--keep-posterior --bits`` B times the values stored per weight: 1 + standard deviations per
  weight), drawn at run time (jq: each draw rounded to its weight's bits);
- ``spq B``: ``--sets`` stored weight sets of about B bits each (budget sets x B).

Columns: accuracy, NLL and ECE of the predictive mean in distribution; OOD AUROC of the mutual
information (epistemic) and of the total entropy, over all OOD inputs pooled, and per OOD set by
mutual information; ``MB``: the bytes of every initializer the model stores (everything counted),
and the ratio to the fp32 Laplace model's.  The draws depend only on the seeds and the batch size.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx.assets import default_cache, prepare_fashion_mnist  # noqa: E402
from bayesq_onnx.assets.fashion_mnist import load_fashion_mnist, normalize, MEAN, STD  # noqa: E402
from bayesq_onnx.bayesian import BayesianAnalysis  # noqa: E402
from bayesq_onnx.config import KeepPosterior, Recipe  # noqa: E402
from bayesq_onnx.lower.sampling import SAMPLE_INPUT  # noqa: E402
from bayesq_onnx.runtime.session import make_session  # noqa: E402
from bayesq_onnx.validate.uncertainty import accuracy, auroc, decompose, ece, model_kind, nll, sample_probs  # noqa: E402

TUNE = slice(5000, 5512)
BATCH = 250
TRAINING_IMAGES = 60000.0    # the evidence: samples the CNN was trained on


def ood_sets(d: dict, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits
    digits = load_digits().images[:n] / 16.0
    digits = np.stack([zoom(im, 28 / 8, order=1) for im in digits]).clip(0, 1)
    noise = rng.uniform(0, 1, (n // 2, 28, 28))
    flipped = d["test_images"][2000:2000 + n // 2, ::-1, :].astype(np.float64) / 255.0
    norm = lambda x: ((x.astype(np.float32) - np.float32(MEAN)) / np.float32(STD))[:, None]   # noqa: E731
    return {"digits": norm(digits), "noise": norm(noise), "upside-down": norm(flipped)}


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every stored tensor (packed sub-byte tensors at their packed size)."""
    from onnx import numpy_helper
    return sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def score(model: onnx.ModelProto, x_id, y_id, oods: dict, samples: int) -> dict:
    kind, n_sets = model_kind(model)
    sets = kind == "sets"
    S = n_sets if sets else samples if kind == "draws" else 1
    sess = make_session(model)
    run = lambda x: decompose(sample_probs(sess, {"image": x}, S, BATCH, sample_input=SAMPLE_INPUT if sets else None))  # noqa: E731
    d_in = run(x_id)
    d_out = {k: run(v) for k, v in oods.items()}
    mi_out = np.concatenate([d.epistemic for d in d_out.values()])
    h_out = np.concatenate([d.total for d in d_out.values()])
    return {"samples": S, "accuracy": accuracy(d_in.mean, y_id), "nll": nll(d_in.mean, y_id), "ece": ece(d_in.mean, y_id),
            "auroc_mi": auroc(d_in.epistemic, mi_out) if S > 1 else 0.5, "auroc_entropy": auroc(d_in.total, h_out),
            **{f"auroc_mi_{k}": (auroc(d_in.epistemic, v.epistemic) if S > 1 else 0.5) for k, v in d_out.items()},
            "epistemic_id": float(d_in.epistemic.mean()), "epistemic_ood": float(mi_out.mean()),
            "bytes": initializer_bytes(model)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--bits", default="4,3", help="budgets, bits/weight, comma-separated (default 4,3)")
    ap.add_argument("--samples", type=int, default=16, help="forward samples per input (default 16)")
    ap.add_argument("--sets", type=int, default=8, help="spq: weight sets stored (default 8)")
    ap.add_argument("--n-id", type=int, default=1000, help="in-distribution test images (default 1000)")
    ap.add_argument("--n-ood", type=int, default=500, help="digits; noise and upside-down get half each (default 500)")
    ap.add_argument("--curvature", help="a CURV.npz for the posterior (default: activation curvature)")
    ap.add_argument("--evidence", type=float, default=TRAINING_IMAGES,
                    help="samples the curvature is multiplied by (default 60000: the training images)")
    ap.add_argument("--cache", type=Path, default=None, help="asset cache (default $BAYESQ_CACHE or ~/.cache/bayesq-onnx)")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    budgets = [float(b) for b in args.bits.split(",")]
    t0 = time.perf_counter()
    asset = prepare_fashion_mnist(args.cache or default_cache(), progress=say)
    d = load_fashion_mnist()
    calib = {"image": normalize(d["test_images"][TUNE])}
    labels = d["test_labels"][TUNE]
    x_id, y_id = normalize(d["test_images"][:args.n_id]), d["test_labels"][:args.n_id]
    oods = ood_sets(d, args.n_ood, np.random.default_rng(0))
    recipe = Recipe(bits=budgets[0], evidence=args.evidence, curvature=args.curvature)
    ba = BayesianAnalysis(asset.model, recipe, KeepPosterior(sets=args.sets), calib=calib, labels=labels)
    say(f"prior precision {ba.prior:.4g} (held-back NLL per candidate: "
        + ", ".join(f"{p:.3g}: {v:.4f}" for p, v in ba.prior_table) + ")")
    # "B bits" means B bits per stored value, means and standard deviations alike: the budget per weight
    # grows by the standard deviations stored per weight (one per input index: ~0; one per weight: 2x)
    per_value = 1 + sum(ba.h[s.name].shape[0] * s.L for s in ba.sites) / ba.an.n_weights
    rows = {}

    def add(name, model, extra=None):
        t = time.perf_counter()
        rows[name] = {**score(model, x_id, y_id, oods, args.samples), **(extra or {})}
        say(f"{name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items()})} "
            f"({time.perf_counter() - t:.0f} s)")

    add("fp32", onnx.load(str(asset.model)))   # the file: the analysis keeps its copy's weights on disk
    add("fp32 Laplace", ba.fp32_model())
    for b in budgets:
        det = ba.an.compress(b)
        add(f"bayesq {b:g}", det.model, {"bits_per_weight": det.report["bits_per_weight"]})
        for mode in ("vpq", "jq", "spq"):
            ba.keep = KeepPosterior(mode=mode, sets=args.sets)
            res = ba.compress(b * (args.sets if mode == "spq" else per_value))
            p = res.report["posterior"]
            add(f"{mode} {b:g}", res.model, {"bits_per_weight": res.report["bits_per_weight"],
                                             "mean_bits": p["mean_bits_per_weight"], "posterior_bits": p["posterior_bits_per_weight"]})
    ref = rows["fp32 Laplace"]["bytes"]
    ood_names = list(oods)
    print(f"Fashion-MNIST CNN, {args.n_id} test images in distribution; OOD: {args.n_ood} digits, "
          f"{args.n_ood // 2} noise, {args.n_ood // 2} upside-down; {args.samples} samples ({args.sets} sets for spq); "
          f"prior precision {ba.prior:.4g}; {time.perf_counter() - t0:.0f} s\n")
    print("| model | bits/weight (means + posterior) | accuracy | NLL | ECE | AUROC MI | AUROC entropy | "
          + " | ".join(f"AUROC MI {k}" for k in ood_names) + " | MB | fp32 Laplace / this |")
    print("|" + "---|" * (9 + len(ood_names)))
    for name, r in rows.items():
        bits = "-" if "bits_per_weight" not in r else (
            f"{r['bits_per_weight']:.3f}" + (f" ({r['mean_bits']:.3f} + {r['posterior_bits']:.3f})" if "mean_bits" in r else ""))
        print(f"| {name} | {bits} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['auroc_mi']:.4f} | "
              f"{r['auroc_entropy']:.4f} | " + " | ".join(f"{r[f'auroc_mi_{k}']:.4f}" for k in ood_names)
              + f" | {r['bytes'] / 1e6:.4f} | {ref / r['bytes']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
