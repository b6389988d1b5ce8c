"""Bad input: exit code 2, exactly one line on stderr, no traceback, nothing left behind."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from bayesq_onnx.cli import main




def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _expect_bad(capsys, argv, needle, outdir):
    before = sorted(outdir.iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("bayesq-onnx: error:"), err
    assert needle in err[0], err[0]
    assert sorted(outdir.iterdir()) == before, "a failure left files behind"


def _nan_model(tmp_path):
    m = models.mlp()
    for t in m.graph.initializer:
        if t.name == "W1":
            a = numpy_helper.to_array(t).copy()
            a[3, 4] = np.nan
            t.CopyFrom(numpy_helper.from_array(a, "W1"))
    p = tmp_path / "nan.onnx"
    onnx.save(m, p)
    return str(p)


def _no_weights_model(tmp_path):
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    p = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(g), p)
    return str(p)


def _unsupported_op_model(tmp_path):
    m = models.mlp()
    m.graph.node.append(onnx.helper.make_node("FancyOp", ["logits"], ["z"], domain="nowhere.custom"))
    m.opset_import.append(onnx.helper.make_opsetid("nowhere.custom", 1))
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    return str(p)


BAD = {
    "missing model": (lambda t, m: ["compress", str(t / "nope.onnx"), "--bits", "3"], "model not found"),
    "corrupt model": (lambda t, m: ["compress", str((t / "bad.onnx").write_bytes(b"\x00garbage") and t / "bad.onnx"),
                                    "--bits", "3"], "cannot read"),
    "budget too low": (lambda t, m: ["compress", str(m), "--bits", "1.0"], "cannot be met"),
    "negative budget": (lambda t, m: ["compress", str(m), "--bits", "-1"], "positive"),
    "unknown method": (lambda t, m: ["compress", str(m), "--bits", "3", "--method", "magic"], "unknown method"),
    "unknown target": (lambda t, m: ["compress", str(m), "--bits", "3", "--target", "fpga"], "unknown target"),
    "calib wrong key": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                      _npz(t / "c.npz", y=np.zeros((4, 64), np.float32))], "keys do not match"),
    "calib wrong dtype": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                       _npz(t / "c.npz", x=np.zeros((4, 64), np.float64))], "dtype float64"),
    "calib wrong shape": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                        _npz(t / "c.npz", x=np.zeros((4, 63), np.float32))], "shape"),
    "calib NaN": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                _npz(t / "c.npz", x=np.full((4, 64), np.nan, np.float32))], "NaN"),
    "calib missing": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib", str(t / "none.npz")], "not found"),
    "calib corrupt": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                    str((t / "c.npz").write_bytes(b"zip?") and t / "c.npz")], "cannot read"),
    "NaN weights": (lambda t, m: ["compress", _nan_model(t), "--bits", "3"], "NaN or Inf"),
    "no weights": (lambda t, m: ["compress", _no_weights_model(t), "--bits", "3"], "no quantizable"),
    "unsupported op": (lambda t, m: ["compress", _unsupported_op_model(t), "--bits", "3"], "onnxruntime cannot run"),
    "curvature missing key": (lambda t, m: ["compress", str(m), "--bits", "3", "--curvature",
                                            _npz(t / "k.npz", W0=np.ones((64, 128), np.float32))], "no entry"),
    "curvature negative": (lambda t, m: ["compress", str(m), "--bits", "3", "--curvature", _npz(
        t / "k.npz", W0=-np.ones((64, 128)), W1=np.ones((128, 128)), W2T=np.ones((64, 128)), W3=np.ones((64, 32)))],
        ">= 0"),
    "calib not npz": (lambda t, m: ["compress", str(m), "--bits", "3", "--calib",
                                    str(np.save(t / "c.npy", np.zeros((4, 64), np.float32)) or t / "c.npy")],
                      "not an .npz"),
    "output is a directory": (lambda t, m: ["compress", str(m), "--bits", "3", "-o",
                                            str((t / "d.onnx").mkdir() or t / "d.onnx")], "cannot write"),
    "output is input": (lambda t, m: ["compress", str(m), "--bits", "3", "-o", str(m)], "output path"),
    "bad option": (lambda t, m: ["compress", str(m), "--bits", "three"], "invalid float"),
    "sparse not a pattern": (lambda t, m: ["compress", str(m), "--bits", "3", "--sparse", "2-4"], "KEEP:OF"),
    "sparse keeps all": (lambda t, m: ["compress", str(m), "--bits", "3", "--sparse", "4:4"], "keep < of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_2_one_line(tmp_path, capsys, mlp_path, case):
    argv_fn, needle = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = argv_fn(work, mlp_path)
    if "-o" not in argv:
        argv += ["-o", str(mlp_path.parent / "out.onnx")]
    _expect_bad(capsys, argv, needle, mlp_path.parent)


def test_console_entry_point_bad_input(tmp_path):
    """Through a real process: one line on stderr, exit 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "bayesq_onnx", "compress", str(tmp_path / "x.onnx"), "--bits", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_eval_reports_metrics(tmp_path, mlp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["compress", str(mlp_path), "--bits", "4.5", "-o", str(out), "--quiet",
                 "--calib", _npz(tmp_path / "c.npz", **models.mlp_data())]) == 0
    data = _npz(tmp_path / "d.npz", **models.mlp_data(32, seed=5))
    labels = tmp_path / "l.npy"
    np.save(labels, np.arange(32) % 32)
    assert main(["eval", str(mlp_path), str(out), "--data", data, "--labels", str(labels),
                 "--json", str(tmp_path / "m.json")]) == 0
    import json
    m = json.loads((tmp_path / "m.json").read_text())
    logits = m["outputs"]["logits"]
    # 4.5 bits keeps the logits close (0.974 measured); a broken lowering lands far below 0.9.
    # The 1e-6 above 1 allows float rounding of a perfect cosine.
    assert 0.9 < logits["cosine"] <= 1.0 + 1e-6
    assert 0 <= logits["top1_agreement"] <= 1 and logits["kl"] >= 0


# ----------------------------------------------------------------------------- compress selection and recipes

def _write(path, text):
    path.write_text(text)
    return str(path)


SELECT_BAD = {
    "exclude matches nothing": (["--exclude", "nothing*"], "--exclude 'nothing*' matches no initializer or node name"),
    "include matches nothing": (["--include", "W9"], "--include 'W9' matches no initializer or node name"),
    "pin without bits": (["--pin", "W1"], "--pin expects NAME_PATTERN=BITS"),
    "pin with bad bits": (["--pin", "W1=eight"], "--pin expects NAME_PATTERN=BITS"),
    "pin no format": (["--pin", "W1=7"], "no format for W1 (MatMul) has 7 code bits"),
    "pin matches nothing": (["--pin", "nothing*=4"], "--pin 'nothing*' matches no weight that is quantized"),
    "pin on an excluded weight": (["--exclude", "W1", "--pin", "W1=8"], "--pin 'W1' matches no weight"),
    "threads zero": (["--threads", "0"], "--threads must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(SELECT_BAD))
def test_selection_errors(tmp_path, capsys, mlp_path, case):
    extra, needle = SELECT_BAD[case]
    _expect_bad(capsys, ["compress", str(mlp_path), "--bits", "6", "-o", str(mlp_path.parent / "o.onnx"), *extra],
                needle, mlp_path.parent)


RECIPE_BAD = {
    "missing": (None, "recipe file not found"),
    "not json": ("{bits: 3", "cannot read recipe file"),
    "not an object": ("[3.0]", "holds no recipe"),
    "unknown field": ('{"bits": 3, "colour": "red"}', "unknown recipe fields: ['colour']"),
    "no bits": ('{"method": "rtn"}', "the recipe has no 'bits'"),
    "bad pin": ('{"bits": 3, "pins": [["W1"]]}', "a pin is (name pattern, code bits >= 1)"),
    "bad method in a report": ('{"recipe": {"bits": 3, "method": "magic"}}', "unknown method"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_BAD))
def test_recipe_file_errors(tmp_path, capsys, mlp_path, case):
    text, needle = RECIPE_BAD[case]
    path = tmp_path / "recipe.json"
    if text is not None:
        path.write_text(text)
    _expect_bad(capsys, ["compress", str(mlp_path), "--recipe", str(path), "-o", str(mlp_path.parent / "o.onnx")],
                needle, mlp_path.parent)


# ----------------------------------------------------------------------------- export

NET = """
import torch

def make():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

def broken():
    return 1 / 0

def not_a_module():
    return 42
"""


def _export_case(t, *args, source="net.py:make"):
    _write(t / "net.py", NET)
    src = source if source.startswith("/") or ":" not in source else f"{t / source.split(':')[0]}:{source.split(':')[1]}"
    return ["export", src, "-o", str(t / "out" / "m.onnx"), *args]


EXPORT_BAD = {
    "not a source": (lambda t: ["export", "model", "-o", str(t / "out" / "m.onnx")], "neither FILE.py:FACTORY"),
    "file missing": (lambda t: ["export", f"{t / 'none.py'}:make", "--input", "x:1x8", "-o", str(t / "o.onnx")],
                     "module file not found"),
    "no factory": (lambda t: _export_case(t, "--input", "x:1x8", source="net.py:build"), "has no function 'build'"),
    "factory raises": (lambda t: _export_case(t, "--input", "x:1x8", source="net.py:broken"),
                       "ZeroDivisionError: division by zero"),
    "not a module": (lambda t: _export_case(t, "--input", "x:1x8", source="net.py:not_a_module"),
                     "returned int, not a torch.nn.Module"),
    "no inputs": (lambda t: _export_case(t), "needs its example inputs"),
    "bad input spec": (lambda t: _export_case(t, "--input", "x:1by8"), "--input expects NAME:SHAPE[:DTYPE]"),
    "bad dtype": (lambda t: _export_case(t, "--input", "x:1x8:complex64"), "dtype 'complex64' is not one of"),
    "wrong input shape": (lambda t: _export_case(t, "--input", "x:1x9"), "fails on the example inputs"),
    "output names": (lambda t: _export_case(t, "--input", "x:1x8", "--output-names", "a,b"),
                     "2 output names given, the model returns 1"),
    "not a transformers dir": (lambda t: ["export", str(t), "-o", str(t / "out" / "m.onnx")],
                               "not a transformers model directory"),
    "calib without compress": (lambda t: _export_case(t, "--input", "x:1x8", "--calib", "c.npz"),
                               "--calib does nothing without --compress-bits"),
    "negative compress bits": (lambda t: _export_case(t, "--input", "x:1x8", "--compress-bits", "-1"),
                               "--compress-bits must be positive"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_BAD))
def test_export_errors(tmp_path, capsys, case):
    pytest.importorskip("torch")
    argv_fn, needle = EXPORT_BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    _expect_bad(capsys, argv_fn(work), needle, work)


def test_export_without_torch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch now fails as if it were not installed
    _write(tmp_path / "net.py", NET)
    _expect_bad(capsys, ["export", f"{tmp_path / 'net.py'}:make", "--input", "x:1x8", "-o", str(tmp_path / "m.onnx")],
                "the export command needs the Python package 'torch'", tmp_path)


# ----------------------------------------------------------------------------- calib

def _image_model(t, dynamic=False):
    hw = ["h", "w"] if dynamic else [8, 8]
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["img"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("img", onnx.TensorProto.FLOAT, ["n", 3, *hw])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, *hw])])
    p = t / ("dyn.onnx" if dynamic else "img.onnx")
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), p)
    return str(p)


def _images(t, garbage=False):
    from PIL import Image
    d = t / "images"
    d.mkdir(exist_ok=True)
    if garbage:
        (d / "broken.png").write_bytes(b"not a png")
    else:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(d / "a.png")
    return str(d)


def _tokenizer(t, vocab_size=10):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(t / "tokenizer.json"))
    return str(t / "tokenizer.json")


def _embed_model(t):
    p = t / "embed.onnx"
    onnx.save(models.embed(vocab=500), p)
    return str(p)


CALIB_BAD = {
    "text without tokenizer": (lambda t, m: ["--text", _write(t / "x.txt", "a\n")], "--text needs --tokenizer",
                               _embed_model),
    "text missing": (lambda t, m: ["--text", str(t / "none.txt"), "--tokenizer", _tokenizer(t)], "text file not found",
                     _embed_model),
    "text empty": (lambda t, m: ["--text", _write(t / "x.txt", "\n \n"), "--tokenizer", _tokenizer(t)],
                   "has no non-empty lines", _embed_model),
    "tokenizer corrupt": (lambda t, m: ["--text", _write(t / "x.txt", "w1\n"), "--tokenizer",
                                        _write(t / "tok.json", "{}")], "cannot read tokenizer", _embed_model),
    "text for a float model": (lambda t, m: ["--text", _write(t / "x.txt", "w1\n"), "--tokenizer", _tokenizer(t)],
                               "text calibration fills integer inputs only"),
    "tokenizer too big": (lambda t, m: ["--text", _write(t / "x.txt", "w1 w999\n"), "--tokenizer",
                                        _tokenizer(t, 1000)], "the model's embedding has 500 rows", _embed_model),
    "fixed sequence": (lambda t, m: ["--text", _write(t / "x.txt", "w1\n"), "--tokenizer", _tokenizer(t),
                                     "--seq-len", "5"], "fixed at 12", _embed_model),
    "images for a matrix model": (lambda t, m: ["--images", _images(t)], "needs a model with one float input of shape"),
    "no images": (lambda t, m: ["--images", str((t / "e").mkdir() or t / "e")], "holds no images", _image_model),
    "broken image": (lambda t, m: ["--images", _images(t, garbage=True)], "cannot read image", _image_model),
    "bad size": (lambda t, m: ["--images", _images(t), "--size", "big"], "--size expects HxW", _image_model),
    "size against a fixed model": (lambda t, m: ["--images", _images(t), "--size", "4x4"], "fixed at 8x8",
                                   _image_model),
    "dynamic size not given": (lambda t, m: ["--images", _images(t)], "give --size HxW",
                               lambda t: _image_model(t, dynamic=True)),
    "mean count": (lambda t, m: ["--images", _images(t), "--mean", "0.1,0.2"], "--mean has 2 values", _image_model),
    "std zero": (lambda t, m: ["--images", _images(t), "--std", "0"], "--std must be positive", _image_model),
    "mean not numbers": (lambda t, m: ["--images", _images(t), "--mean", "a,b,c"], "--mean expects numbers",
                         _image_model),
    "option for another source": (lambda t, m: ["--random", "--seq-len", "4"], "--seq-len only applies to --text"),
    "samples zero": (lambda t, m: ["--random", "--samples", "0"], "--samples must be >= 1"),
    "output is the model": (lambda t, m: ["--random", "-o", m], "the output path is the input model"),
    "no source": (lambda t, m: [], "one of the arguments --text --images --random is required"),
}


@pytest.mark.parametrize("case", sorted(CALIB_BAD))
def test_calib_errors(tmp_path, capsys, mlp_path, case):
    pytest.importorskip("PIL")
    argv_fn, needle, *model_fn = CALIB_BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    model = model_fn[0](work) if model_fn else str(mlp_path)
    extra = argv_fn(work, model)
    out = [] if "-o" in extra else ["-o", str(work / "out" / "c.npz")]
    before = sorted(work.iterdir())
    code = main(["calib", model, *extra, *out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bayesq-onnx: error:"), err
    assert needle in err[0], err[0]
    assert sorted(work.iterdir()) == before, "a failure left files behind"


def test_missing_onnxruntime_says_which_extra_to_install(mlp_path, tmp_path):
    # onnxruntime comes with the `cpu` or `gpu` extra; without either, one line and exit 2
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from bayesq_onnx.cli import main\n"
            f"sys.exit(main(['compress', {str(mlp_path)!r}, '--bits', '4', '-o', {str(tmp_path / 'o.onnx')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "onnxruntime is not installed" in err[0] and "`cpu` extra" in err[0], err[0]
    assert not (tmp_path / "o.onnx").exists()
