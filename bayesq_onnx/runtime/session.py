"""onnxruntime sessions for the models we read and write."""
from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from ..errors import BayesQError
from ..graph import model_io
from ..graph.cone import all_nodes
from . import custom_ops

DEFAULT_PROVIDERS = ["CPUExecutionProvider"]


def session_options(**entries) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # onnxruntime's warnings are not ours to show users
    # keep DequantizeLinear->MatMul exact: without this ORT fuses it into int8-activation MatMulNBits
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for k, v in entries.items():
        so.add_session_config_entry(k, str(v))
    custom_ops.register(so)  # bayesq ops, when the library was built (custom_ops.py)
    return so


UNPACK = ("auto", "never", "always")

# ---- the unpack rule ------------------------------------------------------------------------------
# A packed bayesq MatMul decodes its weight on every call; unpacked at load (fp32 MatMul on the
# dequantized weight) it runs at onnxruntime's fp32 speed and holds fp32 memory.  `auto` unpacks a
# weight when the packed op was measured slower than fp32 by more than SLOWER_LIMIT at some M.  M (rows
# per call) is not known at load time, so the rule takes the worst measured M: it only knows the
# kernels in use (the ISA) and the weight's size (K x N, to the nearest measured one in log scale).
# Measured with tools/bench_kernels.py --threads 1 --clock cpu --stat min --reps 5 --ms 1,2,4,8,16,64 --only
# bq-lut3,bq-u3-g32,bq-u4-g32 (BAYESQ_ISA forcing each set), onnxruntime 1.32, one thread of a shared
# 2-core Zen 4 EPYC (AVX-512; AVX2 forced runs against the same MLAS fp32); value: the worst ratio
# packed / fp32 over those M and formats (scalar: the earlier M = 1, 8, 64 run).  After the AVX2 GEMV
# row blocks and the direct panel decode (README "Measured"), the worst cases are u4-g32 at M = 2-8 and,
# for weights small enough that fp32 runs from cache, every M below 16; at M = 1 the 4096 x 4096 weights
# are 0.23-0.50x fp32 on AVX2 and 0.27-0.47x on AVX-512, at M = 64 0.94-1.04x.  No row is under the
# limit yet, so `auto` still unpacks every weight on these sets; re-measure when the kernels change.
SLOWER_LIMIT = 1.1
MEASURED_SLOWDOWN: dict[str, list[tuple[int, int, float]]] = {
    # isa: [(K, N, worst packed / fp32 time)]
    "avx512": [(384, 1536, 2.47), (1536, 384, 2.17), (1024, 1024, 2.26), (4096, 4096, 1.38)],
    "avx2": [(384, 1536, 3.04), (1536, 384, 2.67), (1024, 1024, 2.79), (4096, 4096, 1.27)],
    "scalar": [(384, 1536, 69.5), (1024, 1024, 74.1)],
    # "neon": never measured (no ARM machine): like any set without a row here, `auto` unpacks
}


def unpack_rule(K: int, N: int, isa: str) -> bool:
    """Whether ``auto`` unpacks a ``K x N`` bayesq MatMul weight when the kernels in use are ``isa``."""
    rows = MEASURED_SLOWDOWN.get(isa)
    if not rows:
        return True
    size = math.log(K * N)
    _, _, worst = min(rows, key=lambda r: abs(math.log(r[0] * r[1]) - size))
    return worst > SLOWER_LIMIT


def make_session(model: str | os.PathLike | bytes | onnx.ModelProto, providers=None,
                 sess_options: ort.SessionOptions | None = None, fold: bool = True, unpack: str = "auto",
                 external_data: str | os.PathLike | None = None, **kw) -> ort.InferenceSession:
    """An InferenceSession for any model bayesq-onnx writes (or any other model).  The bayesq
    custom-op library is registered by ``session_options``; pass ``sess_options`` made by it (or call
    ``custom_ops.register`` on your own) to keep bayesq ops loadable.

    ``fold``: bayesq ``Dequantize*`` nodes on constant weights (Conv and other non-MatMul
    consumers), and blocked ``DequantizeLinear`` ones, are evaluated once here and become float32
    initializers, as onnxruntime itself folds plain ``DequantizeLinear`` of constants at load (it
    folds neither custom ops nor blocked int2/int4 ones).  Their consumers then get
    onnxruntime's prepacked kernels (NCHWc convolutions) instead of re-decoding the weights and
    running unpacked on every call (EfficientNet-lite0 at 3.0 bits: 1.6x fp32's time without this).
    The file stays compressed; in memory those weights are float32, as with ``DequantizeLinear``.

    ``unpack``: what happens to bayesq ``MatMulAffine`` / ``MatMulLut`` nodes on constant weights.
    ``never``: they stay packed (memory at the packed size).  ``always``: each becomes an fp32
    ``MatMul`` (+ ``Add`` for a bias) on its weight dequantized once here, bit-exactly (in memory
    only; the file stays small).  ``auto``: per weight, by :func:`unpack_rule` (the kernels in use and
    the weight's size).

    ``external_data``: the folder a proto's external tensors are stored relative to
    (``model_io.open_model``).  onnxruntime maps them from there, and is told not to prepack weights,
    which would copy every one into the process's memory: the session then costs little more than
    the files' pages."""
    if unpack not in UNPACK:
        raise BayesQError(f"unpack={unpack!r}: expected one of {', '.join(UNPACK)}")
    so = sess_options or session_options()
    if external_data is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data))
        so.add_session_config_entry("session.disable_prepacking", "1")
    providers = providers or DEFAULT_PROVIDERS
    rewritten = _rewrite(model, so, providers, fold, unpack)
    model = rewritten if rewritten is not None else model
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = str(Path(model))
    return ort.InferenceSession(model, sess_options=so, providers=providers, **kw)


def _rewrite(model, so: ort.SessionOptions, providers, fold: bool, unpack: str) -> onnx.ModelProto | None:
    """``model`` with its foldable Dequantize nodes replaced by their outputs and its unpackable
    MatMuls by fp32 ones (``fold``, ``unpack`` as in make_session), or None when there is nothing to
    do (or the result would not fit one protobuf)."""
    if isinstance(model, (str, os.PathLike)):
        path, model = model, onnx.load(str(model), load_external_data=False)   # tensors only if needed
    elif isinstance(model, bytes):
        path, model = None, onnx.load_from_string(model)
    else:
        path = None
    folds = _foldable(model) if fold else []
    unpacks = _unpackable(model, unpack) if unpack != "never" else []
    if not folds and not unpacks:
        return None
    if path is not None:
        load_external_data_for_model(model, str(Path(path).parent))
    g = model.graph
    # one session evaluates every weight: the Dequantize nodes as they are, and for each MatMul the
    # Dequantize op of its format on the same inputs and attributes (W (K, N), bit-exact)
    unpacked_w = {id(n): f"{n.output[0]}__bq_unpacked_W" for n in unpacks}
    deq = [helper.make_node(n.op_type.replace("MatMul", "Dequantize"), list(n.input[1:_n_weight_inputs(n) + 1]),
                            [unpacked_w[id(n)]], domain=custom_ops.DOMAIN,
                            **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in unpacks]
    nodes = folds + deq
    inits = {t.name for t in g.initializer}
    used = {i for n in nodes for i in n.input if i}
    part = helper.make_graph(nodes, "fold", [], [onnx.ValueInfoProto(name=n.output[0]) for n in nodes],
                             [t for t in g.initializer if t.name in used and t.name in inits])
    part = helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    values = ort.InferenceSession(part.SerializeToString(), sess_options=so, providers=providers).run(None, {})
    gone = {id(n) for n in folds} | set(unpacked_w)
    exact_casts = _may_have_float16(model)
    keep = []
    for n in g.node:
        if id(n) in unpacked_w:
            keep += _fp32_matmul(n, unpacked_w[id(n)], exact_casts)
        elif id(n) not in gone:
            keep.append(n)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    # initializers read inside subgraphs (from the outer scope) stay too
    still = {i for n in all_nodes(out.graph) for i in n.input} | {o.name for o in g.output}
    new_inits = [t for t in g.initializer if t.name in still]
    new_inits += [numpy_helper.from_array(v, n.output[0]) for n, v in zip(nodes, values)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(new_inits)
    return out if out.ByteSize() <= model_io.PROTO_LIMIT else None


def _n_weight_inputs(n: onnx.NodeProto) -> int:
    """Inputs after A that hold the packed weight: B, lut (LUT) or B, scales, zero_points (affine)."""
    return 2 if n.op_type == "MatMulLut" else 3


def _fp32_matmul(n: onnx.NodeProto, w: str, casts: bool) -> list[onnx.NodeProto]:
    """Nodes computing what bayesq MatMul ``n`` computes, on its dequantized weight ``w`` (float32):
    A @ W (+ bias) in fp32.  ``casts``: A may be float16, so A and the bias are converted to float32
    and the result rounded once to A's type (CastLike), as the op does; onnxruntime keeps such casts
    even between float32 tensors (a copy per call), hence only when needed."""
    a, y = n.input[0], n.output[0]
    nw = _n_weight_inputs(n)
    bias = n.input[nw + 1] if len(n.input) > nw + 1 else ""
    p = f"{y}__bq_unpacked"
    if not casts:
        if not bias:
            return [helper.make_node("MatMul", [a, w], [y])]
        return [helper.make_node("MatMul", [a, w], [f"{p}_Y"]), helper.make_node("Add", [f"{p}_Y", bias], [y])]
    out = [helper.make_node("CastLike", [a, w], [f"{p}_A"]),
           helper.make_node("MatMul", [f"{p}_A", w], [f"{p}_Y"])]
    last = f"{p}_Y"
    if bias:
        out += [helper.make_node("CastLike", [bias, w], [f"{p}_bias"]),
                helper.make_node("Add", [last, f"{p}_bias"], [f"{p}_Yb"])]
        last = f"{p}_Yb"
    out.append(helper.make_node("CastLike", [last, a], [y]))
    return out


def _may_have_float16(model: onnx.ModelProto) -> bool:
    """Whether any activation of the main graph can be float16: a float16 graph input, output,
    value_info, initializer or Constant, or a Cast to float16 (bayesq scale / LUT tables excepted: their
    type is independent of the activations').  Without any, float16 has no way in."""
    g = model.graph
    F16 = TensorProto.FLOAT16
    tables = {n.input[2 if n.op_type.startswith(("MatMul", "Gather")) else 1] for n in g.node   # scales / lut
              if n.domain == custom_ops.DOMAIN and len(n.input) > 2}
    if any(v.type.tensor_type.elem_type == F16 for v in [*g.input, *g.output, *g.value_info]):
        return True
    if any(t.data_type == F16 and t.name not in tables for t in g.initializer):
        return True
    for n in g.node:
        for a in n.attribute:
            if (n.op_type == "Cast" and a.name == "to" and a.i == F16) or (a.type == onnx.AttributeProto.TENSOR
                                                                            and a.t.data_type == F16):
                return True
        if any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute):
            return True    # subgraphs: not looked into
    return False


def _unpackable(model: onnx.ModelProto, unpack: str) -> list[onnx.NodeProto]:
    """bayesq MatMul nodes (main graph) whose weight inputs are all initializers, that ``unpack``
    unpacks (``auto``: by unpack_rule).  None before opset 15 (CastLike)."""
    if not custom_ops.available():
        return []          # nothing could run them or dequantize them: the session reports that
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        return []
    inits = {t.name for t in model.graph.initializer}
    isa = custom_ops.kernel_isa() if unpack == "auto" else ""
    if isa.startswith("invalid"):
        return []          # a bad BAYESQ_ISA: the session's own kernels report it
    out = []
    for n in model.graph.node:
        if n.domain != custom_ops.DOMAIN or n.op_type not in ("MatMulAffine", "MatMulLut"):
            continue
        weights = [i for i in n.input[1:_n_weight_inputs(n) + 1] if i]
        if not all(i in inits for i in weights):
            continue
        attrs = {a.name: a.i for a in n.attribute}
        if unpack == "always" or unpack_rule(attrs["K"], attrs["N"], isa):
            out.append(n)
    return out


def _foldable(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Dequantize nodes on initializers (main graph only) that onnxruntime leaves in the graph: the
    bayesq ones, and blocked ``DequantizeLinear`` (int2/int4 Conv weights) whose consumers are not a
    MatMul (there onnxruntime fuses it into MatMulNBits itself)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    consumers: dict[str, set[str]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)

    def blocked_dq(n) -> bool:
        return (n.domain in ("", "ai.onnx") and n.op_type == "DequantizeLinear"
                and any(a.name == "block_size" and a.i > 0 for a in n.attribute)
                and not consumers.get(n.output[0], set()) & {"MatMul", "Gemm"})

    return [n for n in g.node if all(i in inits for i in n.input if i)
            and ((n.domain == custom_ops.DOMAIN and n.op_type.startswith("Dequantize")) or blocked_dq(n))]
