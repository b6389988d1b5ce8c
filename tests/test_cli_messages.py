"""What the command line says: usage errors named once and per subcommand, --version, no
abbreviations, unknown flags named, --tables, help for every option, and eval's summary/warnings."""
from __future__ import annotations

import argparse
import json
from importlib import metadata

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from bayesq_onnx import cli
from bayesq_onnx.cli import main
from bayesq_onnx.config import TABLE_SOURCES, Recipe




def _error_line(capsys, argv) -> tuple[str, str]:
    """Run main(argv), expect exit 2 and exactly one stderr line; return (that line, stdout)."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("bayesq-onnx: error: "), lines[0]
    assert lines[0].count("bayesq-onnx") == 1, f"prefix doubled: {lines[0]}"
    return lines[0], out


# 1. usage errors: one prefix, the subcommand named

def test_no_arguments_prints_usage_and_one_error_line(capsys):
    line, out = _error_line(capsys, [])
    assert out.startswith("usage: bayesq-onnx"), out
    for command in ("export", "calib", "compress", "eval", "curvature", "demo"):
        assert command in out
        assert command in line
    assert "command is required" in line


@pytest.mark.parametrize("argv, want", [
    (["compress", "m.onnx"], "bayesq-onnx: error: compress: the following arguments are required: --bits "
                             "(or --recipe)"),
    (["eval", "a.onnx", "b.onnx"], "bayesq-onnx: error: eval: the following arguments are required: --data"),
    (["curvature", "m.onnx", "-o", "c.npz"],
     "bayesq-onnx: error: curvature: the following arguments are required: --calib"),
    (["compress", "m.onnx", "--bits", "three"], "bayesq-onnx: error: compress: argument --bits: invalid float "
                                                "value: 'three'"),
    (["nonsense"], "bayesq-onnx: error: argument COMMAND: invalid choice: 'nonsense' (choose from 'export', "
                   "'calib', 'compress', 'eval', 'crosscheck', 'predict', 'report', 'inspect', 'tune', 'curvature', "
                   "'demo')"),
    (["export", "net.py:make"], "bayesq-onnx: error: export: the following arguments are required: -o/--output"),
    (["calib", "m.onnx", "-o", "c.npz"], "bayesq-onnx: error: calib: one of the arguments --text --images --random "
                                         "is required"),
])
def test_parser_errors_name_the_subcommand_once(capsys, argv, want):
    line, _ = _error_line(capsys, argv)
    assert line == want


# 2. --version

def test_version_from_the_installed_distribution(capsys):
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"bayesq-onnx {metadata.version('bayesq-onnx')}\n" and err == ""


def test_version_falls_back_to_the_package(capsys, monkeypatch):
    import bayesq_onnx

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    monkeypatch.setattr(bayesq_onnx, "__version__", "9.8.7")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "bayesq-onnx 9.8.7\n"


# 3. no abbreviations, 4. unknown flags named (before "required")

@pytest.mark.parametrize("argv, unknown", [
    (["compress", "m.onnx", "--bit", "3.0"], "--bit 3.0"),
    (["compress", "m.onnx", "--bits", "3", "--calib", "c.npz", "--curv", "k.npz"], "--curv k.npz"),
    (["eval", "a.onnx", "b.onnx", "--dat", "d.npz"], "--dat d.npz"),
    (["curvature", "m.onnx", "--cal", "c.npz", "-o", "k.npz"], "--cal c.npz"),
])
def test_abbreviations_are_errors(capsys, mlp_path, argv, unknown):
    before = sorted(mlp_path.parent.iterdir())
    line, _ = _error_line(capsys, argv)
    assert line == f"bayesq-onnx: error: {argv[0]}: unrecognized arguments: {unknown}"
    assert sorted(mlp_path.parent.iterdir()) == before


def test_demo_abbreviation_is_an_error():
    # through the parser only: were it accepted, main() would run the demo
    with pytest.raises(cli.BayesQError, match="^demo: unrecognized arguments: --bit 2.5$"):
        cli._parse(["demo", "--bit", "2.5"])


@pytest.mark.parametrize("extra", [[], ["--bits", "3.0"]])
def test_unknown_flag_is_named(capsys, mlp_path, extra):
    line, _ = _error_line(capsys, ["compress", str(mlp_path), "--bitz", "3.0", *extra])
    assert line == "bayesq-onnx: error: compress: unrecognized arguments: --bitz 3.0"


def test_unknown_flag_before_the_command(capsys):
    line, _ = _error_line(capsys, ["--frobnicate"])
    assert line == "bayesq-onnx: error: unrecognized arguments: --frobnicate"


# 5. --tables

def test_tables_reaches_the_recipe():
    for t in TABLE_SOURCES:
        assert cli._recipe(cli._parse(["compress", "m.onnx", "--bits", "3", "--tables", t])).tables == t
    assert cli._recipe(cli._parse(["compress", "m.onnx", "--bits", "3"])).tables == "auto"


def test_gptq_damp_reaches_the_recipe(capsys):
    assert cli._recipe(cli._parse(["compress", "m.onnx", "--bits", "3", "--gptq-damp", "0.1"])).gptq_damp == 0.1
    assert cli._recipe(cli._parse(["compress", "m.onnx", "--bits", "3"])).gptq_damp == Recipe(bits=3).gptq_damp
    with pytest.raises(cli.BayesQError, match="--gptq-damp must be positive"):
        cli._recipe(cli._parse(["compress", "m.onnx", "--bits", "3", "--gptq-damp", "0"]))


def test_tables_choices_and_help_follow_config(capsys, monkeypatch):
    line, _ = _error_line(capsys, ["compress", "m.onnx", "--bits", "3", "--tables", "magic"])
    assert "invalid choice: 'magic'" in line and all(f"'{t}'" in line for t in TABLE_SOURCES)
    assert main(["compress", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for t in TABLE_SOURCES:
        assert f"{t}: {cli.TABLES_HELP[t]}" in text
    # a source added to config without a description here is still offered and listed
    monkeypatch.setattr(cli, "TABLE_SOURCES", TABLE_SOURCES + ("brand_new",))
    assert cli._parse(["compress", "m.onnx", "--bits", "3", "--tables", "brand_new"]).tables == "brand_new"
    assert "closed form alone (for curvature files); brand_new (default: auto)" in cli._tables_help()


def test_tables_with_a_uniform_method_warns(capsys):
    cli._setup_logging(quiet=True)
    cli._recipe(cli._parse(["compress", "m.onnx", "--bits", "3", "--method", "rtn", "--tables", "proxy"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bayesq-onnx: warning: --tables does nothing with --method rtn (it plans one uniform format, "
                   "without loss tables)"]


# 6. help everywhere

def test_every_argument_has_help():
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(cli.COMMANDS)
    missing = [f"{name} {a.dest}" for name, p in [("", parser), *subparsers.choices.items()]
               for a in p._actions if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []
    assert all(not p.allow_abbrev for p in [parser, *subparsers.choices.values()])


# 7. eval: a summary on the terminal, JSON only in the file, a warning for labels that do nothing

def _perturbed(mlp_path, rename_logits=None):
    """The mlp with W1 slightly off (a stand-in for a quantized model), optionally with its logits output
    renamed so that nothing is logits-like."""
    m = models.mlp()
    for t in m.graph.initializer:
        if t.name == "W1":
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(a + 0.05 * np.random.default_rng(3).standard_normal(a.shape)
                                               .astype(np.float32), "W1"))
    ref = models.mlp()
    if rename_logits:
        for g in (m.graph, ref.graph):
            for n in g.node:
                n.output[:] = [rename_logits if o == "logits" else o for o in n.output]
            for o in g.output:
                if o.name == "logits":
                    o.name = rename_logits
        onnx.save(ref, mlp_path.parent / "ref.onnx")
        mlp_path = mlp_path.parent / "ref.onnx"
    q = mlp_path.parent / "q.onnx"
    onnx.save(m, q)
    return str(mlp_path), str(q)


@pytest.fixture
def eval_data(tmp_path):
    np.savez(tmp_path / "d.npz", **models.mlp_data(32, seed=5))
    np.save(tmp_path / "l.npy", np.arange(32) % 32)
    return str(tmp_path / "d.npz"), str(tmp_path / "l.npy")


@pytest.mark.parametrize("with_json", [True, False])
def test_eval_prints_a_summary_not_json(tmp_path, mlp_path, eval_data, capsys, with_json):
    ref, quant = _perturbed(mlp_path)
    data, labels = eval_data
    out_json = tmp_path / "m.json"
    argv = ["eval", ref, quant, "--data", data, "--labels", labels] + (["--json", str(out_json)] if with_json else [])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "{" not in out and '"' not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 3 + with_json, lines          # header, logits, aux (+ where the JSON went)
    assert lines[0].startswith(f"{quant} vs {ref}: 32 samples")
    logits_line = next(line for line in lines if line.startswith("  logits: "))
    aux_line = next(line for line in lines if line.startswith("  aux: "))
    for word in ("cosine", "max abs error", "top-1 agreement", "KL", "accuracy", "(32 labelled)"):
        assert word in logits_line, (word, logits_line)
    assert "cosine" in aux_line and "max abs error" in aux_line and "top-1" not in aux_line
    assert out_json.exists() == with_json
    if with_json:
        assert lines[-1] == f"all metrics in {out_json}"
        lo = json.loads(out_json.read_text())["outputs"]["logits"]
        assert f"cosine {lo['cosine']:.4f}" in logits_line and lo["cosine"] < 1 - 1e-4   # really perturbed
        assert f"max abs error {lo['max_abs_error']:.4g}" in logits_line
        assert f"KL {lo['kl']:.4g} nats" in logits_line
        assert (f"accuracy {100 * lo['accuracy_ref']:.1f}% -> {100 * lo['accuracy_quant']:.1f}%"
                in logits_line)


def test_eval_warns_when_labels_do_nothing(tmp_path, mlp_path, eval_data, capsys):
    ref, quant = _perturbed(mlp_path, rename_logits="scores")
    data, labels = eval_data
    assert main(["eval", ref, quant, "--data", data, "--labels", labels, "--json", str(tmp_path / "m.json")]) == 0
    out, err = capsys.readouterr()
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("bayesq-onnx: warning: the labels are ignored: "
                                                         "no output is logits-like"), warnings
    assert "accuracy" not in out and "top-1" not in out
    # without labels: no warning
    assert main(["eval", ref, quant, "--data", data]) == 0
    assert capsys.readouterr().err == ""


def test_eval_warns_when_no_label_counts(tmp_path, mlp_path, eval_data, capsys):
    ref, quant = _perturbed(mlp_path)
    data, _ = eval_data
    np.save(tmp_path / "neg.npy", -np.ones(32, np.int64))
    assert main(["eval", ref, quant, "--data", data, "--labels", str(tmp_path / "neg.npy")]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == ["bayesq-onnx: warning: the labels are ignored: none is >= 0 (negative "
                                        "labels mark positions to skip), so no accuracy is computed"]
    assert "accuracy n/a -> n/a (0 labelled)" in out
