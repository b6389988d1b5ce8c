"""A new user's session, as README's walk-through runs it: export a torch module -> build calibration
data -> compress with an exclusion and a pin -> HTML report -> inspect -> eval; and the other
sources of export and calib."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx.cli import main
from bayesq_onnx.config import Recipe

NET = textwrap.dedent("""
    import torch


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 128)
            self.fc2 = torch.nn.Linear(128, 128)
            self.head = torch.nn.Linear(128, 10)

        def forward(self, x):
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


    def make():
        torch.manual_seed(0)
        return Net()
""")


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_readme_walkthrough(tmp_path, capsys):
    pytest.importorskip("torch")
    (tmp_path / "net.py").write_text(NET)
    net, calib, out, report, html = (tmp_path / n for n in ("net.onnx", "calib.npz", "net.bq.onnx", "report.json",
                                                             "report.html"))

    # 1. export: the model, and the parameter map beside it
    assert main(["export", f"{tmp_path / 'net.py'}:make", "--input", "x:1x64", "-o", str(net), "--quiet"]) == 0
    pmap = json.loads((tmp_path / "net.params.json").read_text())
    assert set(pmap) == {f"{m}.{p}" for m in ("fc1", "fc2", "head") for p in ("weight", "bias")}
    inits = _inits(net)
    for name, entry in pmap.items():   # every parameter is where the map says, in the layout it says
        (use,) = entry["initializers"]
        stored = inits[use["name"]]
        assert list((stored.T if use["layout"] == "transpose" else stored).shape) == entry["shape"]

    # 2. calibration data, checked against the model
    assert main(["calib", str(net), "--random", "--samples", "48", "-o", str(calib)]) == 0
    with np.load(calib) as z:
        assert z.files == ["x"] and z["x"].shape == (48, 64) and z["x"].dtype == np.float32

    # 3. compress: the head stays fp32, fc1 pinned to 8 bits
    assert main(["compress", str(net), "--bits", "5", "--calib", str(calib), "--exclude", "head.*",
                 "--pin", "fc1.weight=8", "-o", str(out), "--report", str(report), "--html", str(html),
                 "--quiet"]) == 0
    rep = json.loads(report.read_text())
    assert {"name": "head.weight", "reason": "excluded by --exclude head.*"} in rep["skipped"]
    layers = {l["name"]: l for l in rep["layers"]}
    assert set(layers) == {"fc1.weight", "fc2.weight"} and layers["fc1.weight"]["bits"] == 8
    assert layers["fc2.weight"]["bits"] < 8   # the pin is not the budget: fc2 pays for it
    np.testing.assert_array_equal(_inits(out)["head.weight"], inits["head.weight"])   # untouched, fp32

    # 4. the HTML report: one page naming every weight, the excluded head among the skipped
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Skipped weights</h2>" in page
    assert all(name in page for name in ("fc1.weight", "fc2.weight", "excluded by --exclude head.*"))

    # 5. inspect: what the file stores, read from its graph, is what the report says
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # (inspect names a weight as its packed tensors do: "." written "_")
    assert {e["name"]: (e["bits"], 8 * e["bytes"]) for e in info["quantized"]} == \
        {k.replace(".", "_"): (l["bits"], l["stored_bits"]) for k, l in layers.items()}
    assert [f["name"] for f in info["float_weights"]] == ["head.weight"]
    assert info["file_bytes"] == rep["output_bytes"]
    assert main(["inspect", str(out)]) == 0
    assert "2 quantized weights" in capsys.readouterr().out

    # 6. eval against the original
    assert main(["eval", str(net), str(out), "--data", str(calib), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["outputs"]["output"]["cosine"] > 0.95

    # the report's recipe replays the run byte for byte
    again = tmp_path / "again.onnx"
    assert main(["compress", str(net), "--recipe", str(report), "--calib", str(calib), "-o", str(again),
                 "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()
    capsys.readouterr()


def test_export_then_compress_in_one_command(tmp_path, capsys):
    pytest.importorskip("torch")
    (tmp_path / "net.py").write_text(NET)
    net = tmp_path / "net.onnx"
    assert main(["export", f"{tmp_path / 'net.py'}:make", "--input", "x:4x64", "-o", str(net),
                 "--compress-bits", "4", "--quiet"]) == 0
    rep = json.loads((tmp_path / "net.bq.json").read_text())
    assert rep["budget"] == 4.0 and rep["bits_per_weight"] <= 4.0 and (tmp_path / "net.bq.onnx").exists()
    assert "net.bq.onnx" in capsys.readouterr().out


def _tokenizer(path, words):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return vocab


def test_transformers_directory_and_text_calibration(tmp_path, capsys):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32, num_labels=3,
                                  architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "bert"))
    words = "the a cat dog sat on mat ran far away and then slept".split()
    vocab = _tokenizer(tmp_path / "bert" / "tokenizer.json", words)
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n\nthe dog ran far away\nand then slept zebra\n" * 8)

    net, calib = tmp_path / "bert.onnx", tmp_path / "calib.npz"
    assert main(["export", str(tmp_path / "bert"), "-o", str(net), "--quiet"]) == 0
    m = onnx.load(str(net))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert main(["calib", str(net), "--text", str(tmp_path / "text.txt"), "--tokenizer",
                 str(tmp_path / "bert" / "tokenizer.json"), "--seq-len", "10", "--samples", "20",
                 "-o", str(calib)]) == 0
    with np.load(calib) as z:
        ids, mask = z["input_ids"], z["attention_mask"]
    assert ids.shape == mask.shape == (20, 10) and ids.dtype == np.int64
    first = [vocab[w] for w in "the cat sat on the mat".split()]
    assert ids[0].tolist() == first + [0] * 4 and mask[0].tolist() == [1] * 6 + [0] * 4
    assert ids[2].tolist()[:4] == [vocab["and"], vocab["then"], vocab["slept"], 1]   # unknown word: [UNK]
    # the sequence axis is dynamic: a length other than the export's runs
    assert main(["compress", str(net), "--bits", "4", "--calib", str(calib), "--exclude", "classifier*",
                 "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 0
    capsys.readouterr()


def _image_model(path, h=8, w=8):
    """One (n, 3, h, w) float input passed through: the calib command only reads the input spec."""
    g = helper.make_graph([helper.make_node("Identity", ["img"], ["y"])], "g",
                          [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, h, w])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_image_calibration_resizes_and_normalises(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    colours = [(255, 0, 0), (0, 128, 255), (10, 20, 30)]
    for i, c in enumerate(colours):   # solid colours: any resize keeps the values
        image.new("RGB", (20, 12), c).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "c.npz"
    assert main(["calib", str(_image_model(tmp_path / "m.onnx")), "--images", str(folder), "--mean", "0.5",
                 "--std", "0.5,0.25,0.5", "-o", str(out), "--crop"]) == 0
    with np.load(out) as z:
        x = z["img"]
    assert x.shape == (3, 3, 8, 8) and x.dtype == np.float32
    want = (np.array(colours, np.float32) / 255 - 0.5) / np.array([0.5, 0.25, 0.5], np.float32)
    np.testing.assert_allclose(x[:, :, 4, 4], want, atol=1e-6)
    np.testing.assert_allclose(x.std(axis=(2, 3)), 0, atol=1e-6)
    capsys.readouterr()


def test_threads_do_not_change_the_output(tmp_path, mlp_path, capsys):
    outs = []
    for n in ("1", "3"):
        outs.append(tmp_path / f"t{n}.onnx")
        assert main(["compress", str(mlp_path), "--bits", "4", "--threads", n, "-o", str(outs[-1]), "--quiet"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    capsys.readouterr()


def test_include_and_pins_reach_the_plan(tmp_path, mlp_path, capsys):
    np.savez(tmp_path / "c.npz", **models.mlp_data())
    rep = tmp_path / "r.json"
    # W1 is read by two MatMul nodes; W2T through a Transpose; patterns see initializer and node names
    assert main(["compress", str(mlp_path), "--bits", "7", "--calib", str(tmp_path / "c.npz"), "--include", "W[12]*",
                 "--pin", "W2*=2", "--pin", "W*=8", "-o", str(tmp_path / "q.onnx"), "--report", str(rep),
                 "--quiet"]) == 0
    r = json.loads(rep.read_text())
    assert {l["name"]: l["bits"] for l in r["layers"]} == {"W1": 8, "W2T": 2}   # the first matching pin wins
    reasons = {s["name"]: s["reason"] for s in r["skipped"]}
    assert reasons["W0"] == reasons["W3"] == "not matched by --include W[12]*"
    assert Recipe.from_dict(r["recipe"]).pins == (("W2*", 2), ("W*", 8))
    capsys.readouterr()


def test_recipe_file_and_command_line_combine(tmp_path):
    from bayesq_onnx import cli
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(Recipe(bits=3.0, method="gptq", exclude=("a*",), pins=(("b", 4),)).to_dict()))
    r = cli._recipe(cli._parse(["compress", "m.onnx", "--recipe", str(path), "--bits", "4", "--exclude", "c"]))
    assert (r.bits, r.method, r.exclude, r.pins) == (4.0, "gptq", ("c",), (("b", 4),))
