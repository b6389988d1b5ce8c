"""What the command line says: usage errors named once and per subcommand, --version, no
abbreviations, unknown flags named, --tables, help for every option."""
from __future__ import annotations

import argparse
from importlib import metadata

import onnx
import pytest

import models
from bayesq_onnx import cli
from bayesq_onnx.cli import main
from bayesq_onnx.config import TABLE_SOURCES


@pytest.fixture
def mlp_path(tmp_path):
    p = tmp_path / "in" / "mlp.onnx"
    p.parent.mkdir()
    onnx.save(models.mlp(), p)
    return p


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
    for command in ("compress", "eval", "curvature", "demo"):
        assert command in out
        assert command in line
    assert "command is required" in line


@pytest.mark.parametrize("argv, want", [
    (["compress", "m.onnx"], "bayesq-onnx: error: compress: the following arguments are required: --bits"),
    (["eval", "a.onnx", "b.onnx"], "bayesq-onnx: error: eval: the following arguments are required: --data"),
    (["curvature", "m.onnx", "-o", "c.npz"],
     "bayesq-onnx: error: curvature: the following arguments are required: --calib"),
    (["compress", "m.onnx", "--bits", "three"], "bayesq-onnx: error: compress: argument --bits: invalid float "
                                                "value: 'three'"),
    (["nonsense"], "bayesq-onnx: error: argument COMMAND: invalid choice: 'nonsense' (choose from 'compress', "
                   "'eval', 'curvature', 'demo')"),
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
