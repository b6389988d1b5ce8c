"""Accuracy scoreboard: fp32, rtn, gptq, hqq-int, hawq and bayesq at matched stored-bit budgets on real models.

    python tools/bench_accuracy.py [--quick] [--models minilm,fashion_mnist,...] [--budgets 2.5,3.0,3.5,4.0]
                                   [--methods rtn,gptq,gptq-noseq,hqq-int,hawq,bayesq,bayesq-seq] [--distill STEPS]
                                   [--cache DIR] [--out DIR]

Models and data are built from packages into the asset cache (``bayesq_onnx.assets``; see docs/design.md,
"Real models and data").  Each method analyses a model once (statistics, grids, codes, loss tables) and then compresses
it at every budget; a baseline takes the uniform format with the most stored bits within the
budget, so its achieved bits can fall short of the budget: ``bayesq@gptq`` (and ``hawq@gptq``, for
every knapsack method) is that method run at exactly the bits gptq achieved, the strictly matched
comparison.  Every row carries its achieved ``bits_per_weight`` (all stored bits of the quantized
weights: codes, scales, zero points), ``bits_all`` (the same over every float initializer, the
ones left in float included) and its wall time (analysis plus that budget's planning, packing and
writing; not the evaluation).  A method named with ``-seq`` (``bayesq-seq``) or ``-noseq``
(``gptq-noseq``) is that method with sequential mode (``--sequential``) on or off, whatever its
default; one named with ``+nonf`` (``bayesq+nonf``) is not offered the scaled codebooks (one
Lloyd-Max codebook per weight scaled per row, ``--scaled-codebooks none``), one with ``+sparse`` is
offered the N:M sparse formats (``--sparse``);
one named with ``+distill`` (``bayesq+distill``,
``bayesq-seq+distill``) is that method with calibration-only distillation (``--distill STEPS``,
default 100 steps).  The headline metric
of each model comes with its standard error (``*_se``; MiniLM: over the five folds; SmolLM2's
perplexity: over its evaluation passages, by the delta method; the others binomial over the
evaluation samples): unpaired, so the difference of two rows on the same
samples is usually known better than the two errors suggest.  ``results.md`` ends each model with
those differences and their own (paired) standard errors -- at gptq's stored bits against the best
uniform baseline and between the knapsack methods, and between the knapsack methods at each budget
-- where the model's evaluation gives a value per sample: MiniLM's cosine, Fashion-MNIST's accuracy,
EfficientNet's top-1 agreement, SmolLM2's perplexity.

Writes ``results.csv``, ``results.md`` and ``results.png`` (metric vs bits, one panel per model)
into ``--out`` and prints the markdown table.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesq_onnx import Analysis, Recipe  # noqa: E402
from bayesq_onnx.assets import default_cache, load_npz  # noqa: E402
from bayesq_onnx.config import METHODS as REGISTRY, SPARSE_PATTERNS  # noqa: E402
from bayesq_onnx.errors import BayesQError  # noqa: E402
from bayesq_onnx.runtime.session import make_session  # noqa: E402
from bayesq_onnx.validate.compare import compare_outputs  # noqa: E402

METHODS = ("rtn", "gptq", "hqq-int", "hawq", "bayesq")
# bayesq with a loss-table source other than the default: bayesq-proxy, bayesq-closed_form, ...
VARIANT = "bayesq-"
DISTILL = "+distill"   # suffix: the method with calibration-only distillation (--distill STEPS)
# suffixes (before any +distill): the method with sequential mode on or off, whatever its default
SEQUENTIAL = {"-seq": True, "-noseq": False}
SPARSE = "+sparse"     # suffix: a knapsack method offered the N:M sparse formats too (--sparse PATTERNS)
NO_SCALED = "+nonf"    # suffix (before +sparse): a knapsack method without scaled codebooks (--scaled-codebooks none)
BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5)   # 4.5: the first budget that fits 4-bit g128 with fp32 scales
QUICK_BUDGETS = (2.5, 3.0, 3.5, 4.0)


@dataclass(frozen=True)
class Task:
    """One model of the scoreboard, ready to compress and score."""

    model: Path
    calib: dict[str, np.ndarray]
    # model path -> metrics; ``metric`` among them; under PER_SAMPLE, optionally, a metric's value on each
    # evaluation sample (perplexity: each sample's NLL sum and token count), for paired comparisons
    evaluate: Callable[[Path], dict]
    metric: str
    higher_is_better: bool
    recipe: dict                                    # Recipe fields this model needs (e.g. blocks)
    budgets: tuple[float, ...] | None = None        # this model's own budgets (default: --budgets)


# ----------------------------------------------------------------------------- tasks


def _minilm(cache: Path, quick: bool) -> Task:
    """Sentence embeddings: fortunes topic accuracy (logistic regression on the embeddings, five
    fixed folds) and mean cosine of the embeddings to fp32."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from bayesq_onnx.assets import prepare_minilm

    # 256 texts quick, 500 full (a forward pass of the eval set per row is most of a row's cost:
    # 6 s for 1000 texts); the topic accuracy's fold-averaged standard error is then about 3 / 2
    # points, the cosine's far below 0.01
    a = prepare_minilm(cache, n_calib=64, n_eval=256 if quick else 500, progress=logging.info)
    data, labels = load_npz(a.eval_data), np.load(a.labels)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(labels, labels))

    def topic_accuracy(emb: np.ndarray) -> tuple[float, float]:
        """Mean over the folds and its standard error."""
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        acc = [LogisticRegression(C=10.0, max_iter=1000).fit(emb[tr], labels[tr]).score(emb[te], labels[te])
               for tr, te in folds]
        return float(np.mean(acc)), float(np.std(acc, ddof=1) / np.sqrt(len(acc)))

    ref = _run(a.model, data, "embedding")

    def evaluate(path: Path) -> dict[str, float]:
        emb = _run(path, data, "embedding")
        cos = np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        acc, se = topic_accuracy(emb)
        return {"accuracy": acc, "accuracy_se": se, "cosine": float(np.mean(cos)),
                "cosine_se": float(np.std(cos, ddof=1) / np.sqrt(len(cos))), PER_SAMPLE: {"cosine": cos}}

    return Task(a.model, load_npz(a.calib), evaluate, "accuracy", True, {})


def _efficientnet(cache: Path, quick: bool) -> Task:
    """ImageNet classifier without ImageNet labels: top-1 agreement with fp32 and KL(fp32 || quant)
    on augmented scikit-image photos (disjoint from the calibration photos)."""
    from bayesq_onnx.assets import prepare_efficientnet

    a = prepare_efficientnet(cache, n_calib=64, n_eval=128 if quick else 256, progress=logging.info)
    data = load_npz(a.eval_data)
    ref = {"logits": _run(a.model, data, "logits")}
    n = len(ref["logits"])

    def evaluate(path: Path) -> dict[str, float]:
        logits = _run(path, data, "logits")
        m = compare_outputs(ref, {"logits": logits}, logits={"logits"})["outputs"]["logits"]
        agree = (logits.argmax(-1) == ref["logits"].argmax(-1)).astype(np.float64)
        return {"top1_agreement": m["top1_agreement"], "top1_agreement_se": _binomial_se(m["top1_agreement"], n),
                "kl": m["kl"], PER_SAMPLE: {"top1_agreement": agree}}

    return Task(a.model, load_npz(a.calib), evaluate, "top1_agreement", True, {})


def _fashion_mnist(cache: Path, quick: bool) -> Task:
    """A small ResNet trained once on Fashion-MNIST: accuracy on the 10k test images."""
    from bayesq_onnx.assets import prepare_fashion_mnist
    from bayesq_onnx.assets.fashion_mnist import correct

    a = prepare_fashion_mnist(cache, progress=logging.info)
    data, labels = load_npz(a.eval_data), np.load(a.labels)

    def evaluate(path: Path) -> dict[str, float]:
        right = correct(path, data, labels).astype(np.float64)
        acc = float(right.mean())
        return {"accuracy": acc, "accuracy_se": _binomial_se(acc, len(labels)), PER_SAMPLE: {"accuracy": right}}

    return Task(a.model, load_npz(a.calib), evaluate, "accuracy", True, {})


def _smollm2(cache: Path, quick: bool) -> Task:
    """SmolLM2-135M-Instruct: next-token perplexity on Jane Austen's Persuasion (calibrated on the
    other novels)."""
    from bayesq_onnx.assets import prepare_smollm2
    from bayesq_onnx.assets.smollm2 import perplexity_from, sample_nll

    a = prepare_smollm2(cache, progress=logging.info)
    data = load_npz(a.eval_data)

    def evaluate(path: Path) -> dict[str, float]:
        sums, counts = sample_nll(path, data)
        ppl, se = perplexity_from(sums, counts)
        return {"perplexity": ppl, "perplexity_se": se, PER_SAMPLE: {"perplexity": np.stack([sums, counts], axis=1)}}

    return Task(a.model, load_npz(a.calib), evaluate, "perplexity", False,
                # groups of 64 and 128 only: 16 candidates per MatMul site instead of 28, about half
                # the closed-form work per site; every method gets the same format set
                {"batch_size": 4, "blocks": (64, 128)},
                # every 2-bit plan breaks this model, so the informative budgets start at 3 (3-bit
                # g128 with fp16 scales: 3.15 bits/weight; 4-bit g64: 4.31)
                budgets=(3.0, 3.5, 4.0, 4.5))


TASKS: dict[str, Callable[[Path, bool], Task]] = {"minilm": _minilm, "fashion_mnist": _fashion_mnist,
                                                   "efficientnet": _efficientnet, "smollm2": _smollm2}
QUICK_MODELS = ("minilm", "fashion_mnist", "efficientnet")


def _binomial_se(p: float, n: int) -> float:
    return float(np.sqrt(p * (1 - p) / n))


def _run(path: Path, data: dict[str, np.ndarray], output: str, batch: int = 64) -> np.ndarray:
    sess = make_session(path)
    n = len(next(iter(data.values())))
    return np.concatenate([sess.run([output], {k: v[i:i + batch] for k, v in data.items()})[0]
                           for i in range(0, n, batch)])


# ----------------------------------------------------------------------------- the run


def bench_model(name: str, task: Task, methods, budgets, out_dir: Path, proxy_samples: int | None,
                distill: int = 100, sparse=SPARSE_PATTERNS, scale_samples: int | None = None,
                gptq_damp: float | None = None) -> list[dict]:
    rows = [{"model": name, "method": "fp32", "budget": None, "bits_per_weight": 32.0, "bits_all": 32.0, "plan": "fp32",
             "seconds": 0.0, **task.evaluate(task.model)}]
    _say(rows[-1])
    achieved: dict[float, float] = {}           # budget -> the @gptq budget: the bits gptq achieved there
    gptq_bits: dict[float, float] = {}          # that budget -> gptq's exact bits
    base = {m: _sequential(m)[0] for m in methods}
    ours = [m for m in methods if base[m] == "bayesq" or base[m].startswith(VARIANT)]
    # knapsack methods reach their budget: each is also run at gptq's achieved bits, so after gptq
    matched = [m for m in methods if base[m] in REGISTRY and REGISTRY[base[m]].planner == "knapsack"
               and m not in ours] + ours
    # gptq first: the other baselines' rows are matched to its bits, the knapsack methods run at them
    for method in sorted((m for m in methods if m not in matched), key=lambda m: m != "gptq") + matched:
        fields = dict(task.recipe, method=base[method])
        if base[method].startswith(VARIANT):
            fields.update(method="bayesq", tables=base[method][len(VARIANT):])
        if _sequential(method)[1] is not None:
            fields["sequential"] = _sequential(method)[1]
        if method.endswith(DISTILL):
            fields["distill"] = distill
        if method.removesuffix(DISTILL).endswith(SPARSE):
            fields["sparse"] = sparse
        if method.removesuffix(DISTILL).removesuffix(SPARSE).endswith(NO_SCALED):
            fields["scaled_lut_bits"] = ()
        if proxy_samples and method in ours:
            fields["proxy_samples"] = proxy_samples
        if scale_samples and method in ours:
            fields["scale_samples"] = scale_samples
        if gptq_damp is not None:                  # every method: the plan check's gptq contender too
            fields["gptq_damp"] = gptq_damp
        t0 = time.perf_counter()
        try:
            analysis = Analysis(task.model, Recipe(bits=max(budgets), **fields), calib=task.calib)
        except BayesQError as e:
            logging.warning("%s/%s: %s", name, method, e)
            continue
        points = [(b, method) for b in budgets]
        if method in matched and "gptq" in methods:   # strictly matched: gptq's achieved bits
            points += [(a, f"{method}@gptq") for a in dict.fromkeys(achieved[b] for b in budgets if b in achieved)
                       if a not in budgets]
        for bits, label in points:
            out = out_dir / f"{name}.{label}.{bits:.4g}.onnx"
            try:
                rep = analysis.compress(bits, output=out).report
            except BayesQError as e:           # budget below this model's cheapest formats
                logging.warning("%s/%s at %g: %s", name, label, bits, e)
                continue
            if method == "gptq":
                # the @gptq budget: gptq's stored bits plus half a bit over the whole model, so a knapsack
                # method can take gptq's own plan but never a bit more (stored bits are whole numbers)
                achieved[bits] = (sum(l["stored_bits"] for l in rep["layers"]) + 0.5) / rep["n_weights"]
                gptq_bits[achieved[bits]] = rep["bits_per_weight"]
            # the gptq row this one is compared with: a uniform baseline's at the same budget (the same
            # plan, so the same bits), a knapsack method's @gptq at the bits gptq reached
            matched_to = gptq_bits.get(bits) if method in matched else gptq_bits.get(achieved.get(bits))
            t_eval = time.perf_counter()
            # seconds: this method's compression wall time so far (one analysis, then each budget), no evaluation
            _check_matched(name, label, rep["bits_per_weight"], matched_to, exact=method not in matched)
            rows.append({"model": name, "method": label, "budget": bits, "bits_per_weight": rep["bits_per_weight"],
                         "bits_all": rep["bits_per_weight_all"], "gptq_bits": matched_to, "plan": rep["plan"],
                         "seconds": time.perf_counter() - t0, **task.evaluate(out)})
            if rep["sparsity"]:   # the share each layer prunes, per layer (the report's, in the row)
                rows[-1]["sparsity"] = rep["sparsity"]
                rows[-1]["sparse_layers"] = ";".join(f"{l['name']}={l['sparsity']:.3g}" for l in rep["layers"]
                                                     if l["sparsity"])
            if rep.get("distill"):   # shipped or refused, and the held-back distortion before -> after tuning
                d = rep["distill"]
                rows[-1]["distill"] = "{}: {:.4g} -> {:.4g}".format("shipped" if d["shipped"] else "refused",
                                                                    *d["held_back_distortion"])
            t0 += time.perf_counter() - t_eval   # evaluation is not compression time
            out.unlink()
            _say(rows[-1])
    return rows


def _sequential(method: str) -> tuple[str, bool | None]:
    """The method without its suffixes, and the sequential mode its name asks for (None: the default)."""
    name = method.removesuffix(DISTILL).removesuffix(SPARSE).removesuffix(NO_SCALED)
    for suffix, on in SEQUENTIAL.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), on
    return name, None


def _check_matched(model: str, label: str, bits: float, gptq: float | None, exact: bool) -> None:
    """A matched row never stores more bits than gptq's (the comparison would favour it), and a uniform
    baseline stores exactly gptq's (the same plan): anything else is a bug of the scoreboard."""
    if gptq is None:
        return
    if bits > gptq or (exact and bits != gptq):
        raise RuntimeError(f"{model}/{label}: {bits:.6f} bits/weight, matched to gptq's {gptq:.6f}")


def matched_table(rows: list[dict], name: str, task: Task) -> list[str]:
    """Markdown: every method at gptq's stored bits, one line per gptq row, with the largest shortfall
    (gptq's bits minus a method's; a knapsack cannot always spend the last few bits)."""
    mine = [r for r in rows if r["model"] == name and r.get("gptq_bits") is not None]
    points = list(dict.fromkeys(r["gptq_bits"] for r in mine))
    methods = list(dict.fromkeys(r["method"] for r in mine))
    if not points:
        return []
    arrow = "↑" if task.higher_is_better else "↓"
    lines = [f"### {name} at gptq's stored bits ({task.metric} {arrow})", "",
             "| gptq's bits | " + " | ".join(methods) + " | largest shortfall |", "|---|" + "---|" * (len(methods) + 1)]
    for b in points:
        at = {r["method"]: r for r in mine if r["gptq_bits"] == b}
        lines.append(f"| {b:.4f} | " + " | ".join(_fmt(at[m][task.metric]) if m in at else "-" for m in methods)
                     + f" | {max(b - r['bits_per_weight'] for r in at.values()):.4f} |")
    return lines + [""]


def gap_table(rows: list[dict], name: str) -> list[str]:
    """Markdown: at each of gptq's stored bits and for each metric, the best uniform baseline's gap to
    fp32 and the share of it each knapsack method closes there (1: fp32 reached; negative: worse than
    that baseline).  A gap is the distance to fp32's value, which every metric here has as its best."""
    mine = [r for r in rows if r["model"] == name]
    fp32 = next((r for r in mine if r["method"] == "fp32"), None)
    matched = [r for r in mine if r.get("gptq_bits") is not None]
    ours = list(dict.fromkeys(r["method"] for r in matched if r["method"].endswith("@gptq")))
    if fp32 is None or not ours:
        return []
    metrics = [k for k in fp32 if k not in ROW_FIELDS and not k.endswith("_se") and isinstance(fp32[k], float)]
    lines = [f"### {name}: share of the best uniform baseline's gap to fp32 closed, at gptq's stored bits", "",
             "| gptq's bits | metric (fp32) | best uniform baseline | " + " | ".join(ours) + " |",
             "|---|---|---|" + "---|" * len(ours)]
    for b in dict.fromkeys(r["gptq_bits"] for r in matched):
        at = {r["method"]: r for r in matched if r["gptq_bits"] == b}
        for k in metrics:
            base = {m: abs(r[k] - fp32[k]) for m, r in at.items() if not m.endswith("@gptq") and k in r}
            if not base:
                continue
            best = min(base, key=base.get)
            # a baseline within two standard errors of fp32 leaves no gap to measure a share of
            shares = base[best] > 2 * at[best].get(k + "_se", 0.0)
            cells = [f"{_fmt(at[m][k])} ({1 - abs(at[m][k] - fp32[k]) / base[best]:+.2f})" if m in at and shares
                     else _fmt(at[m][k]) if m in at else "-" for m in ours]
            lines.append(f"| {b:.4f} | {k} ({_fmt(fp32[k])}) | {best} {_fmt(at[best][k])}{'' if shares else ' (within 2 SE)'} | "
                         + " | ".join(cells) + " |")
    return lines + [""]


def paired_table(rows: list[dict], name: str) -> list[str]:
    """Markdown: at each of gptq's stored bits, each knapsack method's difference from the best uniform
    baseline there and from the other knapsack methods; then at each budget, the knapsack methods'
    differences from each other (each spends the budget).  With the standard error of the difference
    over the same evaluation samples (paired: what makes two rows differ, not how hard the samples
    are).  Only metrics with per-sample values (Task.evaluate); perplexity as a relative change."""
    mine = [r for r in rows if r["model"] == name and PER_SAMPLE in r]
    fp32 = next((r for r in mine if r["method"] == "fp32"), None)
    if fp32 is None:
        return []
    lines = []
    matched = [r for r in mine if r.get("gptq_bits") is not None]
    ours = list(dict.fromkeys(r["method"] for r in matched if r["method"].endswith("@gptq")))
    if ours:
        lines += [f"### {name}: paired differences at gptq's stored bits (difference ± its standard error)", "",
                  "| gptq's bits | metric | against | " + " | ".join(ours) + " |", "|---|---|---|" + "---|" * len(ours)]
        for b in dict.fromkeys(r["gptq_bits"] for r in matched):
            lines += _paired_rows(f"{b:.4f}", {r["method"]: r for r in matched if r["gptq_bits"] == b}, ours, fp32)
        lines.append("")
    # the knapsack methods' rows at their budgets (a uniform method's plan is "uniform ...")
    at_budget = [r for r in mine if r.get("gptq_bits") is None and r["method"] != "fp32"
                 and not str(r.get("plan", "")).startswith("uniform")]
    knapsacks = list(dict.fromkeys(r["method"] for r in at_budget))
    if len(knapsacks) > 1:
        lines += [f"### {name}: paired differences at each budget (difference ± its standard error)", "",
                  "| budget | metric | against | " + " | ".join(knapsacks) + " |", "|---|---|---|" + "---|" * len(knapsacks)]
        for b in dict.fromkeys(r["budget"] for r in at_budget):
            lines += _paired_rows(_fmt(b), {r["method"]: r for r in at_budget if r["budget"] == b}, knapsacks, fp32)
        lines.append("")
    return lines


def _paired_rows(point: str, at: dict, ours: list[str], fp32: dict) -> list[str]:
    """One point's lines: the methods ``ours`` against the uniform baseline nearest fp32 among ``at``'s
    other rows (if any), and each against the ones before it (the other way round is the same, negated)."""
    lines = []
    for k in fp32[PER_SAMPLE]:
        base = {m: abs(r[k] - fp32[k]) for m, r in at.items() if m not in ours and k in r[PER_SAMPLE]}
        for against in ([min(base, key=base.get)] if base else []) + [m for m in ours[:-1] if m in at]:
            later = ours[ours.index(against) + 1:] if against in ours else ours
            cells = [_paired(at[m][PER_SAMPLE][k], at[against][PER_SAMPLE][k], k) if m in at and m in later
                     else "-" for m in ours]
            if any(c != "-" for c in cells):
                lines.append(f"| {point} | {k} | {against} | " + " | ".join(cells) + " |")
    return lines


def _paired(a: np.ndarray, b: np.ndarray, metric: str) -> str:
    """``a - b`` over the same samples and its standard error; perplexity (rows of NLL sum and token
    count) as ``ppl_a / ppl_b - 1`` by the delta method."""
    if metric == "perplexity":
        from bayesq_onnx.assets.smollm2 import log_perplexity_se
        d = a[:, 0] - b[:, 0]
        delta = d.sum() / a[:, 1].sum()
        return f"{np.expm1(delta):+.1%} ± {np.exp(delta) * log_perplexity_se(d, a[:, 1]):.1%}"
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return f"{d.mean():+.4g} ± {d.std(ddof=1) / np.sqrt(len(d)):.2g}"


def _say(row: dict) -> None:
    logging.info("%s", "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != PER_SAMPLE))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# a row's fields that are not metrics
ROW_FIELDS = ("model", "method", "budget", "bits_per_weight", "bits_all", "gptq_bits", "plan", "seconds", "sparse_layers",
              "per_sample")
PER_SAMPLE = "per_sample"   # a row's per-sample values (Task.evaluate): in memory only, not in the CSV or the log


def write_outputs(rows: list[dict], tasks: dict[str, Task], out_dir: Path) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k != PER_SAMPLE))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = []
    for name, task in tasks.items():
        mine = [r for r in rows if r["model"] == name]
        metrics = [k for k in keys if k not in ROW_FIELDS and any(k in r for r in mine)]
        arrow = "↑" if task.higher_is_better else "↓"
        lines += [f"### {name} ({task.metric} {arrow})", "",
                  "| method | budget | bits/weight | all weights | " + " | ".join(metrics) + " | plan | seconds |",
                  "|---|---|---|---|" + "---|" * len(metrics) + "---|---|"]
        for r in mine:
            lines.append(f"| {r['method']} | {_fmt(r['budget'])} | {r['bits_per_weight']:.3f} | {r['bits_all']:.3f} | "
                         + " | ".join(_fmt(r.get(k)) for k in metrics) + f" | {r['plan']} | {r['seconds']:.0f} |")
        lines.append("")
        lines += matched_table(rows, name, task) + gap_table(rows, name) + paired_table(rows, name)
    md = "\n".join(lines)
    (out_dir / "results.md").write_text(md + "\n")
    _plot(rows, tasks, out_dir / "results.png")
    return md


def _plot(rows, tasks, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        mine = [r for r in rows if r["model"] == name]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["bits_per_weight"], r[task.metric]) for r in mine if r["method"] == method)
            if method == "fp32":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="fp32")
            else:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_title(name)
        ax.set_xlabel("stored bits / weight")
        ax.set_ylabel(task.metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"models {','.join(QUICK_MODELS)}, smaller eval sets")
    ap.add_argument("--models", help=f"comma-separated, from {','.join(TASKS)} (default: all, or the quick set)")
    ap.add_argument("--budgets", help=f"comma-separated (default: {','.join(map(str, BUDGETS))}, "
                    "or the model's own list)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {','.join(METHODS)}, or {VARIANT}TABLES for bayesq with other "
                         f"loss tables (e.g. bayesq-proxy); any of them with {' or '.join(SEQUENTIAL)} "
                         "(e.g. gptq-noseq, bayesq-seq) with sequential mode on or off whatever the method's default; "
                         f"a knapsack method then with {NO_SCALED} (e.g. bayesq{NO_SCALED}) is not offered scaled codebooks, "
                         f"with {SPARSE} (e.g. bayesq{SPARSE}) the N:M sparse formats "
                         f"too; and any of them last with {DISTILL} (e.g. bayesq{DISTILL}) adds calibration-only "
                         "distillation")
    ap.add_argument("--distill", type=int, default=100, metavar="STEPS",
                    help=f"distillation steps of the {DISTILL} methods (default 100)")
    ap.add_argument("--sparse", default=",".join(f"{k}:{m}" for k, m in SPARSE_PATTERNS), metavar="PATTERNS",
                    help=f"the N:M patterns of the {SPARSE} methods, KEEP:OF comma-separated (default: %(default)s)")
    ap.add_argument("--proxy-samples", type=int, help="bayesq's proxy samples (default: the recipe's)")
    ap.add_argument("--scale-samples", type=int, help="at most this many samples for bayesq's kron factors (default: the recipe's)")
    ap.add_argument("--gptq-damp", type=float, help="GPTQ's dampening for every method (default: the recipe's)")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--out", type=Path, default=Path("bench-accuracy"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else TASKS)
    unknown = set(names) - set(TASKS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {sorted(TASKS)}")
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, tasks = [], {}
    for name in names:
        try:
            tasks[name] = TASKS[name](args.cache, args.quick)
        except BayesQError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        rows += bench_model(name, tasks[name], methods,
                            budgets or list(tasks[name].budgets or (QUICK_BUDGETS if args.quick else BUDGETS)),
                            args.out, args.proxy_samples, args.distill,
                            tuple(tuple(int(v) for v in p.split(":")) for p in args.sparse.split(",")),
                            args.scale_samples, args.gptq_damp)
        logging.info("%s: %.0f s so far", name, time.perf_counter() - t0)
        write_outputs(rows, tasks, args.out)     # partial results survive an interrupted run
    md = write_outputs(rows, tasks, args.out)
    print(md)
    print(f"total {time.perf_counter() - t0:.0f} s; results in {args.out}/results.{{md,csv,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
