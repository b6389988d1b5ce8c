"""RTN and GPTQ rounding on a fixed grid; GPTQ against a slow column-by-column OBQ reference."""
import numpy as np
import pytest

from bayesq_onnx.quantize.grid import minmax_grid
from bayesq_onnx.quantize.rounding import round_gptq, round_rtn


def _correlated(n, L, seed):
    """Inputs with strong cross-correlation (a shared low-rank part), the case GPTQ exploits."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)) @ rng.standard_normal((4, L)) + 0.3 * rng.standard_normal((n, L))


def _reference(W, H, scale, zp, bits, block, damp, act_order):
    """OBQ / GPTQ the slow way: quantize one column, move the remaining columns by the OBS update
    with the full inverse Hessian, then remove the quantized coordinate from H^-1 by its rank-one
    Schur complement.  No Cholesky, no lazy batches.  ``scale is None``: dynamic groups, each
    group's min/max range taken from the fully updated weights at its first column."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    dynamic = scale is None
    if dynamic:
        scale, zp = minmax_grid(W.astype(np.float32), bits, block)   # overwritten group by group
    L, qmax = W.shape[1], 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(L)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H += damp * np.mean(np.diag(H)) * np.eye(L)
    Hinv = np.linalg.inv(H)
    codes = np.zeros(W.shape, np.int64)
    for i in range(L):
        g = perm[i] // block
        if dynamic and i % block == 0:
            scale[:, g:g + 1], zp[:, g:g + 1] = minmax_grid(W[:, i:i + block].astype(np.float32), bits, block)
        c = np.clip(np.rint(W[:, i] / scale[:, g].astype(np.float64)) + zp[:, g], 0, qmax)
        q = (c - zp[:, g]) * scale[:, g].astype(np.float64)
        W[:, i:] -= np.outer((W[:, i] - q) / Hinv[i, i], Hinv[i, i:])
        Hinv -= np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
        codes[:, perm[i]] = c
    return codes


def _reference_fasterquant(W, H, bits, groupsize, blocksize, percdamp):
    """IST-DASLab/gptq ``GPTQ.fasterquant`` with its defaults (dynamic groups, no act_order),
    transcribed to numpy: lazy batches of ``blocksize`` columns, and each group's range found on
    ``W`` (the weights at the start of the current batch), not on the batch copy ``W1``.  Ranges
    use ``minmax_grid`` (the reference's ``find_params`` differs only for all-zero groups)."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    L, qmax = W.shape[1], 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * np.mean(np.diag(H)) * np.eye(L)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T                 # upper factor of H^-1
    Q = np.zeros(W.shape, np.int64)
    for i1 in range(0, L, blocksize):
        i2 = min(i1 + blocksize, L)
        W1, Hinv1, Err1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2], np.zeros((W.shape[0], i2 - i1))
        for i in range(i2 - i1):
            if (i1 + i) % groupsize == 0:
                scale, zero = minmax_grid(W[:, i1 + i:i1 + i + groupsize].astype(np.float32), bits, groupsize)
                scale, zero = scale[:, 0].astype(np.float64), zero[:, 0].astype(np.float64)
            w = W1[:, i]
            q = np.clip(np.rint(w / scale) + zero, 0, qmax)
            err1 = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
            Q[:, i1 + i] = q
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


@pytest.mark.parametrize("bits,block,lazy", [(4, 32, 128), (3, 64, 128), (2, 16, 40)])
def test_dynamic_groups_match_reference_fasterquant(bits, block, lazy):
    rng = np.random.default_rng(bits * block)
    L = 200                                  # several lazy batches, a short last group
    X = _correlated(400, L, bits)
    X[:, 7] = 0.0                            # a dead input
    W = rng.standard_normal((11, L)).astype(np.float32)
    q = round_gptq(W, X.T @ X, None, None, bits, block, damp=0.01, lazy_block=lazy, dtype=np.float64)
    # same float64 arithmetic up to summation order: codes agree exactly (see above)
    np.testing.assert_array_equal(q.codes, _reference_fasterquant(W, X.T @ X, bits, block, lazy, 0.01))
    # the grid it returns is the one it rounded onto
    np.testing.assert_array_equal(round_rtn(q.dequantize(), q.scale, q.zero_point, bits, block).codes, q.codes)


@pytest.mark.parametrize("bits,block", [(3, 16), (4, 8)])
def test_dynamic_groups_match_slow_reference_when_batches_are_groups(bits, block):
    """With lazy batches of one group, every group's range is read from fully updated weights:
    the column-by-column OBQ reference with dynamic groups must agree."""
    rng = np.random.default_rng(bits)
    L = 40
    X = _correlated(300, L, bits)
    W = rng.standard_normal((7, L)).astype(np.float32)
    q = round_gptq(W, X.T @ X, None, None, bits, block, damp=0.01, lazy_block=block, dtype=np.float64)
    np.testing.assert_array_equal(q.codes, _reference(W, X.T @ X, None, None, bits, block, 0.01, False))


def test_dynamic_groups_reject_act_order():
    W = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="act_order"):
        round_gptq(W, np.diag(np.arange(1.0, 33.0)), None, None, 4, 16, act_order=True)  # order reversed


def _err(X, W, q):
    return np.linalg.norm(X @ W.T - X @ q.dequantize().T.astype(np.float64))


def test_rtn_is_nearest_grid_point():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 50)).astype(np.float32)
    scale, zp = minmax_grid(W, 3, 16)
    q = round_rtn(W, scale, zp, 3, 16)
    assert q.codes.dtype == np.uint8 and q.codes.shape == W.shape and q.codes.max() <= 7
    g = np.arange(50) // 16
    levels = (np.arange(8)[None, None, :] - zp[:, g, None]) * scale[:, g, None]
    nearest = np.abs(levels - W[..., None]).min(-1)
    # float32 dequantization against float64 distances: equal up to float32 rounding
    np.testing.assert_allclose(np.abs(q.dequantize() - W), nearest, atol=1e-6)


def test_rtn_in_row_chunks_equals_one_pass(monkeypatch):
    """Rounded a few rows at a time (bounded float64 temporaries on large embeddings), the codes
    are those of one pass over the whole view: the arithmetic is elementwise."""
    from bayesq_onnx.quantize import rounding
    rng = np.random.default_rng(1)
    W = rng.standard_normal((37, 50)).astype(np.float32)
    scale, zp = minmax_grid(W, 3, 16)
    whole = round_rtn(W, scale, zp, 3, 16)
    monkeypatch.setattr(rounding, "_RTN_CHUNK", 3 * 50)   # three rows a pass, the last pass one row
    chunked = round_rtn(W, scale, zp, 3, 16)
    np.testing.assert_array_equal(chunked.codes, whole.codes)
    g = np.arange(50) // 16
    np.testing.assert_array_equal(whole.codes, rounding._codes(W.astype(np.float64), scale[:, g], zp[:, g], 7))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,block,lazy", [(3, 16, 16), (2, 8, 7), (4, 16, 128)])
def test_gptq_matches_slow_reference(bits, block, lazy, act_order):
    rng = np.random.default_rng(bits + block)
    L = 40                                   # not a multiple of block 16: short last group
    X = _correlated(200, L, bits)
    X[:, 5] = 0.0                            # a dead input
    H = X.T @ X
    W = rng.standard_normal((9, L)).astype(np.float32)
    scale, zp = minmax_grid(W, bits, block)
    q = round_gptq(W, H, scale, zp, bits, block, damp=0.01, lazy_block=lazy, act_order=act_order,
                   dtype=np.float64)
    want = _reference(W, H, scale, zp, bits, block, 0.01, act_order)
    # Same arithmetic in float64 up to summation order (~1e-13): a code could only differ if a
    # weight landed within that of a rounding threshold, which random data does not do.
    np.testing.assert_array_equal(q.codes, want)
    assert np.all(q.codes[:, 5] == zp[:, 5 // block])   # dead input: weight 0, as the reference


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(1)
    L = 96                                   # block 64: one full group and one short group
    X = _correlated(1000, L, 1)
    W = rng.standard_normal((32, L)).astype(np.float32)
    scale, zp = minmax_grid(W, 3, 64)
    rtn = _err(X, W, round_rtn(W, scale, zp, 3, 64))
    gptq = _err(X, W, round_gptq(W, X.T @ X, scale, zp, 3, 64, act_order=act_order))
    # Error feedback along the shared directions cuts the output error to ~1/4 here (act_order:
    # ~1/5); 0.8 is a loose margin that a broken update (or plain RTN codes) still cannot meet.
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_gptq_rejects_bad_shapes():
    W = np.zeros((4, 32), np.float32)
    scale, zp = minmax_grid(W, 4, 16)
    with pytest.raises(ValueError):
        round_gptq(W, np.eye(31), scale, zp, 4, 16)
    with pytest.raises(ValueError):
        round_rtn(W, scale[:, :1], zp[:, :1], 4, 16)


def _site_problem(seed):
    """A (24, 128) view, its X^T X over 300 correlated rows, and the posterior from that diagonal."""
    from bayesq_onnx.posterior.laplace import DiagonalLaplace

    rng = np.random.default_rng(seed)
    X = _correlated(300, 128, seed)
    W = rng.standard_normal((24, 128)).astype(np.float32)
    H = X.T @ X
    return W, H, DiagonalLaplace.fit(W, np.broadcast_to(2 * np.diag(H), W.shape), 1e-2)


def test_bayesq_codes_never_worse_than_reference_gptq_on_the_layer():
    """bayesq keeps the better of its searched fixed grid and the reference's dynamic groups, by
    the layer output error on the calibration rows; so in every format it is at most gptq's."""
    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import MatMulNBits
    from bayesq_onnx.quantize.site import SiteQuantizer

    W, H, post = _site_problem(3)
    ours, ref = (SiteQuantizer(W, post, H, METHODS[m]) for m in ("bayesq", "gptq"))
    for fmt in (MatMulNBits(2, 32), MatMulNBits(4, 64), MatMulNBits(8, 128)):
        assert ours.layer_error(ours.codes(fmt)) <= ref.layer_error(ref.codes(fmt))


def test_reference_shares_gptq_work_and_equals_an_independent_gptq_quantizer(monkeypatch):
    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import MatMulNBits
    from bayesq_onnx.quantize import site as site_mod
    from bayesq_onnx.quantize.site import SiteQuantizer

    W, H, post = _site_problem(4)
    ours = SiteQuantizer(W, post, H, METHODS["bayesq"])
    alone = SiteQuantizer(W, post, H, METHODS["gptq"])
    ref = ours.reference()
    for fmt in (MatMulNBits(2, 32), MatMulNBits(4, 64)):
        ours.codes(fmt)                  # searched grid and GPTQ's own, to compare
        want = alone.codes(fmt)
        rounded = []
        monkeypatch.setattr(site_mod, "round_gptq", lambda *a, **k: rounded.append(1))
        got = ref.codes(fmt)             # GPTQ's own again: shared, not recomputed
        monkeypatch.undo()
        assert not rounded
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_array_equal(got.scale, want.scale)
        np.testing.assert_array_equal(got.zero_point, want.zero_point)
    # with act_order the bayesq quantizer's factor is permuted: nothing is shared
    ordered = SiteQuantizer(W, post, H, METHODS["bayesq"], act_order=True)
    np.testing.assert_array_equal(ordered.reference().codes(MatMulNBits(4, 64)).codes,
                                  alone.codes(MatMulNBits(4, 64)).codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n", [40, 300])   # fewer calibration rows than inputs (H of rank 40), and more
def test_layer_error_from_gptqs_objective_is_the_exact_layer_error(act_order, n):
    """GPTQ's objective, the scaled column errors it sums as it rounds, less the damping's share, is
    tr(E H E^T) with E the final error: checked against the L x L product for a fixed grid, dynamic
    groups and a codebook, with a dead input (a column no calibration row reaches)."""
    from bayesq_onnx.quantize.codebook import round_gptq_codebook
    from bayesq_onnx.quantize.rounding import gptq_factor, layer_error_from_objective

    rng = np.random.default_rng(11)
    X = _correlated(n, 96, 11)
    X[:, 7] = 0.0
    W = rng.standard_normal((20, 96)).astype(np.float32)
    H = X.T @ X
    f = gptq_factor(H, 0.01, act_order)
    scale, zp = minmax_grid(W, 3, 32)
    lev = np.sort(rng.standard_normal((20 * 3, 8)), axis=1).astype(np.float32)
    runs = [round_gptq(W, f, scale, zp, 3, 32)]
    if not act_order:
        runs.append(round_gptq(W, f, None, None, 4, 32))
    codes, objective = round_gptq_codebook(W, f, lev, 32)
    cb_deq = lev.reshape(20, 3, 8)[np.arange(20)[:, None], (np.arange(96) // 32)[None], codes]
    pairs = [(q.dequantize(), q.gptq_objective) for q in runs] + [(cb_deq, objective)]
    for deq, obj in pairs:
        E = deq.astype(np.float64) - W
        exact = np.einsum("rk,rk->", E @ H, E)
        # the identity is exact; GPTQ's column updates run in float32 (each rounded to 6e-8 of
        # itself), which moved it by at most 1.3e-7 relative in these and larger cases
        assert layer_error_from_objective(W, deq, f, obj) == pytest.approx(exact, rel=1e-5)


def test_site_layer_error_takes_gptqs_objective_only_for_gptqs_codes():
    """SiteQuantizer.layer_error on GPTQ's codes reads its objective; codes without one (nearest
    rounding, or the same codes with the objective dropped) get the L x L product: both agree."""
    from dataclasses import replace

    from bayesq_onnx.config import METHODS
    from bayesq_onnx.formats import BayesqLut, MatMulNBits
    from bayesq_onnx.quantize.site import SiteQuantizer

    W, H, post = _site_problem(12)
    q = SiteQuantizer(W, post, H, METHODS["bayesq"])
    for fmt in (MatMulNBits(4, 64), BayesqLut(3, 0)):
        codes = q.codes(fmt)
        assert codes.gptq_objective is not None
        plain = replace(codes, gptq_objective=None)
        assert q.layer_error(codes) == pytest.approx(q.layer_error(plain), rel=1e-5)   # as above
