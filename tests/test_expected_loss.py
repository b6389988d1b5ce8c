"""Closed-form posterior-expected quantization error against Monte Carlo and an independent exact
region-by-region sum; the Laplace posterior and the per-group whitened loss."""
import numpy as np
import pytest
from scipy.special import ndtr

from bayesq_onnx.posterior.expected_loss import expected_loss, expected_sq_error
from bayesq_onnx.posterior.laplace import DiagonalLaplace

BITS = [2, 3, 4, 8]
# sigma / step: << step (exact threshold sum), ~step on both sides of 1 (Fourier regime, then
# high-resolution), >> step.
K = [0.02, 0.3, 0.7, 0.99, 1.0, 1.3, 5.0]


def _q(w, s, zp, bits):
    return (np.clip(np.rint(w / s) + zp, 0, 2**bits - 1) - zp) * s


def _positions(bits):
    """mu in code units: mid-cell, near a threshold, on the clipping edge, just and far beyond."""
    qmax = 2**bits - 1
    return np.array([qmax / 2 + 0.1, 1.49, -0.45, qmax + 0.8, -3.0, qmax + 6.0])


def _pdf(z):
    return 0.0 if np.isinf(z) else np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def _zpdf(z):
    return 0.0 if np.isinf(z) else z * _pdf(z)


def _exact(mu, sig, s, zp, bits):
    """Independent reference: sum over every code c of the truncated-Gaussian moment
    E[(c_w - w)^2; w in region of c], the region of c being (c -+ 1/2 - zp) s, outermost open."""
    qmax = 2**bits - 1
    out = 0.0
    for c in range(qmax + 1):
        lo = -np.inf if c == 0 else ((c - 0.5 - zp) * s - mu) / sig
        hi = np.inf if c == qmax else ((c + 0.5 - zp) * s - mu) / sig
        # P from whichever tail keeps it away from 1 - (1 - x) cancellation
        p = ndtr(hi) - ndtr(lo) if lo + hi < 0 else ndtr(-lo) - ndtr(-hi)
        d = mu - (c - zp) * s
        out += sig**2 * (p + _zpdf(lo) - _zpdf(hi)) + 2 * sig * d * (_pdf(lo) - _pdf(hi)) + d * d * p
    return out


def test_matches_monte_carlo_in_every_regime():
    rng = np.random.default_rng(0)
    n = 200_000
    s = 0.37
    for bits in BITS:
        zp = 2 ** (bits - 1) - 1
        for k in K:
            for x in _positions(bits):
                mu, sig = (x - zp) * s, k * s
                w = mu + sig * rng.standard_normal(n)
                err = (_q(w, s, zp, bits) - w) ** 2
                se = err.std() / np.sqrt(n)
                closed = expected_sq_error(mu, sig**2, s, zp, bits)
                # 5 standard errors: a false alarm has probability ~6e-7 per case (168 cases);
                # the closed form's own error (< 2e-4 relative) is far below one standard error.
                assert abs(closed - err.mean()) < 5 * se, (bits, k, x, closed, err.mean(), se)


@pytest.mark.parametrize("bits", BITS)
def test_matches_exact_region_sum(bits):
    rng = np.random.default_rng(bits)
    s, zp = 0.05, 2 ** (bits - 1)
    qmax = 2**bits - 1
    for k in K + [0.001, 0.1, 0.249, 0.25, 0.5, 2.0, 30.0]:
        xs = np.concatenate([rng.uniform(-4 - 6 * k, qmax + 4 + 6 * k, 40), _positions(bits)])
        mu = (xs - zp) * s
        sig = k * s
        got = expected_sq_error(mu, sig**2, s, zp, bits)
        want = np.array([_exact(m, sig, s, zp, bits) for m in mu])
        # sigma < step: exact up to thresholds dropped beyond 6 sigma (< 1e-8 relative);
        # sigma >= step: the high-resolution form's error budget (measured 1.5e-4 at sigma = step).
        rtol = 1e-7 if k < 1 else 1e-3
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=f"bits={bits} k={k}")


def test_zero_variance_is_deterministic_rounding_error_exactly():
    rng = np.random.default_rng(1)
    for bits in BITS:
        mu = rng.standard_normal(10_000) * 0.1
        s = rng.uniform(0.001, 0.05, 10_000).astype(np.float32)
        zp = rng.integers(0, 2**bits, 10_000)
        want = (_q(mu, s.astype(np.float64), zp, bits) - mu) ** 2
        np.testing.assert_array_equal(expected_sq_error(mu, 0.0, s, zp, bits), want)


def test_broadcasting_and_chunking():
    rng = np.random.default_rng(2)
    mu = rng.standard_normal((300, 700)) * 0.05          # > one internal chunk
    sig2 = rng.uniform(0, 1e-3, (1, 700))
    full = expected_sq_error(mu, sig2, 0.02, 7, 4)
    assert full.shape == (300, 700) and full.dtype == np.float64
    np.testing.assert_array_equal(full[123], expected_sq_error(mu[123], sig2[0], 0.02, 7, 4))
    assert np.shape(expected_sq_error(0.1, 0.01, 0.02, 7, 4)) == ()
    with pytest.raises(ValueError):
        expected_sq_error(mu, sig2, 0.0, 7, 4)


def test_laplace_fit():
    mu = np.zeros((3, 4), np.float32)
    h = np.array([[0.0, 1.0, 2.0, 5.0]])
    post = DiagonalLaplace.fit(mu, h, damping=0.1)
    np.testing.assert_allclose(post.precision, h + 0.1 * 2.0)
    np.testing.assert_allclose(post.sigma2, 1 / (h + 0.2), rtol=1e-6)
    with pytest.raises(ValueError, match="curvature mean"):
        DiagonalLaplace.fit(mu, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="curvature mean"):
        DiagonalLaplace.fit(mu, np.array([[1.0, np.nan, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="broadcast"):
        DiagonalLaplace.fit(mu, np.ones((2, 4)))


def test_expected_loss_is_precision_weighted_group_sum():
    rng = np.random.default_rng(3)
    rows, L, block, bits = 5, 70, 32, 3                  # 3 groups, the last one short (6)
    mu = rng.standard_normal((rows, L)).astype(np.float32)
    post = DiagonalLaplace.fit(mu, rng.uniform(1, 50, (rows, L)))
    scale = rng.uniform(0.2, 0.5, (rows, 3)).astype(np.float32)
    zp = rng.integers(0, 8, (rows, 3)).astype(np.uint8)
    g = np.arange(L) // block
    per = post.precision * expected_sq_error(mu, post.sigma2, scale[:, g], zp[:, g], bits)
    want = np.stack([per[:, g == j].sum(1) for j in range(3)], axis=1)
    # 1e-6: post.sigma2 is float32, expected_loss takes sigma from the precision in float64
    np.testing.assert_allclose(expected_loss(post, scale, zp, bits, block), want, rtol=1e-6)
    # leading candidate axes evaluate each grid against the same posterior
    stacked = expected_loss(post, np.stack([scale, 2 * scale]), np.stack([zp, zp]), bits, block)
    np.testing.assert_allclose(stacked[0], want, rtol=1e-6)


def test_laplace_prior_at_least_inverse_weight_variance():
    """Unseen weights (h = 0) get a prior as wide as the layer's weights, not an arbitrary width."""
    mu = np.array([[0.1, -0.1, 0.2, -0.2]], np.float32)
    h = np.array([[0.0, 0.0, 1e-6, 1e-6]])
    post = DiagonalLaplace.fit(mu, h, damping=1e-2)
    # var(mu) = 0.025 dominates 1e-2 * mean(h): the prior precision is 1 / 0.025 = 40
    np.testing.assert_allclose(post.precision, h + 1 / mu.var(), rtol=1e-6)  # float32 storage
