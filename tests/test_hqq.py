"""HQQ with integer zero points: against a plain per-group reference, never worse than min/max in
its objective, better than RTN on heavy tails, valid grids, edge groups, determinism."""
import numpy as np
import pytest

from bayesq_onnx.errors import BayesQError
from bayesq_onnx.quantize import hqq as hqq_mod
from bayesq_onnx.quantize.grid import minmax_grid
from bayesq_onnx.quantize.hqq import hqq_grid, hqq_objective
from bayesq_onnx.quantize.rounding import round_rtn


def _reference_group(w, s, z, bits, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """One group, 1-D and unvectorised: half-quadratic rounds with the integer zero-point step
    and the closed-form scale step, best lp error kept, stop at the first round without gain."""
    qmax = 2**bits - 1
    w = w.astype(np.float64)

    def deq(s, z):
        q = np.clip(np.rint(w / s) + z, 0, qmax)
        return q, (q - z) * s

    def lp(r):
        return np.sum(np.abs(w - r) ** p)

    q, r = deq(s, z)
    best, best_sz = lp(r), (s, z)
    for _ in range(iters):
        e = w - r
        with np.errstate(divide="ignore"):
            we = np.sign(e) * np.maximum(np.abs(e) - np.abs(e) ** (p - 1) / beta, 0)
        target = w - we
        z = float(np.clip(np.rint(np.mean(q - target / s)), 0, qmax))
        den = np.sum((q - z) ** 2)
        if den > 0:
            new = float(np.float32(np.sum(target * (q - z)) / den))
            s = new if new > 0 else s
        beta *= kappa
        q, r = deq(s, z)
        err = lp(r)
        if not err < best:
            break
        best, best_sz = err, (s, z)
    return best_sz


def _student(rows, L, seed, df=3, scale=1.0):
    return (np.random.default_rng(seed).standard_t(df, (rows, L)) * scale).astype(np.float32)


@pytest.mark.parametrize("scale", [0.02, 1.0])          # shrink step idle / active (beta units)
def test_matches_per_group_reference(scale):
    w = _student(6, 100, 0, scale=scale)                # L=100, block 32: last group has 4
    bits, block = 3, 32
    scale_, zp = hqq_grid(w, bits, block)
    s0, z0 = minmax_grid(w, bits, block)
    for r in range(6):
        for g in range(4):
            seg = w[r, g * block:(g + 1) * block]
            s_ref, z_ref = _reference_group(seg, float(s0[r, g]), float(z0[r, g]), bits)
            assert zp[r, g] == z_ref
            # sums in another order: the float32 scale may differ in its last bit (1.2e-7)
            assert scale_[r, g] == pytest.approx(s_ref, rel=3e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_beats_rtn_on_heavy_tails(bits, scale):
    w = _student(64, 512, bits, scale=scale)
    s0, z0 = minmax_grid(w, bits, 64)
    s, z = hqq_grid(w, bits, 64)
    rtn_lp, hqq_lp = hqq_objective(w, s0, z0, bits, 64), hqq_objective(w, s, z, bits, 64)
    # min/max is HQQ's first candidate and wins ties: never worse, group by group
    assert np.all(hqq_lp <= rtn_lp)
    e_rtn = round_rtn(w, s0, z0, bits, 64).dequantize() - w
    e_hqq = round_rtn(w, s, z, bits, 64).dequantize() - w
    # the objective rounds exactly as round_rtn; only its float32 dequantization differs (an ulp
    # per weight, < 1e-6 of a group's sum)
    lp = np.add.reduceat(np.abs(e_hqq.astype(np.float64)) ** 0.7, np.arange(0, 512, 64), axis=1)
    np.testing.assert_allclose(hqq_lp, lp, rtol=1e-5)
    # measured on t(3) rows: lp error 0.85-0.97x and mean |error| 0.80-0.96x of RTN's (the least
    # gain at 4 bits); 0.99 is the margin asked for
    assert hqq_lp.sum() < 0.99 * rtn_lp.sum()
    assert np.abs(e_hqq).mean() < 0.99 * np.abs(e_rtn).mean()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_grid_is_valid(bits):
    w = _student(10, 70, 1)
    for update_scale in (True, False):
        s, z = hqq_grid(w, bits, 32, update_scale=update_scale)
        assert s.shape == z.shape == (10, 3)
        assert s.dtype == np.float32 and z.dtype == np.uint8
        assert np.all(np.isfinite(s)) and np.all(s > 0) and np.all(z <= 2**bits - 1)


def test_literal_integer_zero_point_hardly_moves():
    """HQQ's zero-point step alone, rounded: on a fixed scale an integer zero point only slides
    the window along the same lattice, so min/max stays (and the guard keeps it never worse)."""
    w = _student(64, 512, 5)
    for bits in (2, 3, 4):
        s0, z0 = minmax_grid(w, bits, 64)
        s, z = hqq_grid(w, bits, 64, update_scale=False)
        np.testing.assert_array_equal(s, s0)                  # the scale is kept
        assert np.all(hqq_objective(w, s, z, bits, 64) <= hqq_objective(w, s0, z0, bits, 64))


def test_zero_and_constant_groups():
    w = _student(3, 40, 2)
    w[0, :16] = 0.0                                      # all-zero group
    w[1, :16] = 0.25                                     # constant groups
    w[2, :16] = -0.5
    for bits in (2, 4):
        s, z = hqq_grid(w, bits, 16)                     # block 16: last group has 8
        q = round_rtn(w, s, z, bits, 16).dequantize()
        np.testing.assert_array_equal(q[:, :16], w[:, :16])   # represented exactly
        assert s[0, 0] == 1.0 and np.all(z <= 2**bits - 1)


def test_deterministic_and_rows_independent(monkeypatch):
    w = _student(20, 96, 3)
    a = hqq_grid(w, 3, 32)
    b = hqq_grid(w, 3, 32)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    monkeypatch.setattr(hqq_mod, "_CHUNK", 100)          # one row per pass
    c = hqq_grid(w, 3, 32)
    assert a[0].tobytes() == c[0].tobytes() and a[1].tobytes() == c[1].tobytes()


def test_no_iterations_is_minmax():
    w = _student(5, 64, 4)
    s, z = hqq_grid(w, 4, 32, iters=0)
    s0, z0 = minmax_grid(w, 4, 32)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(z, z0)


def test_bad_input():
    w = np.zeros((2, 8), np.float32)
    with pytest.raises(BayesQError, match="view"):
        hqq_grid(np.zeros(8, np.float32), 4, 4)
    with pytest.raises(BayesQError, match="bits"):
        hqq_grid(w, 9, 4)
    with pytest.raises(BayesQError, match="block"):
        hqq_grid(w, 4, 0)
    with pytest.raises(BayesQError, match="NaN"):
        hqq_grid(np.full((2, 8), np.nan, np.float32), 4, 4)
    with pytest.raises(BayesQError, match="p must"):
        hqq_grid(w, 4, 4, p=1.5)
    with pytest.raises(BayesQError, match="beta"):
        hqq_grid(w, 4, 4, kappa=0.5)
    with pytest.raises(BayesQError, match="empty"):
        hqq_grid(np.zeros((0, 8), np.float32), 4, 4)
