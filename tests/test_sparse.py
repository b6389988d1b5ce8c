"""N:M sparse formats (formats/bayesq_sparse.py): patterns and their packing, the numpy reference op and
the portable lowering bit for bit against plain numpy, every stored bit counted, the closed-form
expected loss (a pruned weight's is its posterior second moment) against Monte Carlo, the posterior
mask, GPTQ with a mask, the kron layer-loss prediction, and the knapsack taking a sparse format where
it should."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bayesq_onnx.config import METHODS, Recipe
from bayesq_onnx.formats import BayesqSparse
from bayesq_onnx.formats.bayesq_sparse import (mask_from_patterns, pattern_bits, patterns, patterns_from_mask,
                                               top_mask)
from bayesq_onnx.lower.bayesq_nodes import BAYESQ_OPSET, bayesq_dequantize_node, bayesq_matmul_node
from bayesq_onnx.lower.portable import portable_weight_nodes
from bayesq_onnx.plan.candidates import candidate_formats
from bayesq_onnx.plan.planner import cheapest_bits, dense_knapsack_plan, knapsack_plan, uniform_plans
from bayesq_onnx.posterior.expected_loss import pruned_loss
from bayesq_onnx.posterior.laplace import DiagonalLaplace
from bayesq_onnx.quantize.rounding import round_gptq
from bayesq_onnx.quantize.site import SiteQuantizer
from bayesq_onnx.runtime import custom_ops
from bayesq_onnx.runtime.reference_ops import REFERENCE_OPS
from bayesq_onnx.types import WeightSite
import models
from packed_weights import sparse_weight as sparse_case
from test_custom_ops import EPS32, ISAS, make_session

PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (6, 8), (2, 8)]


@pytest.mark.parametrize("keep,of", PATTERNS)
def test_patterns_round_trip(keep, of):
    table = patterns(keep, of)
    assert table.shape == (math.comb(of, keep), of) and (table.sum(axis=1) == keep).all()
    assert [tuple(np.flatnonzero(r)) for r in table] == list(itertools.combinations(range(of), keep))
    assert (1 << pattern_bits(keep, of)) >= len(table) > (1 << (pattern_bits(keep, of) - 1)) or len(table) <= 2
    index = np.random.default_rng(0).integers(0, len(table), (3, 10))
    assert np.array_equal(patterns_from_mask(mask_from_patterns(index, keep, of), keep, of), index)
    with pytest.raises(ValueError, match="exactly"):
        patterns_from_mask(np.ones((1, of), bool), keep, of)


def test_top_mask_keeps_the_largest_scores():
    score = np.array([[0.1, 3.0, 2.0, -1.0, 5.0, 5.0, 0.0, 5.0]])
    assert top_mask(score, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]  # tie: earlier


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("keep,of,bits,block", [(2, 4, 3, 32), (1, 4, 2, 64), (3, 4, 4, 64), (4, 8, 3, 64),
                                                (6, 8, 2, 64), (2, 8, 5, 64), (2, 4, 8, 64)])
def test_pack_unpack_and_stored_bits(keep, of, bits, block, scale_dtype):
    N, K = 5, 200 // of * of
    fmt, q, p, V = sparse_case(keep, of, bits, block, N, K, seed=bits, scale_dtype=scale_dtype)
    assert 8 * sum(a.nbytes for a in p.values()) == fmt.stored_bits(N, K)       # every stored bit counted
    assert p["mask"].shape == (N, -(-(K // of) * pattern_bits(keep, of) // 8))
    back = fmt.unpack(p, N, K)
    assert np.array_equal(back.mask, q.mask) and np.array_equal(back.inner.codes, q.inner.codes)
    assert np.array_equal(back.dequantize(), V)
    assert (V[~q.mask] == 0).all() and np.count_nonzero(q.mask) == N * K * keep // of


def test_format_checks_and_costs():
    assert BayesqSparse(2, 4, 3, 64, "float16").name == "bq-s2of4-u3-g64-f16"
    # 2:4 at 3 bits, fp16 scales, groups of 64: 3 bits per 4 weights of pattern, 1.5 of codes, (16 + 3) / 64
    assert BayesqSparse(2, 4, 3, 64, "float16").stored_bits(1, 4096) == 4096 * (0.75 + 1.5) + 64 * 19
    for bad in [(2, 4, 3, 24), (4, 4, 3, 64), (2, 16, 3, 64), (3, 4, 3, 32), (2, 4, 9, 64)]:
        with pytest.raises(ValueError):
            BayesqSparse(*bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        BayesqSparse(2, 4, 3, 64).stored_bits(1, 66)


def one_node_model(nodes, inits, inputs, out, out_shape, opsets=(BAYESQ_OPSET,)):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), *opsets])


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("keep,of,bits", [(2, 4, 3), (4, 8, 2), (6, 8, 5)])
def test_reference_op_and_portable_lowering(keep, of, bits, scale_dtype):
    N, K, block = 6, 400, 64     # K: 3 whole chunks of survivors and a partial one, a short last group
    fmt, q, p, V = sparse_case(keep, of, bits, block, N, K, seed=of + bits, scale_dtype=scale_dtype)
    node, inits = bayesq_dequantize_node("W", "w", fmt, p, (K, N), axis=0)
    W = ReferenceEvaluator(one_node_model([node], inits, [], "W", [K, N]), new_ops=REFERENCE_OPS).run(None, {})[0]
    assert np.array_equal(W, V.T)
    A = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    node, inits = bayesq_matmul_node("A", "Y", "w", fmt, p, K, N)
    m = one_node_model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, K])], "Y", [3, N])
    assert np.array_equal(ReferenceEvaluator(m, new_ops=REFERENCE_OPS).run(None, {"A": A})[0], A @ V.T)
    # standard ops only, on plain onnxruntime: bit for bit, MatMul and Conv layouts
    for shape, axis, want in (((K, N), 0, V.T), ((N, K, 1, 1), 1, V.reshape(N, K, 1, 1))):
        nodes, inits = portable_weight_nodes("W", "w", fmt, p, shape, axis)
        m = one_node_model(nodes, inits, [], "W", list(shape), opsets=())
        got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        assert np.array_equal(got, want)


# ------------------------------------------------------------------ numerics

def posterior(rows, L, seed):
    rng = np.random.default_rng(seed)
    mu = (rng.standard_normal((rows, L)) * 0.05).astype(np.float32)
    return DiagonalLaplace(mu, rng.uniform(200, 3e4, (rows, L)).astype(np.float32))


@pytest.mark.parametrize("keep,of,bits", [(2, 4, 3), (6, 8, 2)])
def test_expected_loss_matches_monte_carlo(keep, of, bits):
    """The closed form of a sparse grid, survivors' rounding plus the pruned weights' second moments,
    against the whitened distortion of weights drawn from the posterior and put through the same
    fixed quantizer (mask and grid)."""
    post = posterior(4, 128, seed=3)
    fmt = BayesqSparse(keep, of, bits, 64)
    sq = SiteQuantizer(post.mu, post, None, METHODS["bayesq"])
    closed = sq.expected_loss(fmt)
    q = sq.codes(fmt)
    g = (np.arange(128) // 64)
    scale, zp = q.inner.scale[:, g], q.inner.zero_point[:, g].astype(np.float64)
    rng = np.random.default_rng(0)
    draws = 20000
    w = post.mu[None] + rng.standard_normal((draws, *post.mu.shape)) / np.sqrt(post.precision)[None]
    qw = (np.clip(np.rint(w / scale) + zp, 0, (1 << bits) - 1) - zp) * scale * q.mask
    mc = (post.precision * np.square(qw - w)).sum(axis=(1, 2))
    # 20000 draws: the mean's standard error is std / sqrt(20000); 5 of them bound a false failure
    assert abs(mc.mean() - closed) < 5 * mc.std() / np.sqrt(draws), (mc.mean(), closed)
    # the pruned part alone: precision * (mu^2 + sigma^2) summed over the pruned weights
    gone = ~q.mask
    assert pruned_loss(post, q.mask) == pytest.approx(
        float((post.precision[gone] * post.mu[gone].astype(np.float64) ** 2).sum() + gone.sum()), rel=1e-12)


def test_mask_prunes_the_weights_nearest_zero_in_posterior_units():
    """Without GPTQ the score is precision * (mu^2 + sigma^2) = (mu / sigma)^2 + 1: a large weight with a
    wide posterior goes before a smaller one the data pins down."""
    mu = np.array([[0.5, 0.1, 0.2, 0.3]], np.float32)
    prec = np.array([[1.0, 1e4, 1e3, 1e4]], np.float32)            # |mu|/sigma: 0.5, 10, 6.3, 30
    sq = SiteQuantizer(mu, DiagonalLaplace(mu, prec), None, METHODS["bayesq"])
    fmt = BayesqSparse(2, 4, 8, 32)
    assert sq._mask(fmt).tolist() == [[False, True, False, True]]


def test_gptq_with_a_mask_keeps_pruned_weights_at_zero_and_beats_fixed_masks_and_pruning_alone():
    rng = np.random.default_rng(0)
    N, K = 200, 128          # more rows than the layer loss samples (SCREEN_ROWS = 128)
    # correlated inputs (rank 32 plus noise): what error feedback exploits
    X = rng.standard_normal((512, 32)) @ rng.standard_normal((32, K)) + 0.3 * rng.standard_normal((512, K))
    xtx = X.T @ X
    W = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    post = DiagonalLaplace(W, np.broadcast_to(np.diag(xtx)[None, :], W.shape).astype(np.float32) + 1.0)
    fmt = BayesqSparse(2, 4, 4, 64, "float16")
    gptq = SiteQuantizer(W, post, xtx, METHODS["bayesq"])
    rtn = SiteQuantizer(W, post, None, METHODS["bayesq"])
    qg, qr = gptq.codes(fmt), rtn.codes(fmt)
    # the mask is chosen as rounding goes (SparseGPT's N:M): a valid 2:4 mask, the pruned weights 0, and
    # the first run, which no feedback has reached yet, as the posterior ranks the weights
    assert (qg.mask.reshape(N, -1, 4).sum(axis=2) == 2).all() and (qg.dequantize()[~qg.mask] == 0).all()
    assert np.array_equal(qg.mask[:, :4], gptq._mask(fmt)[:, :4]) and not np.array_equal(qg.mask, gptq._mask(fmt))
    err = lambda q: float(np.einsum("rk,kl,rl->", q.dequantize() - W, xtx, q.dequantize() - W))
    assert gptq.layer_error(qg) == pytest.approx(err(qg), rel=1e-6)
    # the mask fixed before rounding instead (the weights the feedback moves are pruned all the same)
    fixed = gptq._mask(fmt)
    qf = round_gptq(W, gptq._factor(), None, None, 4, 64, round_scale=fmt.round_scales, mask=fixed)
    ef = np.where(fixed, qf.dequantize(), 0) - W
    # measured 0.41x here (the chosen codes also take the better of two grids, which alone cannot
    # explain a factor 2: on the MLP of tests/models.py the same grid gave 0.42x)
    assert err(qg) < 0.6 * float(np.einsum("rk,kl,rl->", ef, xtx, ef))
    # error feedback spreads the pruned weights' error over the survivors: 0.58-0.64x of pruning + RTN
    # over three seeds of this case
    assert err(qg) < 0.75 * err(qr), (err(qg), err(qr))
    # the kron layer loss: GPTQ's exact error on a sample of rows, an unbiased estimate of the whole's;
    # rows drawn in proportion to their error scale, so the estimate's spread is a few percent
    assert gptq.layer_loss(fmt) == pytest.approx(gptq.layer_error(qg), rel=0.1)


def site(name, rows, L):
    return WeightSite(name=name, kind="matmul", op_type="MatMul", shape=(L, rows), perm=(1, 0), rows=rows, L=L,
                      consumers=(name,), activations=("x",))


def test_candidates_behind_the_flag():
    s = site("w", 64, 256)
    dense = candidate_formats(s, Recipe(bits=3))
    assert not any(isinstance(f, BayesqSparse) for f in dense)          # the default stays unchanged
    sparse = candidate_formats(s, Recipe(bits=3, sparse=((2, 4), (6, 8))))
    extra = [f for f in sparse if isinstance(f, BayesqSparse)]
    assert len(sparse) == len(dense) + len(extra) and {(f.keep, f.of) for f in extra} == {(2, 4), (6, 8)}
    assert all(f.inner_block % 16 == 0 for f in extra) and not any(f.block == 32 and f.of == 8 for f in extra)
    assert not any(isinstance(f, BayesqSparse) for f in candidate_formats(s, Recipe(bits=3, sparse=((2, 4),),
                                                                                      method="gptq")))
    with pytest.raises(ValueError, match="keep, of"):
        Recipe(bits=3, sparse=((4, 4),))


def test_knapsack_takes_sparse_where_half_the_weights_are_noise():
    """Two sites at one budget: in one, half of every run of 4 is near-zero noise (pruning it costs
    nothing), the other is dense Gaussian.  The knapsack prunes the first (and not the second); without
    sparse candidates the same budget leaves more loss."""
    rng = np.random.default_rng(2)
    rows, L = 64, 256
    noisy = (rng.standard_normal((rows, L)) * 0.05).astype(np.float32)
    noisy.reshape(rows, L // 4, 4)[..., 1::2] *= 1e-3
    dense = (rng.standard_normal((rows, L)) * 0.05).astype(np.float32)
    sites = [site("noisy", rows, L), site("dense", rows, L)]
    # against the affine and per-row formats (a scaled codebook, 2.1 bits at 2 bits, would take both sites)
    recipe = Recipe(bits=2.6, sparse=((2, 4),), blocks=(64,), scaled_lut_bits=())
    quant = {s.name: SiteQuantizer(v, DiagonalLaplace(v, np.full((1, L), 1e4, np.float32)), None, METHODS["bayesq"])
             for s, v in zip(sites, (noisy, dense))}

    def plan(r):
        cands = {s.name: [f for f in candidate_formats(s, r)] for s in sites}
        losses = {s.name: np.array([quant[s.name].expected_loss(f) for f in cands[s.name]]) for s in sites}
        p = knapsack_plan(sites, cands, losses, r.bits * rows * L * 2)
        return p, sum(losses[s.name][cands[s.name].index(p.choice[s.name])] for s in sites)

    with_sparse, loss_sparse = plan(recipe)
    without, loss_dense = plan(Recipe(bits=2.6, blocks=(64,), scaled_lut_bits=()))
    assert isinstance(with_sparse.choice["noisy"], BayesqSparse) and not isinstance(with_sparse.choice["dense"], BayesqSparse)
    # measured 0.79x: the noisy site's survivors keep 3 bits for what 2 bits cost it dense
    assert loss_sparse < 0.9 * loss_dense
    # uniform plans (gptq's reference and the plan check's) never take a sparse format
    cands = {s.name: candidate_formats(s, recipe) for s in sites}
    assert not any(isinstance(f, BayesqSparse) for p in uniform_plans(sites, cands, 1e9) for f in p.choice.values())
    # the plan check's dense twin: the same knapsack with the sparse formats withdrawn
    losses = {s.name: np.array([quant[s.name].expected_loss(f) for f in cands[s.name]]) for s in sites}
    budget = recipe.bits * rows * L * 2
    twin = dense_knapsack_plan(sites, cands, losses, budget, with_sparse)
    assert twin.label == "knapsack dense" and twin.choice == without.choice
    assert dense_knapsack_plan(sites, cands, losses, budget, without) is None        # nothing was pruned
    dense = {k: [f for f in fs if not isinstance(f, BayesqSparse)] for k, fs in cands.items()}
    low = cheapest_bits(sites, dense) - 1                                             # only pruning fits
    assert dense_knapsack_plan(sites, cands, losses, low, knapsack_plan(sites, cands, losses, low)) is None


# ------------------------------------------------------------------ the custom ops (libbayesq_ops.so)

@pytest.mark.skipif(not custom_ops.available(), reason=str(custom_ops.unavailable_reason()))
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("keep,of,bits,block,scale_dtype", [(2, 4, 3, 64, "float16"), (4, 8, 2, 64, "float32"),
                                                            (6, 8, 4, 128, "float16"), (1, 4, 5, 64, "float32"),
                                                            (3, 6, 3, 96, "float16")])
def test_custom_ops_match_the_reference(isa, keep, of, bits, block, scale_dtype, monkeypatch):
    """MatMulSparseAffine on each kernel set (its GEMV below the switch point, its GEMM above, a K % 8
    tail, a pattern that spans no whole 8-lane vector: 3:6) within the fp32 summation bound of the plain
    numpy product; DequantizeSparseAffine bit for bit."""
    monkeypatch.setenv("BAYESQ_ISA", isa)     # read when a session creates its kernels
    K, N = {4: 1100, 8: 1096, 6: 1098}[of], 37    # several GEMM K slices; K % 8 = 4 and 2 for 4 and 6
    fmt, q, p, V = sparse_case(keep, of, bits, block, N, K, seed=bits + of, scale_dtype=scale_dtype)
    node, inits = bayesq_dequantize_node("W", "w", fmt, p, (N, K, 1, 1), 1)
    m = one_node_model([node], inits, [], "W", [N, K, 1, 1])
    assert make_session(m).run(None, {})[0].tobytes() == V.reshape(N, K, 1, 1).tobytes()
    rng = np.random.default_rng(0)
    for M in (1, 3, 9, 70):
        A = rng.standard_normal((M, K)).astype(np.float32)
        node, inits = bayesq_matmul_node("A", "Y", "w", fmt, p, K, N)
        m = one_node_model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])], "Y", [M, N])
        y = make_session(m).run(None, {"A": A})[0]
        # Higham's gamma_K for any summation order in fp32, doubled for margin (tests/test_custom_ops.py)
        bound = 2 * K * EPS32 * (np.abs(A) @ np.abs(V).T) + 1e-30
        assert np.all(np.abs(y - A.astype(np.float64) @ V.T.astype(np.float64)) <= bound), (M, isa)


# ------------------------------------------------------------------ end to end

@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_compress_with_sparse_candidates(tmp_path, case):
    """A budget below every dense format's cost (2.2 bits: the dense 2-bit groups of these short rows
    store 2.3-2.4): the plan must take sparse formats, the report says which layers and how sparse,
    and the model runs the same in onnxruntime (custom ops; and portable, standard ops only) as under
    the numpy reference ops."""
    import onnx
    from bayesq_onnx import compress, make_session
    build, data = {"mlp": (models.mlp, models.mlp_data), "cnn": (models.cnn, models.cnn_data)}[case]
    src = tmp_path / "m.onnx"
    onnx.save(build(), src)
    feeds = data()
    # no scaled codebook: at 2 bits it stores 2.1-2.3 on these rows, and would fit
    recipe = Recipe(bits=2.2, sparse=((2, 4), (4, 8), (6, 8)), scaled_lut_bits=())
    outs = {}
    for target in ("ort-cpu", "portable") if custom_ops.available() else ("portable",):
        out = tmp_path / f"{target}.onnx"
        rep = compress(src, replace(recipe, target=target), calib=feeds, output=out).report
        sparse_layers = [l for l in rep["layers"] if l["sparsity"] > 0]
        assert sparse_layers and all(l["format"].startswith("bq-s") for l in sparse_layers), rep["layers"]
        assert rep["bits_per_weight"] <= 2.2
        assert rep["sparsity"] == pytest.approx(sum(l["sparsity"] * np.prod(l["shape"]) for l in rep["layers"])
                                                / sum(np.prod(l["shape"]) for l in rep["layers"]))
        outs[target] = make_session(str(out)).run(None, feeds)[0]
    if "ort-cpu" in outs:
        # (onnx's reference GatherElements, which the portable graph uses, takes at most 64 columns)
        ref = ReferenceEvaluator(onnx.load(tmp_path / "ort-cpu.onnx"), new_ops=REFERENCE_OPS).run(None, feeds)[0]
        # fp32 sums in other orders (the kernels', onnxruntime's, numpy's): a few ulps of the outputs
        for got in outs.values():     # the same plan and codes whichever target
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_plan_check_weighs_a_pruned_plan_against_its_dense_twin(tmp_path):
    """Where the knapsack prunes and a dense plan fits too (this MLP at 3.0 bits prunes a quarter of its
    first layer), the plan check measures both, and the plan shipped is the least distorted one."""
    import onnx
    from bayesq_onnx import compress
    src = tmp_path / "m.onnx"
    onnx.save(models.mlp(), src)
    # (without scaled codebooks, which this MLP takes in place of the pruned formats)
    rep = compress(src, Recipe(bits=3.0, sparse=((2, 4), (4, 8), (6, 8)), scaled_lut_bits=()),
                   calib=models.mlp_data()).report
    scores = {c["plan"]: c["distortion"] for c in rep["plan_check"]["candidates"]}
    assert {"knapsack", "knapsack dense"} <= set(scores)
    assert any(l["sparsity"] > 0 for l in rep["layers"]) == (rep["plan"] == "knapsack")
    assert scores[rep["plan"]] == min(scores.values())
    # the ratio to the best uniform plan leaves the dense twin out
    uniform = min(v for k, v in scores.items() if not k.startswith("knapsack"))
    assert rep["plan_check"]["knapsack_vs_best_uniform"] == pytest.approx(scores["knapsack"] / uniform)


def test_tables_keep_the_dense_candidates_own_hull():
    """Where sparse formats push dense ones off a site's hull, the tables still rate the dense
    candidates' own hull (the plan check's dense twin chooses among them); without sparse formats the
    table is the plain hull."""
    from bayesq_onnx.plan.greedy import lower_hull
    from bayesq_onnx.plan.tables import _hull_table
    s = site("w", 64, 256)
    fs = candidate_formats(s, Recipe(bits=3.0, sparse=((2, 4),), blocks=(64,)))

    def screen(f):   # every sparse format far better than the dense ones of its width
        return (0.01 if isinstance(f, BayesqSparse) else 1.0) * 2.0 ** -f.bits

    costs = np.array([f.stored_bits(s.rows, s.L) for f in fs], np.float64)
    values = np.array([screen(f) for f in fs])
    dense = [j for j, f in enumerate(fs) if not isinstance(f, BayesqSparse)]
    own = {dense[i] for i in lower_hull(costs[dense], values[dense])}
    assert not own <= set(lower_hull(costs, values))          # the case: some went off the joint hull
    table, hull = _hull_table(s, fs, screen)
    assert own <= set(hull) and np.all(np.isfinite(table[sorted(own)]))
    plain = [f for f in fs if not isinstance(f, BayesqSparse)]
    table, hull = _hull_table(s, plain, screen)
    assert hull == lower_hull(costs[dense], values[dense])
