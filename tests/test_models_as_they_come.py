"""Models as they come: float16 / bfloat16 weights, depthwise convolutions, models the checker refuses
but onnxruntime runs."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from bayesq_onnx import Analysis, Recipe, compress, make_session
from bayesq_onnx.cli import main
from bayesq_onnx.formats import Float32
from bayesq_onnx.graph.float16 import to_half
from bayesq_onnx.graph.sites import find_sites

HALF = {"mlp": (models.mlp, models.mlp_data), "embed": (models.embed, models.embed_data),
        "cnn": (models.cnn, models.cnn_data), "tied": (models.tied, models.tied_data)}
# what each lowering leaves of a float16 model: native formats only, the bayesq library, standard ops
TARGETS = {"native": {"custom_ops": False}, "bayesq": {}, "portable": {"target": "portable"}}


def _half_data(data):
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in data.items()}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor of the graph, by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]} | \
           {t.name: t.data_type for t in g.initializer}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", sorted(HALF))
def test_float16_model_stays_float16_and_is_as_accurate_as_float32(tmp_path, case, target):
    """A float16 model (weights and activations) compresses to a model whose activations are all float16
    (no float32 tensor flows between ops: the formats store scales in float16, or a Cast follows a
    float32-only op), that runs as onnxruntime computes the float16 original, as close to it as the
    float32 model's compression is to its original."""
    if target != "native":
        pytest.importorskip("bayesq_onnx.runtime.custom_ops").require()
    build, data_fn = HALF[case]
    fields = TARGETS[target]
    half, data = to_half(build(), "float16", keep_io_types=False), data_fn()
    hdata = _half_data(data)
    src = tmp_path / "half.onnx"
    onnx.save(half, src)
    rep = compress(src, Recipe(bits=4.0, **fields), calib=hdata, output=tmp_path / "q.onnx").report
    assert rep["bits_per_weight"] <= 4.0
    q = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(q, full_check=True)
    for layer in rep["layers"]:
        assert layer["format"] == "float16" or layer["format"].endswith("-f16"), layer   # fp16 scales everywhere
    types = _types(q)
    produced = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in ("Cast", "Reshape") or n.op_type.startswith("Dequantize") \
                or n.domain == "bayesq" or n.name.startswith("bq_"):
            continue   # the weights' own decoding (portable: standard ops on the packed integers)
        for i in n.input:
            if i and i in produced and types.get(i) == TensorProto.FLOAT and not produced[i].name.startswith("bq_"):
                pytest.fail(f"{n.op_type} {n.name} reads float32 tensor {i}")
    assert {v.type.tensor_type.elem_type for v in q.graph.output} == {TensorProto.FLOAT16}
    got = make_session(tmp_path / "q.onnx").run(None, hdata)[0]
    want = make_session(src).run(None, hdata)[0]
    assert got.dtype == np.float16
    err16 = _rel(got, want)
    # the same model in float32, at the same budget
    ref = compress(build(), Recipe(bits=4.0, **fields), calib=data, output=tmp_path / "q32.onnx").report
    err32 = _rel(make_session(tmp_path / "q32.onnx").run(None, data)[0], make_session(build()).run(None, data)[0])
    # fp16 scales cost half of fp32 ones, so the float16 plan may even afford more; the 1.25 allows
    # for a different plan at the same budget (these small models' errors move by ~10% between plans)
    assert err16 <= 1.25 * err32 + 1e-3, (err16, err32, [l["format"] for l in rep["layers"]],
                                           [l["format"] for l in ref["layers"]])


def test_float16_kept_weight_costs_16_bits():
    """An unquantized weight of a float16 model is kept as float16: the 16-bit candidate, pinnable by =16."""
    half = to_half(models.mlp(), "float16", keep_io_types=True)
    sites, _ = find_sites(half)
    assert {s.dtype for s in sites} == {"float16"}
    an = Analysis(half, Recipe(bits=10.0, pins=(("W1", 16),)), calib=models.mlp_data())
    assert an.candidates[next(s.name for s in sites if s.name == "W1")] == [Float32(bits=16, dtype="float16")]
    rep = an.compress(10.0).report   # W1 alone costs 16 bits per weight
    w1 = next(l for l in rep["layers"] if l["name"] == "W1")
    assert (w1["format"], w1["bits"], w1["stored_bits"]) == ("float16", 16, 16 * 128 * 128)


def test_float16_scales_are_rounded_before_the_codes():
    """Codes of a float16 model are chosen on the float16 scales the file stores: dequantizing the
    stored tensors in numpy gives the weight the plan check measured, to float16 rounding."""
    half = to_half(models.mlp(), "float16", keep_io_types=True)
    an = Analysis(half, Recipe(bits=4.0, custom_ops=False), calib=models.mlp_data())
    res = an.compress(4.0)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    node = next(n for n in res.model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "bq_W1_B")
    fmt = next(f for f in an.candidates["W1"] if f.name == next(l["format"] for l in res.report["layers"]
                                                                   if l["name"] == "W1"))
    assert inits["bq_W1_scales"].dtype == np.float16
    codes = fmt.unpack({k: inits[f"bq_W1_{k}"] for k in ("B", "scales", "zero_points")}, 128, 128)
    numpy_w = codes.dequantize()             # (N, K) = W1^T, in fp32 from the fp16 scales
    measured = an.quantizers()["W1"].dequantized(fmt)
    np.testing.assert_array_equal(numpy_w, measured)   # the same codes and the same (fp16) scales
    assert {a.i for a in node.attribute if a.name == "bits"} <= {2, 4, 8}


def _bf16_gather_model():
    """A bfloat16 embedding table read by Gather (onnxruntime runs that in bfloat16), the rows Cast to
    float for a float32 MatMul."""
    rng = np.random.default_rng(0)
    E = (rng.standard_normal((500, 64)) * 0.5).astype(ml_dtypes.bfloat16)
    W = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["e"]),
                           helper.make_node("Cast", ["e"], ["ef"], to=TensorProto.FLOAT),
                           helper.make_node("MatMul", ["ef", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12, 32])],
                          [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("custom_ops", [False, True])
def test_bfloat16_gather_is_quantized_with_a_cast(tmp_path, custom_ops):
    """Neither GatherBlockQuantized (no bfloat16 kernel on CPU: fp32 scales) nor bayesq.GatherAffine
    (float32 out) yields bfloat16: a Cast to bfloat16 (the type the graph declares) follows, so the
    rest of the graph is untouched; the output matches numpy's gather of the dequantized table rounded
    to bfloat16."""
    if custom_ops:
        pytest.importorskip("bayesq_onnx.runtime.custom_ops").require()
    m, data = _bf16_gather_model(), models.embed_data()
    rep = compress(m, Recipe(bits=4.0, custom_ops=custom_ops), calib=data, output=tmp_path / "q.onnx").report
    layers = {l["name"]: l for l in rep["layers"]}
    q = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(q, full_check=not custom_ops)   # the checker knows no custom domain
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    if custom_ops:
        from bayesq_onnx.formats import BayesqLut, BayesqScaledLut, BayesqUniform
        gather = next(n for n in q.graph.node if n.op_type in ("GatherAffine", "GatherLut"))
        bits, block = layers["E"]["bits"], layers["E"]["block_size"]
        # a GatherLut reads a codebook per row, or one scaled per row (computed from scales and levels)
        fmt = BayesqScaledLut(bits, block) if layers["E"]["format"].startswith("bq-nf") else \
            (BayesqLut if gather.op_type == "GatherLut" else BayesqUniform)(bits, block, "float16")
        assert fmt.name == layers["E"]["format"]
        packed = {k[len("bq_E_"):]: v for k, v in inits.items() if k.startswith("bq_E_")}
    else:
        from bayesq_onnx.formats import GatherBlockQuantized
        assert layers["E"]["format"].startswith("gbq-") and not layers["E"]["format"].endswith("-f16")
        gather = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
        fmt = GatherBlockQuantized(layers["E"]["bits"], layers["E"]["block_size"])
        packed = {"data": inits["bq_E_data"], "scales": inits["bq_E_scales"], "zero_points": inits["bq_E_zero_points"]}
    cast = next(n for n in q.graph.node if n.op_type == "Cast" and n.input[0] == gather.output[0])
    assert cast.output[0] == "e" and cast.attribute[0].i == TensorProto.BFLOAT16
    table = fmt.unpack(packed, 500, 64).dequantize()
    rows = table.astype(ml_dtypes.bfloat16).astype(np.float32)[data["ids"]]
    W = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "W")
    if layers["W"]["format"] != "float32":   # the MatMul's weight as stored
        W = Analysis(m, Recipe(bits=4.0, custom_ops=custom_ops), calib=data).quantizers()["W"].dequantized(
            next(f for f in Analysis(m, Recipe(bits=4.0, custom_ops=custom_ops), calib=data).candidates["W"]
                 if f.name == layers["W"]["format"])).T
    got = make_session(tmp_path / "q.onnx").run(None, data)[0]
    # float32 matmul of the same operands: summation order only
    np.testing.assert_allclose(got, rows @ W, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_bfloat16_compute_onnxruntime_cannot_run_is_one_line(tmp_path, capsys, case):
    build, data_fn = HALF[case]
    src = tmp_path / "bf16.onnx"
    onnx.save(to_half(build(), "bfloat16", keep_io_types=True), src)
    assert main(["compress", str(src), "--bits", "4", "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime cannot run the model" in err[0] and "bfloat16" in err[0], err
    assert not (tmp_path / "q.onnx").exists()


def test_bfloat16_graph_input_is_one_line(tmp_path, capsys):
    src = tmp_path / "bf16io.onnx"
    onnx.save(to_half(models.mlp(), "bfloat16", keep_io_types=False), src)
    assert main(["compress", str(src), "--bits", "4", "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "graph input 'x' is bfloat16" in err[0], err


def _depthwise(C=32, mult=1):
    """3-channel stem (3 input channels: too few to block along), a depthwise 3x3 (group = C, with
    ``mult`` output channels per input channel) whose channels have very different ranges, a 1x1."""
    rng = np.random.default_rng(0)
    inits = {"C0": (rng.standard_normal((C, 3, 3, 3)) / 5).astype(np.float32),
             "DW": (rng.standard_normal((C * mult, 1, 3, 3)) * rng.uniform(0.05, 2, (C * mult, 1, 1, 1))
                    / 3).astype(np.float32),
             "PW": (rng.standard_normal((C, C * mult, 1, 1)) / 6).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "C0"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "DW"], ["d"], pads=[1, 1, 1, 1], group=C),
             helper.make_node("Relu", ["d"], ["rd"]),
             helper.make_node("Conv", ["rd", "PW"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C, 8, 8])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    data = {"x": np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    return m, data


def _numpy_rtn(w: np.ndarray, bits: int):
    """Min/max (zero included) affine grid and round to nearest, one group per row."""
    lo, hi = np.minimum(w.min(1, keepdims=True), 0), np.maximum(w.max(1, keepdims=True), 0)
    scale = (hi - lo) / (2**bits - 1)
    zp = np.clip(np.round(-lo / scale), 0, 2**bits - 1)
    return np.clip(np.round(w / scale) + zp, 0, 2**bits - 1), scale, zp


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_is_quantized_per_output_channel(tmp_path, mult):
    """A depthwise Conv's weight (C, 1, 3, 3) gets one group per output channel (its 9 taps), stored
    by DequantizeLinear on the (C, 9) view plus a Reshape: the stored codes and scales are numpy's
    per-channel min/max RTN, and the model runs numpy's dequantized weights (13 bits: room for 8-bit
    codes with a float32 scale per 9 weights)."""
    m, data = _depthwise(mult=mult)
    rep = compress(m, Recipe(bits=13.0, method="rtn", custom_ops=False, min_elements=64), calib=data,
                   output=tmp_path / "q.onnx").report
    layers = {l["name"]: l for l in rep["layers"]}
    assert not rep["skipped"], rep["skipped"]
    assert (layers["DW"]["format"], layers["DW"]["block_size"]) == ("dq-uint8-g9", 9)
    assert layers["C0"]["format"].startswith("dq-uint8")   # 3 input channels: quantized, no longer skipped
    q = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "bq_DW_x")
    W = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "DW")
    codes, scale, zp = _numpy_rtn(W.reshape(len(W), 9), 8)
    # scales: fp32 arithmetic in a different order (1 ulp); codes: a tie may round either way
    np.testing.assert_allclose(inits["bq_DW_x_scale"], scale, rtol=1e-6)
    assert np.abs(inits["bq_DW_x"].astype(int) - codes).max() <= 1
    np.testing.assert_array_equal(inits["bq_DW_x_zero_point"], zp)
    assert [a.i for a in dq.attribute if a.name == "block_size"] == [9]
    # every Conv weight dequantized by numpy from the stored tensors, in the original graph
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    for t in ref.graph.initializer:
        node = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"bq_{t.name}_x")
        attrs = {a.name: a.i for a in node.attribute}
        x, sc, z = (inits[i] for i in node.input)
        rep_ = lambda v: np.repeat(v, attrs["block_size"], axis=attrs["axis"]).take(
            range(x.shape[attrs["axis"]]), axis=attrs["axis"])
        w = (x.astype(np.float32) - rep_(z).astype(np.float32)) * rep_(sc)
        t.CopyFrom(numpy_helper.from_array(w.reshape(tuple(t.dims)), t.name))
    got = make_session(tmp_path / "q.onnx").run(None, data)[0]
    # the same float32 weights; only the convolution algorithm (prepacked or not) may differ
    np.testing.assert_allclose(got, make_session(ref).run(None, data)[0], rtol=1e-5, atol=1e-5)
    assert _rel(got, make_session(m).run(None, data)[0]) < 0.02   # 8-bit codes: well under 1% per layer


def test_depthwise_curvature_is_each_channels_energy():
    """The activation curvature of a depthwise weight is, for every tap of output channel o, the
    energy of the one input channel o reads (o // mult), as numpy computes it from the Conv's input."""
    m, data = _depthwise(mult=2)
    an = Analysis(m, Recipe(bits=4.0, min_elements=64), calib=data)
    probe = m.__class__()
    probe.CopyFrom(m)
    probe.graph.output.append(onnx.ValueInfoProto(name="r"))
    r = make_session(probe).run(["r"], {k: v[:len(v) - len(v) // 4] for k, v in data.items()})[0]
    energy = np.square(r.astype(np.float64)).sum(axis=(0, 2, 3))            # (C,)
    site = next(s for s in an.sites if s.name == "DW")
    from bayesq_onnx.calib.capture import capture_stats
    from bayesq_onnx.curvature.activation import ActivationCurvature
    h = ActivationCurvature(capture_stats(an.probe, an.sites, an.fit, an.batch), 1.0).diagonal(site)
    assert h.shape == (64, 9) and site.flat
    want = np.repeat(energy, 2)[:, None] * np.ones((1, 9))
    # equal up to the factor 2 * evidence / n; the activations come from differently batched runs
    # of the stem conv (float32 rounding, ~1e-7 relative)
    np.testing.assert_allclose(h / h[0, 0], want / want[0, 0], rtol=1e-6)


def test_depthwise_runs_in_every_lowering(tmp_path):
    """Depthwise and stem convs in bayesq formats (DequantizeAffine on the view, ort-cpu) and rebuilt
    with standard ops (portable) compute the same weights."""
    pytest.importorskip("bayesq_onnx.runtime.custom_ops").require()
    m, data = _depthwise()
    outs = {}
    for target in ("ort-cpu", "portable"):
        rep = compress(m, Recipe(bits=6.0, target=target, min_elements=64, conv_bits=()), calib=data,
                       output=tmp_path / f"{target}.onnx").report
        assert {l["name"] for l in rep["layers"] if l["format"].startswith("bq-")} >= {"DW", "C0"}, rep["layers"]
        outs[target] = make_session(tmp_path / f"{target}.onnx").run(None, data)[0]
    np.testing.assert_allclose(outs["ort-cpu"], outs["portable"], rtol=1e-4, atol=1e-5)   # summation order only


def test_checker_refusal_onnxruntime_runs_is_a_warning(tmp_path, capsys):
    """Graph outputs without a type: onnx.checker refuses the model, onnxruntime runs it; compress warns
    and goes on."""
    m = models.mlp()
    del m.graph.output[:]
    m.graph.output.extend([onnx.ValueInfoProto(name="logits"), onnx.ValueInfoProto(name="aux")])
    src = tmp_path / "untyped.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "c.npz", **models.mlp_data())
    assert main(["compress", str(src), "--bits", "4", "--calib", str(tmp_path / "c.npz"),
                 "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "fails onnx.checker (Field 'type'" in err and "onnxruntime loads it" in err, err
    got = make_session(tmp_path / "q.onnx").run(None, models.mlp_data())
    assert [g.shape for g in got] == [(64, 32), (64, 8)]


def test_checker_and_onnxruntime_both_refuse_is_one_line(tmp_path, capsys):
    m = models.mlp()
    m.graph.node.append(helper.make_node("Relu", ["nowhere"], ["z"]))
    src = tmp_path / "broken.onnx"
    onnx.save(m, src)
    assert main(["compress", str(src), "--bits", "4", "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fails onnx.checker" in err[0] and "onnxruntime cannot load it either" in err[0], err
