// Portable kernels: the fallback on CPUs without AVX2, and the path SIMD kernels take for shapes
// their fast loops do not cover.  Decoding follows layout.h lane by lane.
#include <cstring>
#include <vector>

#include "kernels.h"

namespace bq {

float* scratch(int slot, size_t n) {
    thread_local std::vector<float> buf[5];
    if (buf[slot].size() < n + 16) buf[slot].resize(n + 16);
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf[slot].data()) + 63) & ~uintptr_t(63));
}

// Lane l's word of a chunk (up to 8 bytes), little-endian.
static inline uint64_t lane_word(const uint8_t* chunk, const bq_chunk& ch, int l) {
    uint64_t v = 0;
    for (int j = 0; j < ch.lane_bytes; ++j)
        v |= uint64_t(chunk[bq_lane_byte(ch.lanes, ch.lane_bytes, j, l)]) << (8 * j);
    return v;
}

static void decode_row(const QWeight& w, int64_t n, float* dst) {
    const uint8_t* row = row_of(w, n);
    const int b = w.bits;
    const uint64_t mask = (uint64_t(1) << b) - 1;
    const int64_t nc = bq_n_chunks(w.K);
    for (int64_t c = 0; c < nc; ++c) {
        const bq_chunk ch = bq_chunk_at(w.K, b, c);
        for (int l = 0; l < ch.lanes; ++l) {
            const uint64_t v = lane_word(row + ch.byte0, ch, l);
            for (int i = 0; i < ch.steps; ++i) {
                const int64_t k = ch.k0 + int64_t(ch.lanes) * i + l;
                dst[k] = value(w, n, group_of(w, k), int((v >> (b * i)) & mask));
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

// Decoding a column once and reusing it for every row is all a scalar GEMM could do: the GEMV does it.
static void gemm_scalar(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                        int64_t n0, int64_t n1) {
    gemv_scalar(w, A, M, lda, Y, ldy, n0, n1, nullptr);
}

const Kernels* kernels_scalar() {
    // gemm is the GEMV here: the switch point does not matter
    static const Kernels k{"scalar", decode_scalar, gemv_scalar, gemm_scalar, 16, {8, 8, 8, 8, 8, 8, 8, 8, 8}};
    return &k;
}

}  // namespace bq
