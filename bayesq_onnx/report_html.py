"""A compress report (``api._report``'s dict, docs/formats.md) as one self-contained HTML page.

    html = render_html(report)        # str; inline CSS and SVG, no script, nothing fetched

Sections: the summary, bits per layer against its sensitivity, the budget curve (every plan the
plan check measured), the size breakdown per op type, skipped weights and why, the allocation
steps, the recipe.  Every string taken from the report is escaped (layer names may hold ``<``, ``&``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from html import escape

from .errors import BayesQError

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.8em;vertical-align:middle}.b0{background:#3b6fb6}.b1{background:#e3a33b}
.b2{background:#999}.b3{background:#c0504d}.note{color:#666;font-size:.9em}
svg{background:#fff;border:1px solid #ddd}svg text{font:11px system-ui,sans-serif;fill:#333}
.legend span{margin-right:1.5em}code{font-size:.95em}
"""
# size breakdown parts: (key, label, css class)
PARTS = (("codes", "codes", "b0"), ("overhead", "scales, zero points, codebooks, padding", "b1"),
         ("fp32", "fp32 kept (in the budget)", "b2"))


def _e(x) -> str:
    return escape(str(x), quote=True)


def _num(x, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, fmt)


def _bytes(bits: float) -> str:
    n = bits / 8
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_report(r) -> None:
    """A report this module can render, or a one-line BayesQError."""
    if not isinstance(r, dict) or r.get("tool") != "bayesq-onnx" or not isinstance(r.get("layers"), list):
        raise BayesQError("not a bayesq-onnx report (a JSON object with \"tool\": \"bayesq-onnx\" and \"layers\")")
    for l in r["layers"]:
        if not isinstance(l, dict) or not {"name", "format", "bits", "stored_bits", "shape"} <= set(l):
            raise BayesQError("the report's layers lack name, format, bits, stored_bits or shape")


def render_html(r: dict) -> str:
    check_report(r)
    title = f"bayesq-onnx report: {r.get('input') or r.get('output') or 'model'}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
             _summary(r), _layers(r), _budget_curve(r), _sizes(r), _skipped(r), _steps(r), _recipe(r),
             "</body></html>\n"]
    return "\n".join(parts)


def _summary(r: dict) -> str:
    cal = r.get("calibration") or {}
    rows = [("input", r.get("input")), ("output", r.get("output")),
            ("output file", _bytes(8 * r["output_bytes"]) if _positive(r.get("output_bytes")) else None),
            ("method / target", f"{r.get('method')} / {r.get('target')}"),
            ("loss tables / curvature", f"{r.get('tables')} / {r.get('curvature')}"),
            ("budget", f"{_num(r.get('budget'))} bits per weight"),
            ("stored", f"{_num(r.get('bits_per_weight'), '.3f')} bits per weight "
                       f"({_num(r.get('code_bits_per_weight'), '.3f')} in codes)"),
            ("weights quantized", f"{r.get('n_weights')} in {len(r['layers'])} tensors; "
                                  f"{len(r.get('skipped') or [])} skipped"),
            ("plan shipped", r.get("plan")),
            ("calibration", f"{cal.get('source')}: {cal.get('samples')} samples ({cal.get('fit')} fit, "
                            f"{cal.get('held_back')} held back)" if cal else None),
            ("time", f"{_num(r.get('seconds'), '.1f')} s")]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v is not None)
    return f"<h2>Summary</h2><table>{body}</table>"


def _sensitivity(r: dict) -> tuple[str, str]:
    """Which per-layer loss to plot: the allocator's table_loss where the report has it."""
    if any(_positive(l.get("table_loss")) for l in r["layers"]):
        return "table_loss", f"table loss ({r.get('tables')} tables, the allocator's input)"
    return "expected_loss", "closed-form expected loss"


def _layers(r: dict) -> str:
    key, what = _sensitivity(r)
    layers = r["layers"]
    bpw = [l["stored_bits"] / max(1, math.prod(l["shape"])) for l in layers]
    top = max(bpw + [1e-9])
    sens = [l.get(key) for l in layers]
    logs = [math.log10(s) for s in sens if _positive(s)]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 1.0)
    rows = []
    for l, b, s in zip(layers, bpw, sens):
        sbar = (f"<span class=\"bar b3\" style=\"width:{4 + 96 * (math.log10(s) - lo) / ((hi - lo) or 1):.1f}px\">"
                f"</span> " if _positive(s) else "")
        rows.append(f"<tr><td><code>{_e(l['name'])}</code></td><td>{_e(l.get('op_type', ''))}</td>"
                    f"<td>{_e('x'.join(map(str, l['shape'])))}</td><td><code>{_e(l['format'])}</code></td>"
                    f"<td>{_e(l.get('grid', ''))}</td>"
                    f"<td class=\"n\"><span class=\"bar b0\" style=\"width:{100 * b / top:.1f}px\"></span> {b:.3f}</td>"
                    f"<td class=\"n\">{sbar}{_num(s)}</td><td class=\"n\">{_num(l.get('expected_loss'))}</td></tr>")
    table = ("<table><tr><th>weight</th><th>op</th><th>shape</th><th>format</th><th>grid</th>"
             f"<th>bits / weight stored</th><th>{_e(key)} (log bar)</th><th>expected_loss</th></tr>"
             + "".join(rows) + "</table>")
    points = [(math.log10(s), b, l["name"], l["format"]) for l, b, s in zip(layers, bpw, sens) if _positive(s)]
    if not points:   # a uniform plan: one format everywhere, chosen by no loss, so none is reported
        return (f"<h2>Bits per layer</h2><p class=\"note\">No sensitivity: the plan shipped "
                f"({_e(r.get('plan'))}) gives every weight one format, chosen by no loss table or expected "
                f"loss.</p>{table}")
    chart = _scatter(points, f"log10 {key}", "bits per weight stored", lambda x: f"1e{x:.1f}", "{:.2f}".format,
                     lambda p: f"{p[2]}: {p[3]}, {p[1]:.3f} bits/weight, {key} {10 ** p[0]:.3g}")
    return (f"<h2>Bits per layer against sensitivity</h2><p class=\"note\">Sensitivity: {_e(what)}, of the "
            "format each weight got; the greedy gives more bits where a bit buys more loss drop, so sensitive "
            f"layers should sit high.  Hover a point for its layer.</p>{chart}{table}")


def _budget_curve(r: dict) -> str:
    check = r.get("plan_check")
    if not isinstance(check, dict) or not check.get("candidates"):
        return (f"<h2>Budget curve</h2><p class=\"note\">No plan check: --method {_e(r.get('method'))} plans "
                "one uniform format, with nothing to compare it against.</p>")
    cands = [c for c in check["candidates"] if isinstance(c, dict)]
    chosen = check.get("chosen")
    rows = "".join(
        f"<tr><td>{_e(c.get('plan'))}{' <b>(shipped)</b>' if c.get('plan') == chosen else ''}</td>"
        f"<td class=\"n\">{_num(c.get('bits_per_weight'), '.3f')}</td><td class=\"n\">{_num(c.get('distortion'))}</td></tr>"
        for c in cands)
    pts = [(c["bits_per_weight"], c["distortion"], c.get("plan"), c.get("plan") == chosen) for c in cands
           if _positive(c.get("bits_per_weight")) and _positive(c.get("distortion"))]
    log = len(pts) > 1 and max(p[1] for p in pts) / min(p[1] for p in pts) > 20
    shown = [(x, math.log10(y) if log else y, label, ch) for x, y, label, ch in pts]
    chart = _scatter(shown, "bits per weight stored", "distortion" + (" (log10)" if log else ""), "{:.2f}".format,
                     (lambda v: f"1e{v:.1f}") if log else "{:.3g}".format,
                     lambda p: f"{p[2]}: {p[0]:.3f} bits/weight, distortion {10 ** p[1] if log else p[1]:.4g}",
                     vline=r.get("budget") if _positive(r.get("budget")) else None,
                     labels=True, filled=lambda p: p[3]) if shown else ""
    ratio = check.get("knapsack_vs_best_uniform")
    return (f"<h2>Budget curve</h2><p class=\"note\">Distortion ({_e(check.get('metric', ''))}) of each plan "
            "the plan check measured, against its stored bits; the dashed line is the budget, the filled point "
            f"the plan that shipped.  Knapsack / best other plan: {_e(_num(ratio, '.3f'))}.</p>{chart}"
            f"<table><tr><th>plan</th><th>bits / weight</th><th>distortion</th></tr>{rows}</table>")


def size_breakdown(r: dict) -> dict[str, dict[str, float]]:
    """Stored bits per op type: ``codes`` (code bits of quantized weights), ``overhead`` (the rest of
    their stored bits: scales, zero points, codebooks, padding), ``fp32`` (weights the plan kept in fp32)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"codes": 0, "overhead": 0, "fp32": 0})
    for l in r["layers"]:
        op = l.get("op_type") or "?"
        if l["format"] == "float32":
            out[op]["fp32"] += l["stored_bits"]
        else:
            codes = math.prod(l["shape"]) * l["bits"]
            out[op]["codes"] += codes
            out[op]["overhead"] += l["stored_bits"] - codes
    return dict(out)


def _sizes(r: dict) -> str:
    b = size_breakdown(r)
    total = {k: sum(v[k] for v in b.values()) for k, _, _ in PARTS}
    top = max([sum(v.values()) for v in b.values()] + [1])
    rows = []
    for op, v in sorted(b.items(), key=lambda kv: -sum(kv[1].values())) + [("all", total)]:
        bar = "".join(f"<span class=\"bar {c}\" style=\"width:{300 * v[k] / top:.1f}px\" title=\"{_e(label)}\"></span>"
                      for k, label, c in PARTS if v[k]) if op != "all" else ""
        rows.append(f"<tr><td>{_e(op)}</td><td>{bar}</td>"
                    + "".join(f"<td class=\"n\">{_bytes(v[k])}</td>" for k, _, _ in PARTS)
                    + f"<td class=\"n\">{_bytes(sum(v.values()))}</td></tr>")
    legend = "".join(f"<span><span class=\"bar {c}\" style=\"width:1em\"></span> {_e(label)}</span>"
                     for _, label, c in PARTS)
    return ("<h2>Size breakdown</h2><p class=\"note\">What the quantized weights store, per op type.  Skipped "
            "weights stay as they were and are not counted here (nor in bits per weight).</p>"
            f"<p class=\"legend\">{legend}</p><table><tr><th>op type</th><th></th>"
            + "".join(f"<th>{_e(label)}</th>" for _, label, _ in PARTS) + "<th>total</th></tr>"
            + "".join(rows) + "</table>")


def _skipped(r: dict) -> str:
    sk = [s for s in (r.get("skipped") or []) if isinstance(s, dict)]
    if not sk:
        return "<h2>Skipped weights</h2><p>None: every float weight of rank 2 or more was quantized.</p>"
    rows = "".join(f"<tr><td><code>{_e(s.get('name'))}</code></td><td>{_e(s.get('reason'))}</td></tr>" for s in sk)
    return f"<h2>Skipped weights</h2><table><tr><th>weight</th><th>why</th></tr>{rows}</table>"


def _steps(r: dict) -> str:
    steps = [s for s in (r.get("allocation_steps") or []) if isinstance(s, dict)]
    if not steps:
        return ""
    rows = "".join(f"<tr><td><code>{_e(s.get('name'))}</code></td><td><code>{_e(s.get('from'))}</code></td>"
                   f"<td><code>{_e(s.get('to'))}</code></td><td class=\"n\">{_num(s.get('loss_drop_per_bit'))}</td>"
                   f"<td class=\"n\">{_num(s.get('extra_bits'), '.0f')}</td></tr>" for s in steps)
    return (f"<h2>Allocation steps</h2><details><summary>{len(steps)} greedy upgrades, in the order taken</summary>"
            "<table><tr><th>weight</th><th>from</th><th>to</th><th>loss drop per bit</th><th>extra bits</th></tr>"
            f"{rows}</table></details>")


def _recipe(r: dict) -> str:
    rec = r.get("recipe")
    if not isinstance(rec, dict):
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(_plain(v))}</code></td></tr>" for k, v in rec.items())
    return ("<h2>Recipe</h2><p class=\"note\">Replay it with <code>bayesq-onnx compress MODEL --recipe "
            f"REPORT.json</code>.</p><table>{rows}</table>")


def _plain(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v) if v else "(none)"
    return "null" if v is None else str(v)


def _scatter(points, xlabel: str, ylabel: str, xfmt, yfmt, tip, vline: float | None = None,
             labels: bool = False, filled=lambda p: True) -> str:
    """An inline SVG scatter of ``points`` ``(x, y, ...)``: ``tip(point)`` is each point's tooltip (an
    SVG <title>), ``labels`` writes ``point[2]`` beside it, ``filled(point)`` False draws it hollow."""
    W, H, L, R, T, B = 640, 300, 60, 150 if labels else 20, 15, 40
    xs = [p[0] for p in points] + ([vline] if vline is not None else [])
    ys = [p[1] for p in points]
    x0, x1 = _span(xs)
    y0, y1 = _span(ys)
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" "
           f"role=\"img\">",
           f"<line x1=\"{L}\" y1=\"{H - B}\" x2=\"{W - R}\" y2=\"{H - B}\" stroke=\"#888\"/>",
           f"<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{H - B}\" stroke=\"#888\"/>"]
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f"<text x=\"{X(xv):.1f}\" y=\"{H - B + 14}\" text-anchor=\"middle\">{_e(xfmt(xv))}</text>")
        out.append(f"<text x=\"{L - 4}\" y=\"{Y(yv) + 4:.1f}\" text-anchor=\"end\">{_e(yfmt(yv))}</text>")
    out.append(f"<text x=\"{(L + W - R) / 2:.0f}\" y=\"{H - 6}\" text-anchor=\"middle\">{_e(xlabel)}</text>")
    out.append(f"<text x=\"12\" y=\"{(T + H - B) / 2:.0f}\" text-anchor=\"middle\" "
               f"transform=\"rotate(-90 12 {(T + H - B) / 2:.0f})\">{_e(ylabel)}</text>")
    if vline is not None:
        out.append(f"<line x1=\"{X(vline):.1f}\" y1=\"{T}\" x2=\"{X(vline):.1f}\" y2=\"{H - B}\" stroke=\"#c0504d\" "
                   "stroke-dasharray=\"4 3\"/>")
    placed: list[tuple[float, float]] = []   # label positions so far: a label never overprints another
    for p in points:
        fill = "#3b6fb6" if filled(p) else "#fff"
        out.append(f"<circle cx=\"{X(p[0]):.1f}\" cy=\"{Y(p[1]):.1f}\" r=\"5\" fill=\"{fill}\" stroke=\"#3b6fb6\" "
                   f"stroke-width=\"2\"><title>{_e(tip(p))}</title></circle>")
        if labels:
            x, y = X(p[0]) + 8, Y(p[1]) + 4
            while any(abs(x - a) < 120 and abs(y - b) < 12 for a, b in placed):
                y += 12
            placed.append((x, y))
            out.append(f"<text x=\"{x:.1f}\" y=\"{y:.1f}\">{_e(p[2])}</text>")
    out.append("</svg>")
    return "<p>" + "".join(out) + "</p>"


def _span(vals: list[float]) -> tuple[float, float]:
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad
