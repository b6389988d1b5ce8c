// Kernel interface shared by the per-ISA translation units (scalar, AVX2, AVX-512, NEON).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bayesq/layout.h"

namespace bq {

// A packed weight, view V (N rows, K codes); see layout.h.
struct QWeight {
    const uint8_t* B = nullptr;
    const float* scales = nullptr;   // affine (N, G)
    const uint8_t* zp = nullptr;     // affine (N, zp_bytes) or null (zp = 2^(bits-1))
    const float* lut = nullptr;      // LUT (N, G, 2^bits)
    int64_t K = 0, N = 0, block = 0, G = 1, col_bytes = 0, zp_bytes = 0;
    int bits = 0;
    bool is_lut = false;

};

// Helpers are static (internal linkage), never inline members: the per-ISA translation units are
// compiled with different -m flags, and the linker must not pick an AVX-512 copy for the scalar path.
static inline const uint8_t* row_of(const QWeight& w, int64_t n) { return w.B + n * w.col_bytes; }
static inline int64_t group_of(const QWeight& w, int64_t k) { return bq_group_of(k, w.block); }
static inline int zero_point(const QWeight& w, int64_t n, int64_t g) {
    return w.zp ? bq_stream_at(w.zp + n * w.zp_bytes, w.bits, g) : (1 << (w.bits - 1));
}
// The exact dequantized value (the reference's fp32 arithmetic).
static inline float value(const QWeight& w, int64_t n, int64_t g, int q) {
    if (w.is_lut) return w.lut[(n * w.G + g) * (int64_t(1) << w.bits) + q];
    return bq_affine(q, zero_point(w, n, g), w.scales[n * w.G + g]);
}
// f(std::integral_constant<int, bits>, std::bool_constant<is_lut>) for w: the SIMD kernels are
// templates on both.  static, as above: each ISA's translation unit instantiates its own.
template <class F>
static inline void with_format(const QWeight& w, F&& f) {
    auto go = [&](auto lut) {
        switch (w.bits) {
            case 1: return f(std::integral_constant<int, 1>{}, lut);
            case 2: return f(std::integral_constant<int, 2>{}, lut);
            case 3: return f(std::integral_constant<int, 3>{}, lut);
            case 4: return f(std::integral_constant<int, 4>{}, lut);
            case 5: return f(std::integral_constant<int, 5>{}, lut);
            case 6: return f(std::integral_constant<int, 6>{}, lut);
            case 7: return f(std::integral_constant<int, 7>{}, lut);
            default: return f(std::integral_constant<int, 8>{}, lut);
        }
    };
    if (w.is_lut) go(std::true_type{});
    else go(std::false_type{});
}

// Whether every SIMD step (16, or the partial chunk's lanes, consecutive k) can use one group's table.
static inline bool simd_groups(const QWeight& w) { return w.block == 0 || w.block >= w.K || w.block % BQ_LANES == 0; }

// An N:M sparse weight (layout.h, "Sparse"): the survivors' codes are the dense weight `inner` (N rows
// of Kc = K * keep / of codes, its groups the survivors of `block` original weights); row n's run r
// (weights r*of .. r*of+of-1) keeps the positions of pattern bq_stream_at(mask + n * mask_bytes, pbits, r).
struct SparseWeight {
    QWeight inner;
    const uint8_t* mask = nullptr;
    int64_t K = 0, mask_bytes = 0;
    int keep = 0, of = 0, pbits = 0;
};

// Pattern p of (keep, of), 1 <= keep < of <= 8: layout.h's bq_sparse_patterns, made once per (keep, of).
const std::vector<uint8_t>& sparse_patterns(int keep, int of);

// The runs of 8 consecutive weights (of in 2, 4, 8) have consecutive pattern indices in the mask
// stream: one field of 8 / of * pbits <= 7 bits.  By field value: `expand`, the weights whose survivors
// the field's runs hold (a run with an invalid index taken as pattern 0, so that its keep survivors are
// skipped all the same), and `kept`, those that survive (none of such a run's).
struct SparseFields {
    std::vector<uint8_t> expand, kept;
    int bits = 0, used = 0;   // field width; survivors per 8 weights
};
const SparseFields& sparse_fields(int keep, int of);   // of in 2, 4, 8

// The 8 pattern indices (3 bits each) of 2:4 runs r .. r + 7 (r a multiple of 8, so byte-aligned) in
// the low 24 bits: one 4-byte read where the row has them.
static inline uint32_t runs24(const uint8_t* mrow, int64_t mask_bytes, int64_t r) {
    uint32_t f = 0;
    if (3 * r / 8 + 4 <= mask_bytes) {
        std::memcpy(&f, mrow + 3 * r / 8, 4);
        return f & 0xFFFFFFu;
    }
    for (int j = 0; j < 8; ++j) f |= uint32_t(bq_stream_at(mrow, 3, r + j)) << (3 * j);
    return f;
}

struct Kernels {
    const char* name;
    // dst[(n - n0) * ld + k] = V[n, k] for n in [n0, n1), exactly as the reference computes it.
    void (*decode)(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld);
    // Y[m * ldy + n] = sum_k A[m * lda + k] * V[n, k] for m < M, n in [n0, n1) (fused unpack + dot).
    // SA: group_sums of A (affine weights only; [M][G]), computed once per call by the caller.
    void (*gemv)(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                 int64_t n0, int64_t n1, const float* SA);
    // The same product for many rows: Y[m * ldy + n] = sum_k A[m * lda + k] * V[n, k] for m < M,
    // n in [n0, n1), weights decoded once per call.  Each element is summed in an order that depends
    // only on K and M, never on n0, n1: tasks may split the columns any way and give the same bytes.
    void (*gemm)(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                 int64_t n0, int64_t n1);
    int gemm_cols;      // columns per GEMM task: a multiple of the kernel's panel width
    // M from which the GEMM path beats the fused GEMV, by code width (index: bits; LUT and affine
    // alike): measured per kernel set, see each set's table
    int gemm_min_rows[BQ_MAX_BITS + 1];
    // Sparse weights: Y[m * ldy + n] = sum_k A[m * lda + k] * V[n, k] (A has K columns), for M below
    // `gemm_min_rows` of the survivors' bits (sparse_gemv) and from there on (sparse_gemm); same
    // contract as gemv / gemm.  Null in a set that has none: the caller takes another set's.
    void (*sparse_gemv)(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                        int64_t n0, int64_t n1) = nullptr;
    void (*sparse_gemm)(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                        int64_t n0, int64_t n1) = nullptr;
};

const Kernels* kernels_scalar();
const Kernels* kernels_avx2();    // null when not compiled in
const Kernels* kernels_avx512();  // null when not compiled in
const Kernels* kernels_neon();    // null when not compiled in (AArch64 only)

// Scalar building blocks the SIMD kernels reuse for rare shapes (straddling groups, K % 8 tails).
void decode_scalar(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld);
void gemv_scalar(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                 int64_t n0, int64_t n1, const float* SA);
// dst[k] = V[n, k], k < K, of sparse row n from its survivors' values vc[0 .. Kc) (exact copies; 0 elsewhere).
void sparse_expand_scalar(const SparseWeight& s, int64_t n, const float* vc, float* dst);
// Runs [r0, r1) of sparse row n, dense, into dst[0, (r1 - r0) * of) from its survivors' values vc (run r's
// at vc[r * keep]).  A run whose index is past the last pattern (a corrupt mask) keeps none of them.
void sparse_expand_runs(const SparseWeight& s, int64_t n, const float* vc, float* dst, int64_t r0, int64_t r1);
void sparse_gemv_scalar(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy,
                        int64_t n0, int64_t n1);
// SA[m * G + g] = sum of A[m, k] over the k of group g (the affine GEMVs' zero-point term).
void group_sums(const QWeight& w, const float* A, int64_t M, int64_t lda, float* SA);

// A (M rows, lda apart) copied with each row zero-padded from K to a multiple of 4 (scratch slot 4);
// *lda_out receives the padded row length.  For GEMM micro-kernels that read 4 k at a time.
const float* pad_k4(const float* A, int64_t M, int64_t lda, int64_t K, int64_t* lda_out);

// F16C conversions (kernels_avx2.cpp; call only when the CPU has AVX2/F16C).
void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n);
void float_to_half_f16c(const float* src, uint16_t* dst, int64_t n);

// A thread-local float buffer of at least n elements, 64-byte aligned, one per slot 0..5 (kernels
// run on ORT's pool threads).  Slot 4 holds pad_k4's copy of A, slot 5 the fused sparse loops' zero
// points (alive while a GEMM fills its panels).
float* scratch(int slot, size_t n);

}  // namespace bq
