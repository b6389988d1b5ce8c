// GPTQ's column loop over one sub-block of a lazy batch (bayesq_onnx/quantize/rounding.py,
// error_feedback): the native twin of that numpy loop, which stays the reference and the fallback.
// numpy spends about fifteen calls per column on vectors of a few hundred to a few thousand weights:
// a 768 x 768 weight's loop took 20-25 ms, about 10 with this (6 of them BLAS); the products that
// carry the updates past the sub-block stay in BLAS (numpy).
//
// The arithmetic follows numpy's operation by operation, to the last bit: float32 division, rint
// (half to even), the clip, the dequantization, the scaled error and each update's product then
// difference.  Compiled without FMA contraction.  Plain C ABI for ctypes (which releases the GIL);
// single-threaded and deterministic.
#include <cmath>
#include <cstdint>

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define BQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BQ_CLONES
#endif

// np.rint in plain arithmetic, so the loop vectorizes on every ISA: below 2^23 adding 2^23 leaves a
// unit in the last place of 1, so the sum rounds to the nearest integer, ties to even (the parity of
// 2^23 + k is k's); from 2^23 on every float32 is an integer already.  NaN passes through.
inline float rint_exact(float x) {
    const float a = std::fabs(x);
    return a < 8388608.f ? std::copysign((a + 8388608.f) - 8388608.f, x) : x;
}

// the code a float code stands for as numpy casts it to uint8 (NaN, from a zero scale, to 0)
inline uint8_t as_code(float q) { return q == q ? static_cast<uint8_t>(q) : 0; }

// backend.affine_codes, then the mask and the scaled error, for one column of `rows` weights
BQ_CLONES void affine_column(int64_t rows, const float* __restrict w, const float* __restrict s,
                             const float* __restrict z, float qmax, const float* __restrict keep, float ucc,
                             uint8_t* __restrict code, float* __restrict e) {
    for (int64_t r = 0; r < rows; ++r) {
        float q = rint_exact(w[r] / s[r]);
        q = q + z[r];
        q = q < 0.f ? 0.f : (q > qmax ? qmax : q);   // np.clip: NaN stays NaN
        float deq = (q - z[r]) * s[r];
        if (keep) q = q * keep[r], deq = deq * keep[r];
        code[r] = as_code(q);
        e[r] = (w[r] - deq) / ucc;
    }
}

// backend.nearest_level: the number of thresholds below each weight (thr (K-1, rows), counted
// threshold by threshold), the level that index names (lev (rows, K)), then as above
BQ_CLONES void level_column(int64_t rows, const float* __restrict w, const float* __restrict thr,
                            const float* __restrict lev, int32_t K, const float* __restrict keep, float ucc,
                            uint8_t* __restrict code, float* __restrict e) {
    for (int64_t r = 0; r < rows; ++r) code[r] = 0;
    for (int32_t t = 0; t + 1 < K; ++t) {
        const float* th = thr + t * rows;
        for (int64_t r = 0; r < rows; ++r) code[r] += th[r] < w[r];
    }
    for (int64_t r = 0; r < rows; ++r) {
        float deq = lev[r * K + code[r]];
        if (keep) {
            if (keep[r] == 0.f) code[r] = 0;
            deq = deq * keep[r];
        }
        e[r] = (w[r] - deq) / ucc;
    }
}

// the update of a later column of the sub-block: W1[k] -= U[c, k] * e
BQ_CLONES void update(int64_t rows, float u, const float* __restrict e, float* __restrict wk) {
    for (int64_t r = 0; r < rows; ++r) {
        const float t = u * e[r];
        wk[r] = wk[r] - t;
    }
}

}  // namespace

extern "C" {

// Columns 0..n-1 of one sub-block, in rounding order: W (n, rows) float32, the weights as they stand
// (rows contiguous), updated in place; U the factor at the sub-block's first diagonal entry, row
// strides su_r and su_c (elements: U[c, k] is U[c * su_r + k * su_c]; the factor comes from LAPACK in
// Fortran order); err (n, rows) float32 out, each column's (w - deq) / U[c, c]; codes (n, rows) uint8
// out.  Column c's quantizer is its group's, group[c]: kind 0 an affine grid (a: scales, b: zero
// points, each (groups, rows), qmax_or_k the largest code), kind 1 levels (a: thresholds
// (groups, K-1, rows), b: levels (groups, rows, K), qmax_or_k = K).  keep (n, rows) 1 or 0 per weight,
// or null: a 0 fixes the code and value to 0.  Returns 0, or 1 on bad arguments.
__attribute__((visibility("default"))) int BayesqGptqColumns(
    int64_t n, int64_t rows, float* W, const float* U, int64_t su_r, int64_t su_c, float* err, uint8_t* codes,
    const int64_t* group, int32_t kind, int32_t qmax_or_k, const float* a, const float* b, const float* keep) {
    if (n < 0 || rows < 0 || su_r < 0 || su_c < 0 || (kind != 0 && kind != 1) || qmax_or_k < 1 || qmax_or_k > 256)
        return 1;
    const int32_t K = qmax_or_k;
    for (int64_t c = 0; c < n; ++c) {
        float* w = W + c * rows;
        float* e = err + c * rows;
        const float ucc = U[c * su_r + c * su_c];
        const float* kc = keep ? keep + c * rows : nullptr;
        const int64_t g = group[c];
        if (kind == 0)
            affine_column(rows, w, a + g * rows, b + g * rows, static_cast<float>(qmax_or_k), kc, ucc,
                          codes + c * rows, e);
        else
            level_column(rows, w, a + g * (K - 1) * rows, b + g * rows * K, K, kc, ucc, codes + c * rows, e);
        for (int64_t k = c + 1; k < n; ++k) update(rows, U[c * su_r + k * su_c], e, W + k * rows);
    }
    return 0;
}

}  // extern "C"
