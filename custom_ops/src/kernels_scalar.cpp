// Portable kernels: the fallback on CPUs without AVX2, and the path SIMD kernels take for shapes
// their fast loops do not cover.  Decoding follows layout.h lane by lane.
#include <cstring>
#include <vector>

#include "kernels.h"

namespace bq {

float* scratch(int slot, size_t n) {
    thread_local std::vector<float> buf[6];
    if (buf[slot].size() < n + 16) buf[slot].resize(n + 16);
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf[slot].data()) + 63) & ~uintptr_t(63));
}

static void decode_row(const QWeight& w, int64_t n, float* dst) {
    const uint8_t* row = row_of(w, n);
    const int b = w.bits;
    const int64_t nc = bq_n_chunks(w.K);
    for (int64_t c = 0; c < nc; ++c) {
        const bq_chunk ch = bq_chunk_at(w.K, b, c);
        for (int l = 0; l < ch.lanes; ++l) {
            const uint64_t v = bq_lane_word(row + ch.byte0, ch.lanes, ch.lane_bytes, l);
            for (int i = 0; i < ch.steps; ++i) {
                const int64_t k = ch.k0 + int64_t(ch.lanes) * i + l;
                dst[k] = value(w, n, group_of(w, k), bq_word_code(v, b, i));
            }
        }
    }
}

void decode_scalar(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    for (int64_t n = n0; n < n1; ++n) decode_row(w, n, dst + (n - n0) * ld);
}

const float* pad_k4(const float* A, int64_t M, int64_t lda, int64_t K, int64_t* lda_out) {
    const int64_t K4 = (K + 3) / 4 * 4;
    float* Ap = scratch(4, size_t(M * K4));
    for (int64_t m = 0; m < M; ++m) {
        std::memcpy(Ap + m * K4, A + m * lda, size_t(K) * sizeof(float));
        std::memset(Ap + m * K4 + K, 0, size_t(K4 - K) * sizeof(float));
    }
    *lda_out = K4;
    return Ap;
}

void group_sums(const QWeight& w, const float* A, int64_t M, int64_t lda, float* SA) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < w.G; ++g) {
            const int64_t k0 = w.block ? g * w.block : 0, k1 = w.block && k0 + w.block < w.K ? k0 + w.block : w.K;
            float t[4] = {0.f, 0.f, 0.f, 0.f};  // four chains: this runs once per call, keep it short
            int64_t k = k0;
            for (; k + 4 <= k1; k += 4)
                for (int i = 0; i < 4; ++i) t[i] += A[m * lda + k + i];
            for (; k < k1; ++k) t[0] += A[m * lda + k];
            SA[m * w.G + g] = (t[0] + t[1]) + (t[2] + t[3]);
        }
}

void gemv_scalar(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                 int64_t n0, int64_t n1, const float*) {
    float* col = scratch(3, size_t(w.K));
    for (int64_t n = n0; n < n1; ++n) {
        decode_row(w, n, col);
        for (int64_t m = 0; m < M; ++m) {
            const float* a = A + m * lda;
            float s = 0.f;
            for (int64_t k = 0; k < w.K; ++k) s += a[k] * col[k];
            Y[m * ldy + n] = s;
        }
    }
}

const std::vector<uint8_t>& sparse_patterns(int keep, int of) {
    // every (keep, of) built once, at first use (thread-safe static initialisation)
    static const auto tables = [] {
        std::vector<std::vector<uint8_t>> t(9 * 9);
        for (int o = 2; o <= 8; ++o)
            for (int k = 1; k < o; ++k) {
                uint8_t pat[70];
                t[size_t(k * 9 + o)].assign(pat, pat + bq_sparse_patterns(k, o, pat));
            }
        return t;
    }();
    return tables[size_t(keep * 9 + of)];
}

const SparseFields& sparse_fields(int keep, int of) {
    static const auto tables = [] {
        std::vector<SparseFields> t(9 * 9);
        for (int o : {2, 4, 8})
            for (int k = 1; k < o; ++k) {
                const std::vector<uint8_t>& pat = sparse_patterns(k, o);
                const int pbits = bq_pattern_bits(int(pat.size()));
                SparseFields& e = t[size_t(k * 9 + o)];
                e.bits = 8 / o * pbits, e.used = 8 / o * k;
                for (int field = 0; field < (1 << e.bits); ++field) {
                    unsigned m = 0, kept = 0;
                    for (int r = 0; r < 8 / o; ++r) {
                        const size_t p = size_t((field >> (r * pbits)) & ((1 << pbits) - 1));
                        const bool valid = p < pat.size();
                        m |= unsigned(pat[valid ? p : 0]) << (r * o);
                        if (valid) kept |= unsigned(pat[p]) << (r * o);
                    }
                    e.expand.push_back(uint8_t(m));
                    e.kept.push_back(uint8_t(kept));
                }
            }
        return t;
    }();
    return tables[size_t(keep * 9 + of)];
}

void sparse_expand_runs(const SparseWeight& s, int64_t n, const float* vc, float* dst, int64_t r0, int64_t r1) {
    const std::vector<uint8_t>& pat = sparse_patterns(s.keep, s.of);
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    for (int64_t r = r0; r < r1; ++r) {
        const size_t p = size_t(bq_stream_at(mrow, s.pbits, r));
        const unsigned bits = p < pat.size() ? pat[p] : 0u;
        const float* v = vc + r * s.keep;
        for (int t = 0; t < s.of; ++t) dst[(r - r0) * s.of + t] = (bits >> t) & 1u ? *v++ : 0.f;
    }
}

void sparse_expand_scalar(const SparseWeight& s, int64_t n, const float* vc, float* dst) {
    sparse_expand_runs(s, n, vc, dst, 0, s.K / s.of);
}

// Row by row: the survivors decoded (the dense kernels' decode), expanded, then plain dots.
void sparse_gemv_scalar(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                        int64_t n0, int64_t n1) {
    float* vc = scratch(2, size_t(s.inner.K));
    float* col = scratch(3, size_t(s.K));
    for (int64_t n = n0; n < n1; ++n) {
        decode_scalar(s.inner, n, n + 1, vc, s.inner.K);
        sparse_expand_scalar(s, n, vc, col);
        for (int64_t m = 0; m < M; ++m) {
            const float* a = A + m * lda;
            float acc = 0.f;
            for (int64_t k = 0; k < s.K; ++k) acc += a[k] * col[k];
            Y[m * ldy + n] = acc;
        }
    }
}

// Decoding a column once and reusing it for every row is all a scalar GEMM could do: the GEMV does it.
static void gemm_scalar(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                        int64_t n0, int64_t n1) {
    gemv_scalar(w, A, M, lda, Y, ldy, n0, n1, nullptr);
}

const Kernels* kernels_scalar() {
    // gemm is the GEMV here: the switch point does not matter
    static const Kernels k{"scalar", decode_scalar, gemv_scalar, gemm_scalar, 16, {8, 8, 8, 8, 8, 8, 8, 8, 8},
                           sparse_gemv_scalar, sparse_gemv_scalar};
    return &k;
}

}  // namespace bq
