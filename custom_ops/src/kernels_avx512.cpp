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
            const __m512 z = _mm512_set1_ps(float(zero_point(w, n, g)));
            const __m512 sc = _mm512_set1_ps(w.scales[n * w.G + g]);
            if constexpr (B <= 5) {
                t[0] = _mm512_mul_ps(_mm512_sub_ps(iota<B>(0), z), sc);
                if constexpr (B == 5) t[1] = _mm512_mul_ps(_mm512_sub_ps(iota<B>(1), z), sc);
            } else {
                t[0] = z;
                t[1] = sc;
            }
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

// ---- fused GEMV: MR rows x NC columns starting at column n ----------------------------------------
// LUT: acc += a * lut[q] with the group's table in registers.  Affine: the table is q * scale (one
// multiply per group), and sum_g scale*zp*sum_{k in g} a (SA: per row and group, computed once per
// call) is subtracted at the end: per step the same three instructions as the LUT.
template <int B, int MR>
inline void zp_correction(const QWeight& w, int64_t n, const float* SA, int64_t ldsa, float out[MR]) {
    const int64_t G = w.G;
    const float* s = w.scales + n * G;
    __m512 cv[MR];
    for (int m = 0; m < MR; ++m) cv[m] = _mm512_setzero_ps();
    // 16 zero points = 2*B bytes of the stream: broadcast them to every 128-bit lane, pshufb the two
    // bytes holding zero point i into 32-bit lane i, shift by its bit offset, mask
    alignas(64) int8_t idx[64];
    alignas(64) int32_t sh[16];
    for (int i = 0; i < 16; ++i) {
        idx[4 * i] = int8_t(i * B / 8);
        idx[4 * i + 1] = int8_t(i * B / 8 + 1);
        idx[4 * i + 2] = idx[4 * i + 3] = int8_t(-128);
        sh[i] = (i * B) % 8;
    }
    const __m512i vidx = _mm512_load_si512(idx), vsh = _mm512_load_si512(sh), vmask = _mm512_set1_epi32((1 << B) - 1);
    const uint8_t* zrow = w.zp ? w.zp + n * w.zp_bytes : nullptr;
    for (int64_t g0 = 0; g0 < G; g0 += 16) {  // the last 16 groups or fewer: masked loads
        const int cnt = int(std::min<int64_t>(16, G - g0));
        const __mmask16 lanes = __mmask16((1u << cnt) - 1);
        __m512 z;
        if (zrow) {
            const int64_t b0 = g0 * B / 8, nbytes = std::min<int64_t>(2 * B, w.zp_bytes - b0);
            const __m512i raw = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), zrow + b0));
            z = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(raw, vidx), vsh), vmask));
        } else {
            z = _mm512_set1_ps(float(1 << (B - 1)));
        }
        const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, s + g0), z);
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
void decode_t(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    const int64_t K = w.K, full = K / BQ_CHUNK, spg = steps_per_group(w);
    const int L = int((K % BQ_CHUNK) / BQ_STEPS), r = int(K % BQ_STEPS);
    Table<B, LUT ? Mode::Lut : Mode::Affine> tab;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = row_of(w, n);
        float* d = dst + (n - n0) * ld;
        int64_t left = 0, g = -1;
        for (int64_t c = 0; c < full; ++c) {
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
        if (L) {
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
        for (int i = 0; i < r; ++i) {
            const int64_t k = K - r + i;
            d[k] = value(w, n, group_of(w, k), bq_stream_at(row + (K - r) * B / 8, B, i));
        }
    }
}

// ---- GEMM micro-kernel on decoded columns: 32 rows (two vectors of A^T) x NR columns ----------------
// K is cut into panels of KC so that the A^T panel (KC x 32 floats, 16 KB) stays in L1 while every
// column group of the task streams past it; partial sums live in a small buffer between panels.
constexpr int64_t KC = 128, NBMAX = 32;

template <int NR>
inline void micro(const float* At, int64_t kc, const float* Wd, int64_t ldw, float* C, bool first) {
    __m512 c0[NR], c1[NR];
    for (int j = 0; j < NR; ++j) {
        c0[j] = first ? _mm512_setzero_ps() : _mm512_load_ps(C + j * 32);
        c1[j] = first ? _mm512_setzero_ps() : _mm512_load_ps(C + j * 32 + 16);
    }
    const float* wc[NR];
    for (int j = 0; j < NR; ++j) wc[j] = Wd + j * ldw;
    for (int64_t k = 0; k < kc; ++k) {
        const __m512 a0 = _mm512_load_ps(At + k * 32), a1 = _mm512_load_ps(At + k * 32 + 16);
        for (int j = 0; j < NR; ++j) {
            const __m512 b = _mm512_set1_ps(wc[j][k]);
            c0[j] = _mm512_fmadd_ps(a0, b, c0[j]);
            c1[j] = _mm512_fmadd_ps(a1, b, c1[j]);
        }
    }
    for (int j = 0; j < NR; ++j) {
        _mm512_store_ps(C + j * 32, c0[j]);
        _mm512_store_ps(C + j * 32 + 16, c1[j]);
    }
}

void gemm(const float* At, int64_t K, const float* Wd, int64_t ldw, int64_t nb, float* Y, int64_t ldy,
          int64_t m_valid) {
    alignas(64) float acc[NBMAX * 32];
    for (int64_t j0 = 0; j0 < nb; j0 += NBMAX) {
        const int64_t nj = std::min(NBMAX, nb - j0);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = std::min(KC, K - k0);
            const float* w = Wd + j0 * ldw + k0;
            int64_t j = 0;
            for (; j + 8 <= nj; j += 8) micro<8>(At + k0 * 32, kc, w + j * ldw, ldw, acc + j * 32, k0 == 0);
            for (; j + 4 <= nj; j += 4) micro<4>(At + k0 * 32, kc, w + j * ldw, ldw, acc + j * 32, k0 == 0);
            for (; j < nj; ++j) micro<1>(At + k0 * 32, kc, w + j * ldw, ldw, acc + j * 32, k0 == 0);
        }
        for (int64_t i = 0; i < m_valid; ++i)  // row by row: Y's rows are far apart, acc is in L1
            for (int64_t j = 0; j < nj; ++j) Y[i * ldy + j0 + j] = acc[j * 32 + i];
    }
}

// ---- dispatch on (bits, format) ----------------------------------------------------------------------
template <bool LUT>
void gemv_d(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
            const float* SA) {
    switch (w.bits) {
        case 1: return gemv_t<1, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        case 2: return gemv_t<2, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        case 3: return gemv_t<3, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        case 4: return gemv_t<4, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        case 5: return gemv_t<5, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        case 6: return gemv_t<6, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        case 7: return gemv_t<7, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
        default: return gemv_t<8, LUT>(w, A, M, lda, Y, ldy, n0, n1, SA);
    }
}

template <bool LUT>
void decode_d(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    switch (w.bits) {
        case 1: return decode_t<1, LUT>(w, n0, n1, dst, ld);
        case 2: return decode_t<2, LUT>(w, n0, n1, dst, ld);
        case 3: return decode_t<3, LUT>(w, n0, n1, dst, ld);
        case 4: return decode_t<4, LUT>(w, n0, n1, dst, ld);
        case 5: return decode_t<5, LUT>(w, n0, n1, dst, ld);
        case 6: return decode_t<6, LUT>(w, n0, n1, dst, ld);
        case 7: return decode_t<7, LUT>(w, n0, n1, dst, ld);
        default: return decode_t<8, LUT>(w, n0, n1, dst, ld);
    }
}

void gemv(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
          const float* SA) {
    if (w.is_lut) gemv_d<true>(w, A, M, lda, Y, ldy, n0, n1, SA);
    else gemv_d<false>(w, A, M, lda, Y, ldy, n0, n1, SA);
}

void decode(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    if (w.is_lut) decode_d<true>(w, n0, n1, dst, ld);
    else decode_d<false>(w, n0, n1, dst, ld);
}

}  // namespace

const Kernels* kernels_avx512() {
    static const Kernels k{"avx512", decode, gemv, gemm, 32, 16};
    return &k;
}

}  // namespace bq

#else
#include "kernels.h"
namespace bq {
const Kernels* kernels_avx512() { return nullptr; }
}  // namespace bq
#endif
