"""torch -> ONNX export with the parameter map: every parameter is read back from its initializer(s)
exactly (identity or transposed layout), tied and merged parameters, unused and unmappable ones."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bayesq_onnx.errors import BayesQError
from bayesq_onnx.graph.model_io import load_model
from bayesq_onnx.torch_export import export, map_curvature

torch = pytest.importorskip("torch")  # the exporter is torch's


class _Net(torch.nn.Module):
    """Embedding, Linear, Conv1d, two LayerNorms, a head tied to the embedding, an unused Linear."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 24)
        self.ln1 = torch.nn.LayerNorm(24)
        self.ln2 = torch.nn.LayerNorm(24)     # fresh: the same values as ln1 (the exporter merges them)
        self.conv = torch.nn.Conv1d(24, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight    # tied
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, ids):
        h = self.ln2(self.ln1(self.lin(self.emb(ids))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    net = _Net().eval()
    path = tmp_path / "net.onnx"
    pmap = export(net, (torch.randint(0, 50, (2, 5)),), path, input_names=["ids"], output_names=["logits"],
                  dynamic_axes={"ids": {0: "b", 1: "t"}})
    model = load_model(path)   # what compress sees (Constant weights become initializers)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return net, pmap, inits, path


def test_every_parameter_reads_back_exactly(exported):
    net, pmap, inits, _ = exported
    assert set(pmap) == {n for n, _ in net.named_parameters(remove_duplicate=False)}
    for name, p in net.named_parameters(remove_duplicate=False):
        loc = pmap[name]
        assert loc.shape == tuple(p.shape)
        if name.startswith("unused."):
            assert loc.uses == ()
            continue
        assert loc.uses, name
        for use in loc.uses:
            stored = inits[use.initializer]
            back = stored.T if use.layout == "transpose" else stored
            np.testing.assert_array_equal(back, p.detach().numpy())   # the exporter copies bytes: exact


def test_layouts_of_linear_conv_embedding_and_tied(exported):
    _, pmap, inits, _ = exported
    lin = pmap["lin.weight"].uses
    assert len(lin) == 1 and lin[0].layout == "transpose" and inits[lin[0].initializer].shape == (16, 24)
    assert [u.layout for u in pmap["conv.weight"].uses] == ["identity"]
    # the tied table: read as is by the Gather, and a transposed copy for the head's MatMul
    assert pmap["emb.weight"] == pmap["head.weight"]
    assert sorted(u.layout for u in pmap["emb.weight"].uses) == ["identity", "transpose"]
    assert pmap["emb.weight"].tensor == pmap["head.weight"].tensor == "emb.weight"
    # equal-valued LayerNorm weights were merged into one initializer by the exporter
    assert pmap["ln2.weight"].uses == pmap["ln1.weight"].uses


def test_map_curvature_into_the_contract(exported):
    net, pmap, inits, _ = exported
    curv = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
            for i, (n, p) in enumerate(net.named_parameters())}
    out = map_curvature(curv, pmap)
    assert set(out) <= set(inits)
    for name, arr in out.items():
        assert arr.shape == inits[name].shape and arr.dtype == np.float32
    lin = pmap["lin.weight"].uses[0].initializer
    np.testing.assert_array_equal(out[lin], curv["lin.weight"].numpy().T)
    # merged LayerNorm weights: the sum of both parameters (float32 sum of float32 values: exact to 1 ulp)
    ln = pmap["ln1.weight"].uses[0].initializer
    np.testing.assert_allclose(out[ln], (curv["ln1.weight"] + curv["ln2.weight"]).numpy(), rtol=1e-7)
    # the tied table counts once even when both of its names are given
    both = dict(curv, **{"head.weight": curv["emb.weight"]})
    np.testing.assert_array_equal(map_curvature(both, pmap)["emb.weight"], out["emb.weight"])
    with pytest.raises(BayesQError, match="not a parameter"):
        map_curvature({"nope": np.ones(3)}, pmap)
    with pytest.raises(BayesQError, match="shape"):
        map_curvature({"lin.weight": np.ones((3, 3))}, pmap)
    with pytest.raises(BayesQError, match=">= 0"):
        map_curvature({"lin.bias": -np.ones(24)}, pmap)


def test_a_folded_parameter_is_an_error_that_names_it(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)   # BatchNorm that changes the weights when folded
    with pytest.raises(BayesQError, match=r"parameter '0.weight'.*no exported initializer"):
        export(net, (torch.randn(1, 3, 8, 8),), tmp_path / "c.onnx")
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_export_writes_a_valid_model_atomically(exported):
    _, _, _, path = exported
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["net.onnx"]
