// The scale search of one scaled codebook (bayesq_onnx/quantize/scaled_codebook.py, _fit_scales): the
// native twin of that numpy code, which stays the reference and the fallback.  Row by row, so a row's
// weights stay in cache through the ten error evaluations and two least-squares steps that numpy
// makes as passes over the whole weight (there about 30% of a scaled codebook's fit on the 0.1B Llama).
//
// The arithmetic follows numpy's operation by operation, to the last bit: the same float32 and
// float64 products, numpy's pairwise summation of a row and reduceat's sum of a group (its first
// element plus the pairwise sum of the rest).  Compiled without FMA contraction.  Plain C ABI for
// ctypes (which releases the GIL); single-threaded and deterministic.
#include <algorithm>
#include <cstdint>
#include <new>
#include <vector>

#include "pairwise_sum.h"

namespace {

using bayesq::pairwise_sum;

#if defined(__x86_64__) && defined(__GNUC__)
#define BQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BQ_CLONES
#endif

// The element loops of one group, each a plain loop that vectorizes (a clone per ISA; every ISA gives
// the same bits: no FMA, IEEE division).  q[i]: the thresholds below x[i] (_nearest: a tie goes to the
// lower level), counted threshold by threshold as numpy does.

// _errors' terms: w (mu - s c[q])^2 with x = mu / s, all float32, widened to float64
BQ_CLONES void error_terms(const float* __restrict mu, const float* __restrict w, float s, const float* __restrict lev,
                           const float* __restrict thr, int nthr, int64_t n, uint8_t* __restrict q,
                           float* __restrict x, double* __restrict out) {
    for (int64_t i = 0; i < n; ++i) x[i] = mu[i] / s, q[i] = 0;
    for (int j = 0; j < nthr; ++j) {
        const float t = thr[j];
        for (int64_t i = 0; i < n; ++i) q[i] += x[i] > t;
    }
    for (int64_t i = 0; i < n; ++i) {
        const float d = mu[i] - s * lev[q[i]];
        out[i] = static_cast<double>(w[i] * (d * d));
    }
}

// a least-squares step's terms: c the level nearest mu / s in float64, w mu c and w c^2
BQ_CLONES void ls_terms(const float* __restrict mu, const float* __restrict w, double s, const float* __restrict lev,
                        const float* __restrict thr, int nthr, int64_t n, uint8_t* __restrict q, double* __restrict x,
                        double* __restrict num, double* __restrict den) {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<double>(mu[i]) / s, q[i] = 0;
    for (int j = 0; j < nthr; ++j) {
        const double t = thr[j];
        for (int64_t i = 0; i < n; ++i) q[i] += x[i] > t;
    }
    for (int64_t i = 0; i < n; ++i) {
        const double c = lev[q[i]];
        num[i] = static_cast<double>(w[i] * mu[i]) * c;
        den[i] = (static_cast<double>(w[i]) * c) * c;
    }
}

struct Row {
    int64_t L, block, G;
    int K;
    const float* lev;
    std::vector<float> thr, xf;
    std::vector<double> xd, prod, prod2;
    std::vector<uint8_t> q;

    Row(int64_t L_, int64_t block_, int K_, const float* lev_)
        : L(L_), block(block_ && block_ < L_ ? block_ : L_), G((L_ + block - 1) / block), K(K_), lev(lev_),
          thr(K_ - 1), xf(L_), xd(L_), prod(L_), prod2(L_), q(L_) {
        for (int j = 0; j + 1 < K; ++j) thr[j] = (lev[j + 1] + lev[j]) * 0.5f;
    }

    // _group_sum: one group, a row's pairwise sum; several, np.add.reduceat's
    double group_sum(const double* p, int64_t g) const {
        if (G == 1) return pairwise_sum(p, L);
        const int64_t a = g * block, n = std::min(block, L - a);
        return p[a] + pairwise_sum(p + a + 1, n - 1);
    }

    // _errors of one row: per group sum w (mu - s c[nearest(mu / s)])^2, s the scale as float32
    void errors(const float* mu, const float* w, const double* scale, double* out) {
        for (int64_t g = 0; g < G; ++g) {
            const int64_t a = g * block, n = std::min(block, L - a);
            error_terms(mu + a, w + a, static_cast<float>(scale[g]), lev, thr.data(), K - 1, n, q.data() + a,
                        xf.data() + a, prod.data() + a);
        }
        for (int64_t g = 0; g < G; ++g) out[g] = group_sum(prod.data(), g);
    }

    // one least-squares step with the codes fixed: sum w mu c / sum w c^2 per group, c the levels
    // nearest mu / best (float64), kept where both are positive
    void least_squares(const float* mu, const float* w, const double* best, double* cand) {
        for (int64_t g = 0; g < G; ++g) {
            const int64_t a = g * block, n = std::min(block, L - a);
            ls_terms(mu + a, w + a, best[g], lev, thr.data(), K - 1, n, q.data() + a, xd.data() + a,
                     prod.data() + a, prod2.data() + a);
        }
        for (int64_t g = 0; g < G; ++g) {
            const double num = group_sum(prod.data(), g), den = group_sum(prod2.data(), g);
            const double x = den > 0 ? num / den : best[g];
            cand[g] = x > 0 ? x : best[g];
        }
    }
};

}  // namespace

extern "C" {

// _fit_scales of `rows` rows of width L: mu and w float32 with row strides mu_stride and w_stride (0: one
// row for all), unit element stride; `levels` K sorted float32 levels; `scale` (rows, G) float64 in/out,
// G = ceil(L / block) (block 0: one group a row).  Each group's scale becomes the best of the current
// one and its `multiples`, then `ls_steps` least-squares steps, each kept only where it lowers the
// group's error.  Returns 0, or 1 on bad sizes or no memory.
__attribute__((visibility("default"))) int BayesqScaledFitScales(
    int64_t rows, int64_t L, int64_t block, const float* mu, int64_t mu_stride, const float* w, int64_t w_stride,
    int32_t K, const float* levels, const double* multiples, int32_t n_mult, int32_t ls_steps, double* scale) {
    if (rows < 0 || L < 1 || block < 0 || K < 1 || K > 256 || n_mult < 0 || ls_steps < 0) return 1;
    try {
        Row row(L, block, K, levels);
        const int64_t G = row.G;
        std::vector<double> base(G), best(G), err(G), cand(G), e(G);
        for (int64_t r = 0; r < rows; ++r) {
            const float *m = mu + r * mu_stride, *wr = w + r * w_stride;
            double* s = scale + r * G;
            std::copy(s, s + G, base.begin());
            std::copy(s, s + G, best.begin());
            row.errors(m, wr, best.data(), err.data());
            auto keep_better = [&]() {
                row.errors(m, wr, cand.data(), e.data());
                for (int64_t g = 0; g < G; ++g)
                    if (e[g] < err[g]) best[g] = cand[g], err[g] = e[g];
            };
            for (int32_t k = 0; k < n_mult; ++k) {
                for (int64_t g = 0; g < G; ++g) cand[g] = base[g] * multiples[k];
                keep_better();
            }
            for (int32_t k = 0; k < ls_steps; ++k) {
                row.least_squares(m, wr, best.data(), cand.data());
                keep_better();
            }
            std::copy(best.begin(), best.end(), s);
        }
    } catch (const std::bad_alloc&) {
        return 1;
    }
    return 0;
}

}  // extern "C"
