// AVX-512 (F, BW, VL, DQ) kernels.  One 16-lane vector = one step of a full chunk (layout.h): the
// lane words come from one or two zero-extending plane loads, step i's codes are (word >> b*i), and
// the table lookup is a single permute: vpermps reads only the low 4 index bits (b <= 4: the table is
// replicated to 16 entries, so the higher garbage bits of the shifted word do not matter), vpermt2ps
// the low 5 (b = 5).  Affine groups build their table (iota - zp) * scale once per group, the exact
// reference arithmetic, so decoding is bit-exact and the GEMV is a dot with the reference weights.
#if !defined(BAYESQ_NO_X86)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels.h"

namespace bq {
namespace {

template <int W, bool FULL>
inline __m512i plane(const uint8_t* p, __mmask16 m) {
    if constexpr (W == 4) {
        return FULL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(m, p);
    } else if constexpr (W == 2) {
        return _mm512_cvtepu16_epi32(FULL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                          : _mm256_maskz_loadu_epi16(m, p));
    } else {
        return _mm512_cvtepu8_epi32(FULL ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                         : _mm_maskz_loadu_epi8(m, p));
    }
}

struct Words {
    __m512i lo, hi;
};

// Lane words of a chunk of L lanes x 8 steps, NB (= bits) bytes per lane, planes 4/2/1 (layout.h).
template <int NB, bool FULL>
inline Words words(const uint8_t* p, int L, __mmask16 m) {
    Words w;
    w.hi = _mm512_setzero_si512();
    if constexpr (NB == 1) {
        w.lo = plane<1, FULL>(p, m);
    } else if constexpr (NB == 2) {
        w.lo = plane<2, FULL>(p, m);
    } else if constexpr (NB == 3) {
        w.lo = _mm512_or_si512(plane<2, FULL>(p, m), _mm512_slli_epi32(plane<1, FULL>(p + 2 * L, m), 16));
    } else {
        w.lo = plane<4, FULL>(p, m);
        const uint8_t* q = p + 4 * L;
        if constexpr (NB == 5) w.hi = plane<1, FULL>(q, m);
        if constexpr (NB == 6) w.hi = plane<2, FULL>(q, m);
        if constexpr (NB == 7)
            w.hi = _mm512_or_si512(plane<2, FULL>(q, m), _mm512_slli_epi32(plane<1, FULL>(q + 2 * L, m), 16));
        if constexpr (NB == 8) w.hi = plane<4, FULL>(q, m);
    }
    return w;
}

// Step I's codes in the low B bits of each lane (higher bits: whatever follows).
template <int B, int I>
inline __m512i code(const Words& w) {
    constexpr int o = B * I;
    if constexpr (o + B <= 32) {
        return o ? _mm512_srli_epi32(w.lo, o) : w.lo;
    } else if constexpr (o >= 32) {
        return o > 32 ? _mm512_srli_epi32(w.hi, o - 32) : w.hi;
    } else {
        return _mm512_or_si512(_mm512_srli_epi32(w.lo, o), _mm512_slli_epi32(w.hi, 32 - o));
    }
}

// What a table gives for a code: the LUT entry, the exact affine value (q - zp) * s, or q * s (the
// affine GEMV, which subtracts sum_g s*zp*sum(a) once at the end instead of rebuilding tables with zp).
enum class Mode { Lut, Affine, Codes };

template <int B>
inline __m512 iota(int half) {  // b <= 4: j mod 2^b (the table replicated to 16 entries); b = 5: 16*half + j
    const __m512i j = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    if constexpr (B <= 4) return _mm512_cvtepi32_ps(_mm512_and_si512(j, _mm512_set1_epi32((1 << B) - 1)));
    else return _mm512_cvtepi32_ps(_mm512_add_epi32(j, _mm512_set1_epi32(16 * half)));
}

template <int B, Mode MODE>
struct Table {
    // registers actually needed: a 16-entry table (b <= 4), two (b = 5), four (LUT b = 6), or
    // zero point and scale (affine b >= 6); gathers read LUT b >= 7 from memory
    static constexpr int NT = B <= 4 ? 1 : B == 5 ? 2 : (MODE == Mode::Lut && B == 6) ? 4 : (MODE == Mode::Affine) ? 2 : 1;
    __m512 t[NT];
    const float* base;

    inline void load(const QWeight& w, int64_t n, int64_t g) {
        if constexpr (MODE == Mode::Lut) {
            const float* p = w.lut + ((n * w.G + g) << B);
            if constexpr (B == 1) {
                double d;
                std::memcpy(&d, p, sizeof d);
                t[0] = _mm512_castpd_ps(_mm512_set1_pd(d));
            } else if constexpr (B == 2) {
                t[0] = _mm512_broadcast_f32x4(_mm_loadu_ps(p));
            } else if constexpr (B == 3) {
                t[0] = _mm512_broadcast_f32x8(_mm256_loadu_ps(p));
            } else if constexpr (B == 4 || B == 5 || B == 6) {
                for (int i = 0; i < NT; ++i) t[i] = _mm512_loadu_ps(p + 16 * i);
            } else {
                base = p;
            }
        } else if constexpr (MODE == Mode::Codes) {  // q * scale: the zero point is applied apart
            const __m512 sc = _mm512_set1_ps(w.scales[n * w.G + g]);
            if constexpr (B <= 5) {
                t[0] = _mm512_mul_ps(iota<B>(0), sc);
                if constexpr (B == 5) t[1] = _mm512_mul_ps(iota<B>(1), sc);
            } else {
                t[0] = sc;
            }
        } else {
            set(_mm512_set1_ps(float(zero_point(w, n, g))), _mm512_set1_ps(w.scales[n * w.G + g]));
        }
    }

    // Affine: the table of a group from its zero point and scale, both broadcast
    inline void set(__m512 z, __m512 sc) {
        static_assert(MODE == Mode::Affine);
        if constexpr (B <= 5) {
            t[0] = _mm512_mul_ps(_mm512_sub_ps(iota<B>(0), z), sc);
            if constexpr (B == 5) t[1] = _mm512_mul_ps(_mm512_sub_ps(iota<B>(1), z), sc);
        } else {
            t[0] = z;
            t[1] = sc;
        }
    }

    inline __m512 get(__m512i c) const {
        if constexpr (B <= 4) {
            return _mm512_permutexvar_ps(c, t[0]);
        } else if constexpr (B == 5) {
            return _mm512_permutex2var_ps(t[0], c, t[1]);
        } else if constexpr (MODE == Mode::Lut && B == 6) {
            const __m512 lo = _mm512_permutex2var_ps(t[0], c, t[1]), hi = _mm512_permutex2var_ps(t[2], c, t[3]);
            return _mm512_mask_blend_ps(_mm512_test_epi32_mask(c, _mm512_set1_epi32(32)), lo, hi);
        } else if constexpr (MODE == Mode::Lut) {
            return _mm512_i32gather_ps(_mm512_and_si512(c, _mm512_set1_epi32((1 << B) - 1)), base, 4);
        } else {
            const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32((1 << B) - 1)));
            if constexpr (MODE == Mode::Codes) return _mm512_mul_ps(q, t[0]);
            else return _mm512_mul_ps(_mm512_sub_ps(q, t[0]), t[1]);
        }
    }
};

#define BQ_INLINE __attribute__((always_inline))

template <class F, int... I>
BQ_INLINE inline void unroll(F&& f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}

inline int64_t steps_per_group(const QWeight& w) {
    return (w.block == 0 || w.block >= w.K) ? std::numeric_limits<int64_t>::max() : w.block / BQ_LANES;
}

// Group countdown (g, steps left in it) for a loop starting at chunk cb > 0; loads g's table.
template <class Load>
inline void start_group(int64_t spg, int64_t cb, int64_t& g, int64_t& left, Load&& load) {
    const int64_t s0 = cb * BQ_STEPS;
    const bool one = spg == std::numeric_limits<int64_t>::max();
    g = one ? 0 : s0 / spg;
    left = one ? spg : spg - s0 % spg;
    load(g);
}

// ---- fused GEMV: MR rows x NC columns starting at column n ----------------------------------------
// LUT: acc += a * lut[q] with the group's table in registers.  Affine: the table is q * scale (one
// multiply per group), and sum_g scale*zp*sum_{k in g} a (SA: per row and group, computed once per
// call) is subtracted at the end: per step the same three instructions as the LUT.
// A row's zero points, 16 groups at a time: 16 zero points = 2*B bytes of the stream; broadcast them
// to every 128-bit lane, pshufb the two bytes holding zero point i into 32-bit lane i, shift by its
// bit offset, mask.
template <int B>
struct ZeroPoints {
    __m512i vidx, vsh;
    ZeroPoints() {
        alignas(64) int8_t idx[64];
        alignas(64) int32_t sh[16];
        for (int i = 0; i < 16; ++i) {
            idx[4 * i] = int8_t(i * B / 8);
            idx[4 * i + 1] = int8_t(i * B / 8 + 1);
            idx[4 * i + 2] = idx[4 * i + 3] = int8_t(-128);
            sh[i] = (i * B) % 8;
        }
        vidx = _mm512_load_si512(idx);
        vsh = _mm512_load_si512(sh);
    }
    // groups g0 .. g0 + 15 of row n as floats (lanes past G: garbage)
    inline __m512 get(const QWeight& w, int64_t n, int64_t g0) const {
        if (!w.zp) return _mm512_set1_ps(float(1 << (B - 1)));
        const uint8_t* zrow = w.zp + n * w.zp_bytes;
        const int64_t b0 = g0 * B / 8, nbytes = std::min<int64_t>(2 * B, w.zp_bytes - b0);
        const __m512i raw = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), zrow + b0));
        return _mm512_cvtepi32_ps(
            _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(raw, vidx), vsh), _mm512_set1_epi32((1 << B) - 1)));
    }
};

template <int B, int MR>
inline void zp_correction(const QWeight& w, int64_t n, const float* SA, int64_t ldsa, float out[MR]) {
    const int64_t G = w.G;
    const float* s = w.scales + n * G;
    __m512 cv[MR];
    for (int m = 0; m < MR; ++m) cv[m] = _mm512_setzero_ps();
    const ZeroPoints<B> zps;
    for (int64_t g0 = 0; g0 < G; g0 += 16) {  // the last 16 groups or fewer: masked loads
        const int cnt = int(std::min<int64_t>(16, G - g0));
        const __mmask16 lanes = __mmask16((1u << cnt) - 1);
        const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, s + g0), zps.get(w, n, g0));
        for (int m = 0; m < MR; ++m)
            cv[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(lanes, SA + m * ldsa + g0), cv[m]);
    }
    for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(cv[m]);
}

template <int B, bool LUT, int MR, int NC>
void gemv_block(const QWeight& w, const float* A, int64_t lda, const float* SA, int64_t ldsa, float* Y, int64_t ldy,
                int64_t n) {
    const int64_t K = w.K, full = K / BQ_CHUNK;
    __m512 acc[MR][NC];
    float extra[MR][NC] = {};
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NC; ++j) acc[m][j] = _mm512_setzero_ps();
    Table<B, LUT ? Mode::Lut : Mode::Codes> tab[NC];
    const uint8_t* row[NC];
    for (int j = 0; j < NC; ++j) row[j] = row_of(w, n + j);
    const int64_t spg = steps_per_group(w);
    int64_t left = 0, g = -1;

    auto enter = [&](int64_t gn) BQ_INLINE {
        for (int j = 0; j < NC; ++j) tab[j].load(w, n + j, gn);
        g = gn;
    };
    // one weight done in scalar code: LUT value, or q * scale (the zero point is in the correction)
    auto scalar = [&](int j, int64_t k, int q) BQ_INLINE {
        const int64_t gk = group_of(w, k);
        const float v = LUT ? value(w, n + j, gk, q) : float(q) * w.scales[(n + j) * w.G + gk];
        for (int m = 0; m < MR; ++m) extra[m][j] += A[m * lda + k] * v;
    };

    for (int64_t c = 0; c < full; ++c) {
        Words wd[NC];
        for (int j = 0; j < NC; ++j) wd[j] = words<B, true>(row[j] + c * BQ_LANES * B, BQ_LANES, 0xFFFF);
        const float* a = A + c * BQ_CHUNK;
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            if (left == 0) {
                enter(g + 1);
                left = spg;
            }
            --left;
            __m512 av[MR];
            for (int m = 0; m < MR; ++m) av[m] = _mm512_loadu_ps(a + m * lda + BQ_LANES * I);
            for (int j = 0; j < NC; ++j) {
                const __m512 v = tab[j].get(code<B, I>(wd[j]));
                for (int m = 0; m < MR; ++m) acc[m][j] = _mm512_fmadd_ps(av[m], v, acc[m][j]);
            }
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }

    // chunk of L < 16 lanes: masked loads; a step whose L consecutive k straddle groups goes scalar
    const int L = int((K % BQ_CHUNK) / BQ_STEPS);
    if (L) {
        const int64_t k0 = full * BQ_CHUNK;
        const __mmask16 mask = __mmask16((1u << L) - 1);
        Words wd[NC];
        for (int j = 0; j < NC; ++j) wd[j] = words<B, false>(row[j] + k0 * B / 8, L, mask);
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            const int64_t kk = k0 + int64_t(L) * I, gf = group_of(w, kk);
            if (gf != group_of(w, kk + L - 1)) {
                for (int j = 0; j < NC; ++j)
                    for (int l = 0; l < L; ++l) scalar(j, kk + l, bq_code_at(row[j], K, B, kk + l));
                return;
            }
            if (gf != g) enter(gf);
            __m512 av[MR];
            for (int m = 0; m < MR; ++m) av[m] = _mm512_maskz_loadu_ps(mask, A + m * lda + kk);
            for (int j = 0; j < NC; ++j) {
                const __m512 v = tab[j].get(code<B, I>(wd[j]));
                for (int m = 0; m < MR; ++m) acc[m][j] = _mm512_mask3_fmadd_ps(av[m], v, acc[m][j], mask);
            }
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }

    // last K % 8 codes: a plain bit stream
    const int r = int(K % BQ_STEPS);
    for (int i = 0; i < r; ++i)
        for (int j = 0; j < NC; ++j) scalar(j, K - r + i, bq_stream_at(row[j] + (K - r) * B / 8, B, i));

    for (int j = 0; j < NC; ++j) {
        float corr[MR] = {};
        if constexpr (!LUT) zp_correction<B, MR>(w, n + j, SA, ldsa, corr);
        for (int m = 0; m < MR; ++m) Y[m * ldy + n + j] = _mm512_reduce_add_ps(acc[m][j]) + extra[m][j] - corr[m];
    }
}

template <int B, bool LUT, int MR>
void gemv_rows(const QWeight& w, const float* A, int64_t lda, const float* SA, int64_t ldsa, float* Y, int64_t ldy,
               int64_t n0, int64_t n1) {
    constexpr int NC = 4;
    int64_t n = n0;
    for (; n + NC <= n1; n += NC) gemv_block<B, LUT, MR, NC>(w, A, lda, SA, ldsa, Y, ldy, n);
    for (; n < n1; ++n) gemv_block<B, LUT, MR, 1>(w, A, lda, SA, ldsa, Y, ldy, n);
}

template <int B, bool LUT>
void gemv_t(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
            int64_t n1, const float* SA) {
    // Row pairs: two rows of A (2 x 4 KB per 1024 k) stay in L1 while 4 columns stream past; more
    // rows at once spill accumulators or run out of L1 for A, both slower than decoding again.
    const int64_t G = w.G;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
        gemv_rows<B, LUT, 2>(w, A + m * lda, lda, LUT ? nullptr : SA + m * G, G, Y + m * ldy, ldy, n0, n1);
    if (m < M) gemv_rows<B, LUT, 1>(w, A + m * lda, lda, LUT ? nullptr : SA + m * G, G, Y + m * ldy, ldy, n0, n1);
}

// ---- decode (Dequantize op, GEMM panels) ----------------------------------------------------------
template <int B, bool LUT>
void decode_t(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld, int64_t cb, int64_t ce, bool tail) {
    const int64_t K = w.K, full = K / BQ_CHUNK, spg = steps_per_group(w);
    const int L = int((K % BQ_CHUNK) / BQ_STEPS), r = int(K % BQ_STEPS);
    Table<B, LUT ? Mode::Lut : Mode::Affine> tab;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = row_of(w, n);
        float* d = dst + (n - n0) * ld;
        int64_t left = 0, g = -1;  // steps left in group g (then the next group is loaded)
        if (cb > 0) start_group(spg, cb, g, left, [&](int64_t gg) BQ_INLINE { tab.load(w, n, gg); });
        for (int64_t c = cb; c < ce; ++c) {
            const Words wd = words<B, true>(row + c * BQ_LANES * B, BQ_LANES, 0xFFFF);
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                if (left == 0) {
                    tab.load(w, n, ++g);
                    left = spg;
                }
                --left;
                _mm512_storeu_ps(d + c * BQ_CHUNK + BQ_LANES * I, tab.get(code<B, I>(wd)));
            }, std::make_integer_sequence<int, BQ_STEPS>{});
        }
        if (tail && L) {
            const int64_t k0 = full * BQ_CHUNK;
            const __mmask16 mask = __mmask16((1u << L) - 1);
            const Words wd = words<B, false>(row + k0 * B / 8, L, mask);
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                const int64_t kk = k0 + int64_t(L) * I, gf = group_of(w, kk);
                if (gf != group_of(w, kk + L - 1)) {
                    for (int l = 0; l < L; ++l) d[kk + l] = value(w, n, group_of(w, kk + l), bq_code_at(row, K, B, kk + l));
                    return;
                }
                if (gf != g) tab.load(w, n, g = gf);
                _mm512_mask_storeu_ps(d + kk, mask, tab.get(code<B, I>(wd)));
            }, std::make_integer_sequence<int, BQ_STEPS>{});
        }
        for (int i = 0; i < (tail ? r : 0); ++i) {
            const int64_t k = K - r + i;
            d[k] = value(w, n, group_of(w, k), bq_stream_at(row + (K - r) * B / 8, B, i));
        }
    }
}

void gemv(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
          const float* SA) {
    with_format(w, [&](auto b, auto lut) { gemv_t<b.value, lut.value>(w, A, M, lda, Y, ldy, n0, n1, SA); });
}

// Full chunks [cb, ce), then (tail) the partial chunk and the K % 8 codes; dst indexed by k.
void decode_rows(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld, int64_t cb, int64_t ce, bool tail) {
    with_format(w, [&](auto b, auto lut) { decode_t<b.value, lut.value>(w, n0, n1, dst, ld, cb, ce, tail); });
}

void decode(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    decode_rows(w, n0, n1, dst, ld, 0, w.K / BQ_CHUNK, true);
}

// ---- GEMM ---------------------------------------------------------------------------------------------
// A task (a block of columns, all rows of A) decodes its columns once, exactly, into panels of 16
// columns.  A panel vector holds 4 columns x 4 consecutive k (128-bit lane L of vector x: column
// 4L + x, k = 4j .. 4j + 3), so the micro-kernel broadcasts 4 activations of a row (a plain 128-bit
// broadcast load) against 4 vectors: 4 + 6 loads and no shuffle per 24 FMAs, A read in place.  The
// layout makes decoding cheap: the lane words of 4 columns go through one 4 x 4 transpose of 128-bit
// lanes per chunk (8 shuffles per 512 codes), then each vector of codes is one lookup in a table of
// the 4 columns (b <= 4: 4 x 2^b entries, one or two permutes) -- a vector per weight vector, as in
// the GEMV; one column per vector (MLAS's layout) would need a 16 x 16 transpose of the decoded
// floats, 4 shuffles per 16 weights: at M = 64 that made the GEMM ~15% slower than onnxruntime's.
// The price is a 4-lane sum per output at the end of a K pass, paid per row and column, not per
// weight.  An element's sum order (4 chains per pass, passes in order) depends only on K and the K
// slicing (see gemm), never on its tile or task: the bytes do not depend on the thread count.
constexpr int MR = 6;          // 6 rows x 4 vectors = 24 accumulators (of 32 registers)
// K per pass (multiples of 128): one row block: a panel slice (16 x KC) fits L1; several: the panels
// are in L2 anyway, and fewer passes save their sums
constexpr int64_t KC_L1 = 512, KC_L2 = 2048;

inline int64_t k4s(int64_t K) { return (K + 3) / 4; }  // vectors of 4 k per panel column group

// 4 x 4 transpose of 128-bit lanes: o[j] lane L = d[L] lane j.
inline void transpose_lanes(const __m512 d[4], __m512 o[4]) {
    const __m512 t0 = _mm512_shuffle_f32x4(d[0], d[1], 0x44), t1 = _mm512_shuffle_f32x4(d[0], d[1], 0xEE);
    const __m512 t2 = _mm512_shuffle_f32x4(d[2], d[3], 0x44), t3 = _mm512_shuffle_f32x4(d[2], d[3], 0xEE);
    o[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
    o[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
    o[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
    o[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

// 16 rows r[0..15] of 16 floats -> their transpose, in place (64 shuffles).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {  // 128-bit lane L: elements 4L..4L+3 of a row pair, interleaved
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    auto lo = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    auto hi = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    for (int i = 0; i < 16; i += 4) {  // r[4g + c], lane L: column 4L + c of rows 4g..4g+3
        r[i] = lo(t[i], t[i + 2]);
        r[i + 1] = hi(t[i], t[i + 2]);
        r[i + 2] = lo(t[i + 1], t[i + 3]);
        r[i + 3] = hi(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // then a 4 x 4 transpose of 128-bit lanes for each c
        const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
        const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
        t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        t[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        t[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Zero points and scales of a panel's 16 columns, groups [gb, ge) (and a few before), group-major:
// zero points ZS[g * 16 + j], scales ZS[(G + g) * 16 + j], so that a group's table registers are two
// loads and permutes away.  Absent columns: zero point and scale 0, so their values are 0.
template <int B>
void panel_affine(const QWeight& w, int64_t n0, int64_t n1, float* ZS, int64_t gb, int64_t ge) {
    const int64_t G = w.G;
    const ZeroPoints<B> zps;
    for (int64_t g0 = gb / 16 * 16; g0 < ge; g0 += 16) {  // zero points 16 at a time, from a byte boundary
        const int gn = int(std::min<int64_t>(16, G - g0));
        __m512 z[16], s[16];
        for (int j = 0; j < 16; ++j) {
            const bool in = n0 + j < n1;
            z[j] = in ? zps.get(w, n0 + j, g0) : _mm512_setzero_ps();
            s[j] = in ? _mm512_maskz_loadu_ps(__mmask16((1u << gn) - 1), w.scales + (n0 + j) * G + g0) : _mm512_setzero_ps();
        }
        transpose16(z);
        transpose16(s);
        for (int i = 0; i < gn; ++i) {
            _mm512_store_ps(ZS + (g0 + i) * 16, z[i]);
            _mm512_store_ps(ZS + (G + g0 + i) * 16, s[i]);
        }
    }
}

// The values of 4 panel columns 4L + x (col[L] < 0: absent, zeros) at one group: entry L * 2^B + q,
// 16 per register.
template <int B, bool LUT>
struct QuadTable {
    static constexpr int NT = B <= 2 ? 1 : B == 3 ? 2 : 4;
    __m512 t[NT];
    __m512i pick[NT];  // affine: entry e -> panel column 4 (e >> B) + x
    __m512 iota[NT];   // affine: entry e -> q

    explicit QuadTable(int x) {
        const __m512i e = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int r = 0; r < NT; ++r) {
            const __m512i er = _mm512_add_epi32(e, _mm512_set1_epi32(16 * r));
            pick[r] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(er, B), 2), _mm512_set1_epi32(x));
            iota[r] = _mm512_cvtepi32_ps(_mm512_and_si512(er, _mm512_set1_epi32((1 << B) - 1)));
        }
    }

    inline void load(const QWeight& w, const int64_t col[4], const float* ZS, int64_t g) {
        if constexpr (LUT) {
            constexpr int E = 1 << B;
            for (int r = 0; r < NT; ++r) {
                t[r] = _mm512_setzero_ps();
                for (int L = 0; L < 4; ++L) {
                    const int first = L * E - 16 * r;  // lane of this column's entry 0 in register r
                    if (col[L] < 0 || first >= 16 || first + E <= 0) continue;
                    // masked lanes are not read: the pointer may point before the table
                    t[r] = _mm512_mask_loadu_ps(t[r], __mmask16(((1u << E) - 1) << first),
                                                w.lut + ((col[L] * w.G + g) << B) - first);
                }
            }
        } else {  // the reference's (q - zp) * s
            const __m512 z = _mm512_load_ps(ZS + g * 16), s = _mm512_load_ps(ZS + (w.G + g) * 16);
            for (int r = 0; r < NT; ++r)
                t[r] = _mm512_mul_ps(_mm512_sub_ps(iota[r], _mm512_permutexvar_ps(pick[r], z)),
                                     _mm512_permutexvar_ps(pick[r], s));
        }
    }

    // codes in the low B bits of each lane (lane L * 4 + kk: column L), higher bits ignored
    inline __m512 get(__m512i c) const {
        const __m512i hi = _mm512_set_epi32(3 << B, 3 << B, 3 << B, 3 << B, 2 << B, 2 << B, 2 << B, 2 << B,
                                            1 << B, 1 << B, 1 << B, 1 << B, 0, 0, 0, 0);
        const __m512i idx = _mm512_ternarylogic_epi32(c, _mm512_set1_epi32((1 << B) - 1), hi, 0xEA);  // (c & m) | hi
        if constexpr (NT == 1) return _mm512_permutexvar_ps(idx, t[0]);
        else if constexpr (NT == 2) return _mm512_permutex2var_ps(t[0], idx, t[1]);
        else return _mm512_mask_blend_ps(0xFF00, _mm512_permutex2var_ps(t[0], idx, t[1]), _mm512_permutex2var_ps(t[2], idx, t[3]));
    }
};

// Panel columns L * 4 + x (L = 0..3; col[L] < 0: absent), full chunks [cb, ce), straight from the
// codes; P is the panel slice starting at chunk cb.
template <int B, bool LUT>
void pack_quad(const QWeight& w, const int64_t col[4], int x, const float* ZS, float* P, int64_t cb, int64_t ce) {
    const int64_t spg = steps_per_group(w);
    const uint8_t* row[4];
    for (int L = 0; L < 4; ++L) row[L] = row_of(w, col[L] < 0 ? col[0] : col[L]);  // absent: zero table
    QuadTable<B, LUT> tab(x);
    int64_t left = 0, g = -1;  // steps left in group g (then the next group is loaded)
    if (cb > 0) start_group(spg, cb, g, left, [&](int64_t gg) BQ_INLINE { tab.load(w, col, ZS, gg); });
    for (int64_t c = cb; c < ce; ++c) {
        __m512 wd[4], xf[4];
        for (int L = 0; L < 4; ++L) wd[L] = _mm512_castsi512_ps(words<B, true>(row[L] + c * BQ_LANES * B, BQ_LANES, 0xFFFF).lo);
        transpose_lanes(wd, xf);  // xf[j] lane 4L + kk: lane word 4j + kk of column L
        __m512i X[4];
        for (int j = 0; j < 4; ++j) X[j] = _mm512_castps_si512(xf[j]);
        float* p = P + ((c - cb) * (BQ_CHUNK / 4) * 4 + x) * 16;
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            if (left == 0) {
                tab.load(w, col, ZS, ++g);
                left = spg;
            }
            --left;
            for (int j = 0; j < 4; ++j) _mm512_store_ps(p + (4 * I + j) * 64, tab.get(_mm512_srli_epi32(X[j], B * I)));
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }
}

template <int B, bool LUT>
void pack_quads(const QWeight& w, int64_t n0, int64_t n1, float* P, int64_t cb, int64_t ce) {
    float* ZS = nullptr;
    if constexpr (!LUT) {  // the groups of this K slice
        ZS = scratch(3, size_t(32 * w.G));
        panel_affine<B>(w, n0, n1, ZS, group_of(w, cb * BQ_CHUNK), group_of(w, ce * BQ_CHUNK - 1) + 1);
    }
    for (int x = 0; x < 4; ++x) {
        int64_t col[4];
        for (int L = 0; L < 4; ++L) col[L] = n0 + 4 * L + x < n1 ? n0 + 4 * L + x : -1;
        if (col[0] >= 0) {
            pack_quad<B, LUT>(w, col, x, ZS, P, cb, ce);
        } else {
            for (int64_t j = 0; j < (ce - cb) * (BQ_CHUNK / 4); ++j) _mm512_store_ps(P + (4 * j + x) * 16, _mm512_setzero_ps());
        }
    }
}

void panel_from_rows(const float* T, int64_t K, int nc, float* P, int64_t kb, int64_t k, int64_t ke);

// Columns [n0, n1) (at most 16), k in [kb, ke) (kb a multiple of 128) as a panel slice:
// P[(j * 4 + x) * 16 + 4L + kk] = V[n0 + 4L + x, kb + 4j + kk]; columns past n1 and k past K are 0.
void pack_panel(const QWeight& w, int64_t n0, int64_t n1, float* P, int64_t kb, int64_t ke) {
    const int64_t K = w.K, full = K / BQ_CHUNK;
    int64_t k = kb;  // k decoded so far
    if (w.bits <= 4 && kb < full * BQ_CHUNK) {
        const int64_t cb = kb / BQ_CHUNK, ce = std::min(full, ke / BQ_CHUNK);
        switch (w.bits * 2 + w.is_lut) {
            case 2: pack_quads<1, false>(w, n0, n1, P, cb, ce); break;
            case 3: pack_quads<1, true>(w, n0, n1, P, cb, ce); break;
            case 4: pack_quads<2, false>(w, n0, n1, P, cb, ce); break;
            case 5: pack_quads<2, true>(w, n0, n1, P, cb, ce); break;
            case 6: pack_quads<3, false>(w, n0, n1, P, cb, ce); break;
            case 7: pack_quads<3, true>(w, n0, n1, P, cb, ce); break;
            case 8: pack_quads<4, false>(w, n0, n1, P, cb, ce); break;
            default: pack_quads<4, true>(w, n0, n1, P, cb, ce); break;
        }
        k = ce * BQ_CHUNK;
    }
    if (k == ke) return;
    // the rest (b > 4; the partial chunk and K % 8 codes) decoded to floats, then 4 x 4 lane transposes
    float* T = scratch(2, size_t(16 * K));
    decode_rows(w, n0, n1, T, K, k / BQ_CHUNK, ke == K ? full : ke / BQ_CHUNK, ke == K);
    panel_from_rows(T, K, int(n1 - n0), P, kb, k, ke);
}

// P's k in [k, ke) (P starting at kb, k a multiple of 16) from `nc` <= 16 rows of floats T (nc x K):
// the layout above.
void panel_from_rows(const float* T, int64_t K, int nc, float* P, int64_t kb, int64_t k, int64_t ke) {
    for (; k < ke; k += 16) {
        const __mmask16 km = __mmask16((1u << std::min<int64_t>(16, K - k)) - 1);
        const int jn = int(std::min<int64_t>(4, k4s(K) - k / 4));
        for (int x = 0; x < 4; ++x) {
            __m512 d[4], o[4];  // columns x, 4 + x, 8 + x, 12 + x: 16 k each
            for (int L = 0; L < 4; ++L)
                d[L] = 4 * L + x < nc ? _mm512_maskz_loadu_ps(km, T + (4 * L + x) * K + k) : _mm512_setzero_ps();
            transpose_lanes(d, o);
            for (int j = 0; j < jn; ++j) _mm512_store_ps(P + ((k - kb) / 4 + j) * 64 + x * 16, o[j]);
        }
    }
}

// Y tile (R rows x 16 columns, `cols` stored) (+)= A tile (R x kc, kc a multiple of 4) @ panel
// (kc x 16): 4 chains per element (k mod 4), summed at the end; the first pass stores, later ones add.
template <int R>
void micro(const float* A, int64_t lda, const float* P, int64_t kc, float* Y, int64_t ldy, __mmask16 cols, bool first) {
    // (unrolled by hand: GCC keeps the accumulators in registers only if every index is a constant)
    __m512 c[R][4];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
        for (int x = 0; x < 4; ++x) c[i][x] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k += 4) {
        const float* p = P + k * 16;
        const __m512 b0 = _mm512_load_ps(p), b1 = _mm512_load_ps(p + 16), b2 = _mm512_load_ps(p + 32),
                     b3 = _mm512_load_ps(p + 48);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512 a = _mm512_broadcast_f32x4(_mm_loadu_ps(A + i * lda + k));
            c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
            c[i][2] = _mm512_fmadd_ps(a, b2, c[i][2]);
            c[i][3] = _mm512_fmadd_ps(a, b3, c[i][3]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
        // lane (L, kk) of c[i][x] -> element 4L + x: sum over kk, two pairwise levels
        const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(c[i][0], c[i][1]), _mm512_unpackhi_ps(c[i][0], c[i][1]));
        const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(c[i][2], c[i][3]), _mm512_unpackhi_ps(c[i][2], c[i][3]));
        __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
        if (!first) s = _mm512_add_ps(_mm512_maskz_loadu_ps(cols, Y + i * ldy), s);
        _mm512_mask_storeu_ps(Y + i * ldy, cols, s);
    }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, __mmask16, bool);
constexpr MicroFn micros[MR + 1] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};

// Loops (GotoBLAS's): K slices, blocks of rows, panels, row tiles.  A row block's slice of A (about
// 150 KB) stays in L2 while the panels go past.  With one row block, a panel slice is decoded right
// before its rows use it, into a buffer that serves every panel: it is read back from L1 and never
// written back.  With several, every panel slice is kept (in L2) for the next blocks.  The K slices
// depend on K and on whether M exceeds one block, never on the columns or the thread count.
// (Measured on an Emerald Rapids Xeon: larger row blocks, or small K slices with many rows, are slower.)
// pack(c0, c1, S, kb, ke): columns [c0, c1)'s panel slice k in [kb, ke) into S.
template <class Pack>
void gemm_panels(int64_t K, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
                 Pack&& pack_panel) {
    const int64_t np = (n1 - n0 + 15) / 16;
    if (K % 4) A = pad_k4(A, M, lda, K, &lda);  // the micro-kernel reads 4 k at a time (rare shapes)
    auto rows = [K](int64_t kc) { return (36 << 10) / std::min(K, kc) / MR * MR + MR; };  // ~144 KB of A
    const bool reuse = rows(KC_L1) < M;
    const int64_t KC = reuse ? KC_L2 : KC_L1, MB = rows(KC);
    float* P = scratch(0, size_t((reuse ? np : 1) * KC * 16));
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t mb = 0; mb < M; mb += MB) {
            const int64_t me = std::min(M, mb + MB);
            for (int64_t p = 0; p < np; ++p) {
                const int64_t c0 = n0 + 16 * p, c1 = std::min(n1, c0 + 16);
                float* S = reuse ? P + p * KC * 16 : P;
                if (mb == 0) pack_panel(c0, c1, S, k0, k0 + kc);
                for (int64_t m0 = mb; m0 < me; m0 += MR)
                    micros[std::min<int64_t>(MR, me - m0)](A + m0 * lda + k0, lda, S, (kc + 3) / 4 * 4,
                                                           Y + m0 * ldy + c0, ldy, __mmask16((1u << (c1 - c0)) - 1),
                                                           k0 == 0);
            }
        }
    }
}

void gemm(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
    gemm_panels(w.K, A, M, lda, Y, ldy, n0, n1,
                [&](int64_t c0, int64_t c1, float* S, int64_t kb, int64_t ke) { pack_panel(w, c0, c1, S, kb, ke); });
}

// ---- sparse weights ---------------------------------------------------------------------------------
// In general a column's survivors are decoded once (the dense decode, exact) into a buffer, then every
// 16 consecutive weights are one expand of their 16 * keep / of survivors under the 16-bit mask of their
// runs' patterns (of in 2, 4, 8; other runs go scalar).  The runs of 8 weights have consecutive pattern
// indices in the mask stream: one field of 8 / of * pbits <= 7 bits, whose 8-bit mask is a table entry.
// Where half survive the buffer is skipped (survivor_steps).

// The fields of units u .. u + n - 1 (16 weights each, 2 * bits bits; n <= 2), in the low bits: one
// unaligned 64-bit read where 8 bytes are there, else field by field.
inline unsigned unit_fields(const uint8_t* mrow, int64_t mask_bytes, int bits, int64_t u, int n) {
    const int64_t bit = u * 2 * bits;
    if ((bit >> 3) + 8 <= mask_bytes) {
        uint64_t x;
        std::memcpy(&x, mrow + (bit >> 3), 8);
        return unsigned(x >> (bit & 7)) & ((1u << (2 * bits * n)) - 1);
    }
    unsigned f = 0;
    for (int j = 0; j < 2 * n; ++j) f |= unsigned(bq_stream_at(mrow, bits, 2 * u + j)) << (j * bits);
    return f;
}

// 16 weights (a unit: two fields of 8) whose fields are f0 (the lower 8) and f1, from v (their
// survivors first).
inline __m512 expand16(const SparseFields& e, unsigned f0, unsigned f1, __m512 v) {
    const unsigned m = e.expand[f0] | (unsigned(e.expand[f1]) << 8), kept = e.kept[f0] | (unsigned(e.kept[f1]) << 8);
    const __m512 w = _mm512_maskz_expand_ps(__mmask16(m), v);
    return m == kept ? w : _mm512_maskz_mov_ps(__mmask16(kept), w);   // some run's index is invalid
}

// R rows of A (R <= 4) against column n, its survivors in vc (padded by 16 readable floats): two chains
// per row (even and odd units of 16 weights), then the K % 16 weights expanded by the scalar rule.  One
// summation order per K.
template <int R>
void sparse_dot(const SparseWeight& s, const SparseFields& e, int64_t n, const float* vc, const float* A, int64_t lda,
                float* Y, int64_t ldy, int64_t u0, const float part[R]) {
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    const int64_t units = s.K / 16;
    const int fb = 2 * e.bits;                      // field bits per unit of 16 weights (<= 14)
    const unsigned lo = (1u << e.bits) - 1;
    __m512 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    auto step = [&](int64_t u, unsigned f, int h) BQ_INLINE {
        const __m512 w = expand16(e, f & lo, f >> e.bits, _mm512_loadu_ps(vc + u * 2 * e.used));
        for (int i = 0; i < R; ++i) acc[i][h] = _mm512_fmadd_ps(_mm512_loadu_ps(A + i * lda + 16 * u), w, acc[i][h]);
    };
    const uint64_t fmask = (uint64_t(1) << fb) - 1;
    int64_t u = u0;
    // 4 units' fields (<= 56 bits) from one unaligned 64-bit read, where 8 bytes are there
    for (; u + 4 <= units && (u * fb >> 3) + 8 <= s.mask_bytes; u += 4) {
        uint64_t wd;
        std::memcpy(&wd, mrow + (u * fb >> 3), 8);
        wd >>= (u * fb) & 7;
        step(u, unsigned(wd & fmask), 0);
        step(u + 1, unsigned((wd >> fb) & fmask), 1);
        step(u + 2, unsigned((wd >> (2 * fb)) & fmask), 0);
        step(u + 3, unsigned((wd >> (3 * fb)) & fmask), 1);
    }
    for (; u < units; ++u) step(u, unit_fields(mrow, s.mask_bytes, e.bits, u, 1), int(u & 1));
    float tail[16] = {};   // the K % 16 weights, expanded
    sparse_expand_runs(s, n, vc, tail, units * 16 / s.of, s.K / s.of);
    for (int i = 0; i < R; ++i) {
        float sum = part[i] + _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
        for (int64_t k = units * 16; k < s.K; ++k) sum += A[i * lda + k] * tail[k - units * 16];
        Y[i * ldy] = sum;
    }
}

// Where half the weights survive (1:2, 2:4, 4:8), a step of the survivors' codes (16 survivors) is
// 32 consecutive weights: its values come from the group's table in a register, as in the dense GEMV,
// never stored.  survivor_steps walks the chunks [cb, ce) of row n's survivors (256 weights each) and
// hands use(u, v, i) each step's values v, u the first of its two units of 16 weights, i the step in
// its chunk (an integral_constant: two accumulator chains can alternate on it).
template <int B, class Use>
BQ_INLINE inline void survivor_steps(const SparseWeight& s, int64_t n, int64_t cb, int64_t ce, Use&& use) {
    const QWeight& w = s.inner;
    const int64_t spg = steps_per_group(w);
    const uint8_t* row = row_of(w, n);
    // the groups' zero points as floats, 16 at a time
    float* zf = scratch(5, size_t(w.G + 16));
    const ZeroPoints<B> zps;
    for (int64_t g0 = 0; g0 < w.G; g0 += 16) _mm512_storeu_ps(zf + g0, zps.get(w, n, g0));
    const float* sc = w.scales + n * w.G;
    Table<B, Mode::Affine> tab;
    auto load = [&](int64_t gg) BQ_INLINE { tab.set(_mm512_set1_ps(zf[gg]), _mm512_set1_ps(sc[gg])); };
    int64_t left = 0, g = -1;
    if (cb > 0) start_group(spg, cb, g, left, load);
    for (int64_t c = cb; c < ce; ++c) {
        const Words wd = words<B, true>(row + c * BQ_LANES * B, BQ_LANES, 0xFFFF);
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            if (left == 0) {
                load(++g);
                left = spg;
            }
            --left;
            use(16 * c + 2 * I, tab.get(code<B, I>(wd)), ic);
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }
}

// A step's 32 weights from its survivors' values v (survivor_steps): two expands, the upper 8
// survivors through a lane shuffle.
inline void expand32(const SparseWeight& s, const SparseFields& e, int64_t n, int64_t u, __m512 v, __m512& w0,
                     __m512& w1) {
    const unsigned lo = (1u << e.bits) - 1;
    const unsigned f = unit_fields(s.mask + n * s.mask_bytes, s.mask_bytes, e.bits, u, 2), f1 = f >> (2 * e.bits);
    w0 = expand16(e, f & lo, (f >> e.bits) & lo, v);
    w1 = expand16(e, f1 & lo, (f1 >> e.bits) & lo, _mm512_shuffle_f32x4(v, v, 0xEE));
}

// The GEMV over the full chunks of survivors where half survive (1:2, 4:8): per row and step two FMAs;
// part returns the rows' partial sums, the caller adds the rest (sparse_dot from unit 16 * chunks on).
template <int B, int R>
void sparse_half_chunks(const SparseWeight& s, const SparseFields& e, int64_t n, const float* A, int64_t lda,
                        float part[R]) {
    __m512 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    survivor_steps<B>(s, n, 0, s.inner.K / BQ_CHUNK, [&](int64_t u, __m512 v, auto) BQ_INLINE {
        __m512 w0, w1;
        expand32(s, e, n, u, v, w0, w1);
        for (int i = 0; i < R; ++i) {
            acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(A + i * lda + 16 * u), w0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(A + i * lda + 16 * u + 16), w1, acc[i][1]);
        }
    });
    for (int i = 0; i < R; ++i) part[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

// Column n's survivors decoded into vc (inner.K + 16 floats, the padding zeroed).
inline void survivors(const SparseWeight& s, int64_t n, float* vc) {
    decode(s.inner, n, n + 1, vc, s.inner.K);
    _mm512_storeu_ps(vc + s.inner.K, _mm512_setzero_ps());
}

// 2:4, the full chunks: instead of expanding the weights, A is gathered at the survivors' positions
// (one two-register permute per row and 16 survivors, then one FMA).  The permute's indices come from
// the step's 8 pattern indices (24 bits of the mask stream, broadcast to every lane and shifted so
// lane j holds its run's index), looked up in a register table of each pattern's two positions.  A run
// with an invalid index (6, 7) contributes nothing, as in the expanding paths.
template <int B, int R>
void sparse_24_chunks(const SparseWeight& s, int64_t n, const float* A, int64_t lda, float part[R]) {
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    // lane j: survivor j of 16 = survivor j % 2 of run j / 2
    const __m512i shift = _mm512_setr_epi32(0, 0, 3, 3, 6, 6, 9, 9, 12, 12, 15, 15, 18, 18, 21, 21);
    const __m512i second = _mm512_setr_epi32(0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    // patterns (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): first positions at entries 0..5, second at 8..13
    const __m512i pos = _mm512_setr_epi32(0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 3, 2, 3, 3, 0, 0);
    __m512 acc[R][2];   // two chains: even and odd steps
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    survivor_steps<B>(s, n, 0, s.inner.K / BQ_CHUNK, [&](int64_t u, __m512 v, auto ic) BQ_INLINE {
        constexpr int h = decltype(ic)::value & 1;
        const uint32_t f = runs24(mrow, s.mask_bytes, 4 * u);   // the step's 8 runs
        const __m512i p = _mm512_srlv_epi32(_mm512_set1_epi32(int(f)), shift);   // lane j: index in bits 0-2
        const __m512i idx = _mm512_add_epi32(
            _mm512_permutexvar_epi32(_mm512_ternarylogic_epi32(p, _mm512_set1_epi32(7), second, 0xEA), pos), base);
        if (f & (f >> 1) & 0x492492u)   // some run's index is 6 or 7 (bits 1 and 2 set): zero its survivors
            v = _mm512_maskz_mov_ps(_mm512_cmplt_epu32_mask(_mm512_and_si512(p, _mm512_set1_epi32(7)), _mm512_set1_epi32(6)), v);
        for (int i = 0; i < R; ++i) {
            const __m512 ag = _mm512_permutex2var_ps(_mm512_loadu_ps(A + i * lda + 16 * u), idx,
                                                     _mm512_loadu_ps(A + i * lda + 16 * u + 16));
            acc[i][h] = _mm512_fmadd_ps(ag, v, acc[i][h]);
        }
    });
    for (int i = 0; i < R; ++i) part[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

// R rows of A against column n: the fused full chunks where half survive, then the rest from vc.
template <int B, int R>
void sparse_rows(const SparseWeight& s, const SparseFields& e, int64_t n, bool half, float* vc, const float* A, int64_t lda,
                 float* Y, int64_t ldy) {
    float part[R] = {};
    int64_t chunks = 0;   // of survivors, done fused
    if (half) {
        chunks = s.inner.K / BQ_CHUNK;
        if (s.keep == 2 && s.of == 4) sparse_24_chunks<B, R>(s, n, A, lda, part);
        else sparse_half_chunks<B, R>(s, e, n, A, lda, part);
        if (s.inner.K == chunks * BQ_CHUNK) {   // nothing after them
            for (int i = 0; i < R; ++i) Y[i * ldy] = part[i];
            return;
        }
        decode_rows(s.inner, n, n + 1, vc, s.inner.K, chunks, chunks, true);   // the survivors after them
        _mm512_storeu_ps(vc + s.inner.K, _mm512_setzero_ps());
    }
    sparse_dot<R>(s, e, n, vc, A, lda, Y, ldy, chunks * 2 * BQ_CHUNK / 16, part);
}

// Per column: the survivors decoded once (or fused, where half survive), then A's rows in blocks of 4.
void sparse_gemv(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
                 int64_t n1) {
    if (8 % s.of) return sparse_gemv_scalar(s, A, M, lda, Y, ldy, n0, n1);
    const SparseFields& e = sparse_fields(s.keep, s.of);
    const bool half = 2 * s.keep == s.of && !s.inner.is_lut;
    float* vc = scratch(2, size_t(s.inner.K + 16));
    with_format(s.inner, [&](auto b, auto) {
        constexpr int B = b.value;
        using RowsFn = void (*)(const SparseWeight&, const SparseFields&, int64_t, bool, float*, const float*, int64_t, float*,
                                int64_t);
        constexpr RowsFn rows[5] = {nullptr, sparse_rows<B, 1>, sparse_rows<B, 2>, sparse_rows<B, 3>, sparse_rows<B, 4>};
        for (int64_t n = n0; n < n1; ++n) {
            if (!half) survivors(s, n, vc);
            for (int64_t m = 0; m < M; m += 4)
                rows[std::min<int64_t>(4, M - m)](s, e, n, half, vc, A + m * lda, lda, Y + m * ldy + n, ldy);
        }
    });
}

// Weights [kb, ke) of sparse row n (kb a multiple of 16), dense, into dst[kb, ke) (and, where `of`
// does not divide 16, the rest of the runs the range cuts); vc: scratch of inner.K + 16 floats.  Only
// the range's survivors are decoded where they start and end on chunks of the survivors' codes (2:4,
// 4:8, 6:8 at the GEMM's K slices), else the whole row's.
void sparse_expand(const SparseWeight& s, int64_t n, float* vc, float* dst, int64_t kb, int64_t ke) {
    const QWeight& w = s.inner;
    const int64_t full = w.K / BQ_CHUNK;
    const bool to_end = ke == s.K;
    if (2 * s.keep == s.of && 8 % s.of == 0 && !w.is_lut && kb % (2 * BQ_CHUNK) == 0) {   // 1:2, 2:4, 4:8: fused
        const int64_t cb = kb / (2 * BQ_CHUNK), ce = std::min(full, ke / (2 * BQ_CHUNK));
        const SparseFields& e = sparse_fields(s.keep, s.of);
        with_format(w, [&](auto b, auto) {
            survivor_steps<b.value>(s, n, cb, ce, [&](int64_t u, __m512 v, auto) BQ_INLINE {
                __m512 w0, w1;
                expand32(s, e, n, u, v, w0, w1);
                _mm512_storeu_ps(dst + 16 * u, w0);
                _mm512_storeu_ps(dst + 16 * u + 16, w1);
            });
        });
        kb = std::max(kb, ce * 2 * BQ_CHUNK);
        if (kb >= ke) return;
    }
    const bool whole_runs = kb % s.of == 0 && ke % s.of == 0;
    const int64_t sb = kb / s.of * s.keep, se = ke / s.of * s.keep;   // survivors, where whole_runs
    if (whole_runs && sb % BQ_CHUNK == 0 && (to_end || se % BQ_CHUNK == 0))
        decode_rows(w, n, n + 1, vc, w.K, sb / BQ_CHUNK, to_end ? full : se / BQ_CHUNK, to_end);
    else
        decode_rows(w, n, n + 1, vc, w.K, 0, full, true);
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    if (8 % s.of) {   // run by run: every run the range touches
        const int64_t r0 = kb / s.of;
        return sparse_expand_runs(s, n, vc, dst + r0 * s.of, r0, (ke + s.of - 1) / s.of);
    }
    const SparseFields& e = sparse_fields(s.keep, s.of);
    const int64_t ue = ke / 16;
    const unsigned lo = (1u << e.bits) - 1;
    for (int64_t u = kb / 16; u < ue; ++u) {
        const unsigned f = unit_fields(mrow, s.mask_bytes, e.bits, u, 1);
        _mm512_storeu_ps(dst + 16 * u, expand16(e, f & lo, f >> e.bits, _mm512_loadu_ps(vc + u * 2 * e.used)));
    }
    sparse_expand_runs(s, n, vc, dst + ue * 16, ue * 16 / s.of, ke / s.of);   // the K % 16 weights
}

// The dense GEMM's panels, each slice filled from its 16 columns' weights in that slice, expanded
// just before (in L1/L2, as the dense decode fills them).
void sparse_gemm(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
                 int64_t n1) {
    float* vc = scratch(3, size_t(s.inner.K + 16));
    float* T = scratch(2, size_t(16 * s.K));
    gemm_panels(s.K, A, M, lda, Y, ldy, n0, n1, [&](int64_t c0, int64_t c1, float* S, int64_t kb, int64_t ke) {
        for (int64_t n = c0; n < c1; ++n) sparse_expand(s, n, vc, T + (n - c0) * s.K, kb, ke);
        panel_from_rows(T, s.K, int(c1 - c0), S, kb, kb, ke);
    });
}

}  // namespace

const Kernels* kernels_avx512() {
    // GEMV/GEMM switch by bits, measured as for AVX2 (kernels_avx2.cpp): b = 3 (lut3, u3-g32) on
    // 4096x4096 the GEMV wins up to M = 8 (lut3 3.5 vs 4.1 ms) and ties at 12; on weights that stay in
    // cache (1024x1024, 384x1536) the GEMM wins from M = 4-6 by 5-20%, but there the packed ops lose to
    // fp32 anyway and `auto` unpacks them, so the large weights decide: 8.  b = 4 (u4-g32, two-register
    // tables): equal at M = 4 (3.9 ms both), GEMM beyond: 4.  b = 1, 2 like 3; b >= 5 like 4.
    static const Kernels k{"avx512", decode, gemv, gemm, 96, {0, 8, 8, 8, 4, 4, 4, 4, 4}, sparse_gemv, sparse_gemm};
    return &k;
}

}  // namespace bq

#else
#include "kernels.h"
namespace bq {
const Kernels* kernels_avx512() { return nullptr; }
}  // namespace bq
#endif
