// AVX2 + FMA kernels: a 16-lane chunk step is two 8-lane halves.  The table lookup is one vpermps for
// b <= 3 (it reads the low 3 index bits; smaller tables are replicated), two and a blend for b = 4,
// a gather beyond that (LUT) or a conversion of q (affine).  A partial chunk (fewer than 16 lanes) is
// first copied into a zero-padded 16-lane chunk: AVX2 has no masked byte loads.
#if !defined(BAYESQ_NO_X86)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels.h"

#define BQ_INLINE __attribute__((always_inline))

namespace bq {
namespace {

template <int W>
inline __m256i plane(const uint8_t* p) {  // 8 lanes of W bytes, zero-extended to 32 bits
    if constexpr (W == 4) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    else if constexpr (W == 2) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

struct Words {
    __m256i lo, hi;
};

// Lanes 8h..8h+7 of a full chunk (16 lanes, NB bytes per lane; planes 4/2/1 as in layout.h).
template <int NB>
inline Words words(const uint8_t* p, int h) {
    constexpr int L = BQ_LANES;
    Words w;
    w.hi = _mm256_setzero_si256();
    if constexpr (NB == 1) {
        w.lo = plane<1>(p + 8 * h);
    } else if constexpr (NB == 2) {
        w.lo = plane<2>(p + 16 * h);
    } else if constexpr (NB == 3) {
        w.lo = _mm256_or_si256(plane<2>(p + 16 * h), _mm256_slli_epi32(plane<1>(p + 2 * L + 8 * h), 16));
    } else {
        w.lo = plane<4>(p + 32 * h);
        const uint8_t* q = p + 4 * L;
        if constexpr (NB == 5) w.hi = plane<1>(q + 8 * h);
        if constexpr (NB == 6) w.hi = plane<2>(q + 16 * h);
        if constexpr (NB == 7)
            w.hi = _mm256_or_si256(plane<2>(q + 16 * h), _mm256_slli_epi32(plane<1>(q + 2 * L + 8 * h), 16));
        if constexpr (NB == 8) w.hi = plane<4>(q + 32 * h);
    }
    return w;
}

template <int B, int I>
inline __m256i code(const Words& w) {
    constexpr int o = B * I;
    if constexpr (o + B <= 32) return o ? _mm256_srli_epi32(w.lo, o) : w.lo;
    else if constexpr (o >= 32) return o > 32 ? _mm256_srli_epi32(w.hi, o - 32) : w.hi;
    else return _mm256_or_si256(_mm256_srli_epi32(w.lo, o), _mm256_slli_epi32(w.hi, 32 - o));
}

// A partial chunk (L < 16 lanes) re-laid as a full one, lanes >= L zero.
inline void widen(const uint8_t* src, int L, int B, uint8_t* dst) {
    std::memset(dst, 0, size_t(BQ_LANES) * B);
    int off_s = 0, off_d = 0, rem = B;
    while (rem > 0) {
        const int w = rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
        std::memcpy(dst + off_d, src + off_s, size_t(L) * w);
        off_s += L * w;
        off_d += BQ_LANES * w;
        rem -= w;
    }
}

// LUT entries; affine values (q - zp) * s (decode); or, with CODES, q * s (the affine GEMV, which
// subtracts the zero points' share once at the end).
template <int B, bool LUT, bool CODES = false>
struct Table {
    __m256 t0, t1, zp, s;
    const float* base = nullptr;

    static inline __m256 iota(int half) {  // entry j's code: j mod 2^b (b <= 3: replicated), or j + 8 half
        if constexpr (B == 1) return _mm256_setr_ps(0, 1, 0, 1, 0, 1, 0, 1);
        else if constexpr (B == 2) return _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3);
        else return half ? _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15) : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    }

    inline void load(const QWeight& w, int64_t n, int64_t g) {
        if constexpr (LUT) {
            const float* p = w.lut + ((n * w.G + g) << B);
            if constexpr (B == 1) {
                t0 = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(p)));
            } else if constexpr (B == 2) {
                t0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
            } else if constexpr (B == 3) {
                t0 = _mm256_loadu_ps(p);
            } else if constexpr (B == 4) {
                t0 = _mm256_loadu_ps(p);
                t1 = _mm256_loadu_ps(p + 8);
            } else {
                base = p;
            }
        } else if constexpr (CODES) {
            s = _mm256_set1_ps(w.scales[n * w.G + g]);
            if constexpr (B <= 4) {
                t0 = _mm256_mul_ps(iota(0), s);
                if constexpr (B == 4) t1 = _mm256_mul_ps(iota(1), s);
            }
        } else {
            load_zp(w, n, g, float(zero_point(w, n, g)));
        }
    }

    // affine values with the zero point given (already extracted)
    inline void load_zp(const QWeight& w, int64_t n, int64_t g, float zpf) {
        const __m256 z = _mm256_set1_ps(zpf), sc = _mm256_set1_ps(w.scales[n * w.G + g]);
        if constexpr (B <= 4) {
            t0 = _mm256_mul_ps(_mm256_sub_ps(iota(0), z), sc);
            if constexpr (B == 4) t1 = _mm256_mul_ps(_mm256_sub_ps(iota(1), z), sc);
        } else {
            zp = z;
            s = sc;
        }
    }

    inline __m256 get(__m256i c) const {
        if constexpr (B <= 3) {
            return _mm256_permutevar8x32_ps(t0, c);
        } else if constexpr (B == 4) {
            const __m256 lo = _mm256_permutevar8x32_ps(t0, c), hi = _mm256_permutevar8x32_ps(t1, c);
            return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // bit 3 -> sign
        } else if constexpr (LUT) {
            return _mm256_i32gather_ps(base, _mm256_and_si256(c, _mm256_set1_epi32((1 << B) - 1)), 4);
        } else {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32((1 << B) - 1)));
            if constexpr (CODES) return _mm256_mul_ps(q, s);
            else return _mm256_mul_ps(_mm256_sub_ps(q, zp), s);
        }
    }
};

template <class F, int... I>
BQ_INLINE inline void unroll(F&& f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}

inline int64_t steps_per_group(const QWeight& w) {
    return (w.block == 0 || w.block >= w.K) ? std::numeric_limits<int64_t>::max() : w.block / BQ_LANES;
}

inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

inline __m256i half_mask(int L, int h) {  // lanes 8h.. of a chunk with L lanes
    alignas(32) int32_t m[8];
    for (int i = 0; i < 8; ++i) m[i] = (8 * h + i < L) ? -1 : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
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

// ---- fused GEMV (the affine scheme of kernels_avx512.cpp: tables q * s, zero points at the end) -------
// MR rows x NC columns per block: each weight vector is decoded once (a shift and a one-register
// lookup for b <= 3) and feeds MR FMAs.  An FMA has 4 cycles of latency and two issue per cycle, so 8
// independent chains keep them busy: where MR * NC is smaller, each output has P chains (one per chunk
// half).  K is cut into slices of GEMV_KS chunks (1024 k): 4 rows of A (16 KB) stay in L1 while a
// task's columns pass; each output adds its slices' sums in order (the order depends on K and M only).
constexpr int64_t GEMV_KS = 8;
constexpr int GEMV_MR = 4;
constexpr int64_t GEMV_PREFETCH = 2048;  // bytes ahead in a column's codes  // rows per block (then 3, 2 or 1 for the rest)

template <int B, bool LUT, int MR, int NC, int P>
void gemv_block(const QWeight& w, const float* A, int64_t lda, float* Y, int64_t ldy, int64_t n, int64_t cb,
                int64_t ce, bool tail, bool first) {
    const int64_t K = w.K, full = K / BQ_CHUNK;
    __m256 acc[MR][NC][P];
    float extra[MR][NC] = {};
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NC; ++j)
            for (int p = 0; p < P; ++p) acc[m][j][p] = _mm256_setzero_ps();
    Table<B, LUT, !LUT> tab[NC];
    const uint8_t* row[NC];
    for (int j = 0; j < NC; ++j) row[j] = row_of(w, n + j);
    const int64_t spg = steps_per_group(w);
    int64_t left = 0, g = -1;

    auto enter = [&](int64_t gn) BQ_INLINE {
        for (int j = 0; j < NC; ++j) tab[j].load(w, n + j, gn);
        g = gn;
    };
    if (cb > 0 && cb < ce) start_group(spg, cb, g, left, enter);
    auto scalar = [&](int j, int64_t k, int q) BQ_INLINE {
        const int64_t gk = group_of(w, k);
        const float v = LUT ? value(w, n + j, gk, q) : float(q) * w.scales[(n + j) * w.G + gk];
        for (int m = 0; m < MR; ++m) extra[m][j] += A[m * lda + k] * v;
    };
    // one step of a (possibly widened) chunk: lanes at a + 8h
    auto step = [&](const Words (&wd)[NC][2], const float* a, auto ic, const __m256i* msk) BQ_INLINE {
        constexpr int I = decltype(ic)::value;
        for (int h = 0; h < 2; ++h) {
            __m256 av[MR];
            for (int m = 0; m < MR; ++m)
                av[m] = msk ? _mm256_maskload_ps(a + m * lda + 8 * h, msk[h]) : _mm256_loadu_ps(a + m * lda + 8 * h);
            for (int j = 0; j < NC; ++j) {
                const __m256 v = tab[j].get(code<B, I>(wd[j][h]));
                for (int m = 0; m < MR; ++m) acc[m][j][h % P] = _mm256_fmadd_ps(av[m], v, acc[m][j][h % P]);
            }
        }
    };

    for (int64_t c = cb; c < ce; ++c) {
        Words wd[NC][2];
        for (int j = 0; j < NC; ++j) {
            // the codes stream from memory at a few GB/s without this (measured: the word loads stalled);
            // past the row's end it fetches the next rows, read next
            _mm_prefetch(reinterpret_cast<const char*>(row[j] + c * BQ_LANES * B + GEMV_PREFETCH), _MM_HINT_T0);
            for (int h = 0; h < 2; ++h) wd[j][h] = words<B>(row[j] + c * BQ_LANES * B, h);
        }
        unroll([&](auto ic) BQ_INLINE {
            if (left == 0) {
                enter(g + 1);
                left = spg;
            }
            --left;
            step(wd, A + c * BQ_CHUNK + BQ_LANES * decltype(ic)::value, ic, nullptr);
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }

    const int L = tail ? int((K % BQ_CHUNK) / BQ_STEPS) : 0;
    if (L) {
        const int64_t k0 = full * BQ_CHUNK;
        const __m256i msk[2] = {half_mask(L, 0), half_mask(L, 1)};
        Words wd[NC][2];
        alignas(32) uint8_t buf[BQ_LANES * BQ_MAX_BITS + 32];
        for (int j = 0; j < NC; ++j) {
            widen(row[j] + k0 * B / 8, L, B, buf);
            for (int h = 0; h < 2; ++h) wd[j][h] = words<B>(buf, h);
        }
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            const int64_t kk = k0 + int64_t(L) * I, gf = group_of(w, kk);
            if (gf != group_of(w, kk + L - 1)) {
                for (int j = 0; j < NC; ++j)
                    for (int l = 0; l < L; ++l) scalar(j, kk + l, bq_code_at(row[j], K, B, kk + l));
                return;
            }
            if (gf != g) enter(gf);
            step(wd, A + kk, ic, msk);
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }

    const int r = tail ? int(K % BQ_STEPS) : 0;
    for (int i = 0; i < r; ++i)
        for (int j = 0; j < NC; ++j) scalar(j, K - r + i, bq_stream_at(row[j] + (K - r) * B / 8, B, i));

    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NC; ++j) {
            __m256 s = acc[m][j][0];
            if constexpr (P == 2) s = _mm256_add_ps(s, acc[m][j][1]);
            const float y = hsum(s) + extra[m][j];
            float& out = Y[m * ldy + n + j];
            out = first ? y : out + y;
        }
}

template <int B, bool LUT, int MR>
void gemv_rows(const QWeight& w, const float* A, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
               int64_t cb, int64_t ce, bool tail, bool first) {
    constexpr int P = MR <= 2 ? 2 : 1;  // 2 columns x MR rows x P chains: 6 or 8 chains
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) gemv_block<B, LUT, MR, 2, P>(w, A, lda, Y, ldy, n, cb, ce, tail, first);
    for (; n < n1; ++n) gemv_block<B, LUT, MR, 1, 2>(w, A, lda, Y, ldy, n, cb, ce, tail, first);
}

// A row's zero points, 8 groups at a time: 8 zero points are B bytes of the stream; broadcast 16 bytes
// to both 128-bit lanes, pshufb the two bytes holding zero point i into 32-bit lane i, shift by its bit
// offset, mask.
template <int B>
struct ZeroPoints {
    __m256i vidx, vsh;
    ZeroPoints() {
        alignas(32) int8_t idx[32];
        alignas(32) int32_t sh[8];
        for (int i = 0; i < 8; ++i) {
            idx[4 * i] = int8_t(i * B / 8);
            idx[4 * i + 1] = int8_t(i * B / 8 + 1);
            idx[4 * i + 2] = idx[4 * i + 3] = int8_t(-128);
            sh[i] = (i * B) % 8;
        }
        vidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
        vsh = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
    }
    // groups g0 .. g0 + 7 of row n (g0 a multiple of 8) as floats; lanes past G: garbage
    inline __m256 get(const QWeight& w, int64_t n, int64_t g0) const {
        if (!w.zp) return _mm256_set1_ps(float(1 << (B - 1)));
        const uint8_t* z = w.zp + n * w.zp_bytes + g0 * B / 8;
        // bytes past the row belong to the next rows (their zero points land in lanes past G, whose
        // scales are masked to 0); only the last row's end is copied, not to read past the tensor
        const int64_t avail = (w.N - n) * w.zp_bytes - g0 * B / 8;
        __m128i raw;
        if (avail >= 16) {
            raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z));
        } else {
            alignas(16) uint8_t buf[16] = {};
            for (int64_t i = 0; i < avail; ++i) buf[i] = z[i];
            raw = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
        }
        const __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), vidx);
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, vsh), _mm256_set1_epi32((1 << B) - 1)));
    }
};

inline __m256i first_lanes(int64_t cnt) {  // lanes < cnt set
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(cnt, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Y[m, n] -= sum_g scale[n, g] * zp[n, g] * SA[m, g]: the zero points' share of the affine GEMV.
template <int B>
void zp_correct(const QWeight& w, const float* SA, int64_t M, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t G = w.G;
    const ZeroPoints<B> zps;
    for (int64_t n = n0; n < n1; ++n) {
        const float* s = w.scales + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mr = int(std::min<int64_t>(4, M - m0));
            __m256 cv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g0 = 0; g0 < G; g0 += 8) {
                const __m256i lanes = first_lanes(G - g0);
                const __m256 sz = _mm256_mul_ps(_mm256_maskload_ps(s + g0, lanes), zps.get(w, n, g0));
                for (int m = 0; m < mr; ++m)
                    cv[m] = _mm256_fmadd_ps(sz, _mm256_maskload_ps(SA + (m0 + m) * G + g0, lanes), cv[m]);
            }
            for (int m = 0; m < mr; ++m) Y[(m0 + m) * ldy + n] -= hsum(cv[m]);
        }
    }
}

template <int B, bool LUT>
void gemv_t(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
            int64_t n1, const float* SA) {
    const int64_t full = w.K / BQ_CHUNK;
    // one or two rows of A fit L1 whole: no slices, which would break the code streams' prefetch
    const int64_t ks = M <= 2 ? std::max<int64_t>(full, 1) : GEMV_KS;
    for (int64_t cb = 0; cb == 0 || cb < full; cb += ks) {  // K < 128: one pass, the tail only
        const int64_t ce = std::min(full, cb + ks);
        const bool first = cb == 0, tail = ce == full;
        int64_t m = 0;
        for (; m + GEMV_MR <= M; m += GEMV_MR)
            gemv_rows<B, LUT, GEMV_MR>(w, A + m * lda, lda, Y + m * ldy, ldy, n0, n1, cb, ce, tail, first);
        const int64_t rest = M - m;
        const float* a = A + m * lda;
        float* y = Y + m * ldy;
        if (rest == 3) gemv_rows<B, LUT, 3>(w, a, lda, y, ldy, n0, n1, cb, ce, tail, first);
        else if (rest == 2) gemv_rows<B, LUT, 2>(w, a, lda, y, ldy, n0, n1, cb, ce, tail, first);
        else if (rest == 1) gemv_rows<B, LUT, 1>(w, a, lda, y, ldy, n0, n1, cb, ce, tail, first);
    }
    if constexpr (!LUT) zp_correct<B>(w, SA, M, Y, ldy, n0, n1);
}

// ---- decode --------------------------------------------------------------------------------------
template <int B, bool LUT>
void decode_t(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld, int64_t cb, int64_t ce, bool tail) {
    const int64_t K = w.K, full = K / BQ_CHUNK, spg = steps_per_group(w);
    const int L = int((K % BQ_CHUNK) / BQ_STEPS), r = int(K % BQ_STEPS);
    Table<B, LUT> tab;
    alignas(32) float tmp[BQ_LANES];
    alignas(32) uint8_t buf[BQ_LANES * BQ_MAX_BITS + 32];
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = row_of(w, n);
        float* d = dst + (n - n0) * ld;
        int64_t left = 0, g = -1;  // steps left in group g (then the next group is loaded)
        if (cb > 0) {
            const bool one = spg == std::numeric_limits<int64_t>::max();
            g = one ? 0 : cb * BQ_STEPS / spg;
            left = one ? spg : spg - cb * BQ_STEPS % spg;
            tab.load(w, n, g);
        }
        for (int64_t c = cb; c < ce; ++c) {
            const Words wd[2] = {words<B>(row + c * BQ_LANES * B, 0), words<B>(row + c * BQ_LANES * B, 1)};
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                if (left == 0) {
                    tab.load(w, n, ++g);
                    left = spg;
                }
                --left;
                for (int h = 0; h < 2; ++h)
                    _mm256_storeu_ps(d + c * BQ_CHUNK + BQ_LANES * I + 8 * h, tab.get(code<B, I>(wd[h])));
            }, std::make_integer_sequence<int, BQ_STEPS>{});
        }
        if (tail && L) {
            const int64_t k0 = full * BQ_CHUNK;
            widen(row + k0 * B / 8, L, B, buf);
            const Words wd[2] = {words<B>(buf, 0), words<B>(buf, 1)};
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                const int64_t kk = k0 + int64_t(L) * I, gf = group_of(w, kk);
                if (gf != group_of(w, kk + L - 1)) {
                    for (int l = 0; l < L; ++l) d[kk + l] = value(w, n, group_of(w, kk + l), bq_code_at(row, K, B, kk + l));
                    return;
                }
                if (gf != g) tab.load(w, n, g = gf);
                _mm256_store_ps(tmp, tab.get(code<B, I>(wd[0])));
                _mm256_store_ps(tmp + 8, tab.get(code<B, I>(wd[1])));
                std::memcpy(d + kk, tmp, size_t(L) * sizeof(float));
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

// ---- GEMM: the scheme of kernels_avx512.cpp, 8 wide ------------------------------------------------
// Panels of 4 columns; a vector holds 2 columns x 4 consecutive k (128-bit half L of vector x: column
// 2L + x), so a row's 4 activations are one 128-bit broadcast load.  6 rows x 2 vectors = 12
// accumulators, + 2 weight vectors + 1 broadcast = 15 of 16 registers.  Decoding is the plain
// column decode into a small buffer, then one 128-bit insert (a load and an ALU op) per vector.
// An element's sum order (4 chains per K pass of KC, passes in order) depends on K only.
constexpr int MR = 6;
constexpr int64_t KC = 1024;  // K per pass (a multiple of 128): a panel slice (4 x KC, 16 KB) fits L1


// Full chunks [cb, ce) of columns n0 + x and n0 + 2 + x (x = 0, 1), straight from the codes: each
// chunk step gives a column 8 consecutive k (one lookup, exact values); two vperm2f128 interleave the
// two columns' vectors by 128-bit halves into the panel's vectors of 4 k.  Columns past n1: zeros.
template <int B, bool LUT>
void pack_pairs(const QWeight& w, int64_t n0, int64_t n1, float* P, int64_t kb, int64_t cb, int64_t ce) {
    const int64_t spg = steps_per_group(w);
    for (int x = 0; x < 2; ++x) {
        const int64_t ca = n0 + x, cc = n0 + 2 + x;
        float* p0 = P + (cb * BQ_CHUNK - kb) / 4 * 16 + 8 * x;
        if (ca >= n1) {
            for (int64_t j = 0; j < (ce - cb) * (BQ_CHUNK / 4); ++j) _mm256_store_ps(p0 + 16 * j, _mm256_setzero_ps());
            continue;
        }
        const bool two = cc < n1;
        const uint8_t* ra = row_of(w, ca);
        const uint8_t* rc = row_of(w, two ? cc : ca);
        Table<B, LUT> ta, tc;
        // affine: the slice's zero points of both columns extracted 8 at a time beforehand (one
        // bit-stream read per group cost as much as the rest of the decode)
        float* zb = nullptr;
        if constexpr (!LUT) {
            const int64_t g0 = group_of(w, cb * BQ_CHUNK) / 8 * 8, g1 = group_of(w, ce * BQ_CHUNK - 1) + 1;
            zb = scratch(3, size_t(2 * (w.G + 8))) - g0;  // zb[g], zb[w.G + 8 + g]
            const ZeroPoints<B> zps;
            for (int64_t gg = g0; gg < g1; gg += 8) {
                _mm256_storeu_ps(zb + gg, zps.get(w, ca, gg));
                _mm256_storeu_ps(zb + w.G + 8 + gg, zps.get(w, two ? cc : ca, gg));
            }
        }
        int64_t left = 0, g = -1;
        auto load = [&](int64_t gg) BQ_INLINE {
            if constexpr (LUT) {
                ta.load(w, ca, gg);
                if (two) tc.load(w, cc, gg);
            } else {
                ta.load_zp(w, ca, gg, zb[gg]);
                if (two) tc.load_zp(w, cc, gg, zb[w.G + 8 + gg]);
            }
        };
        if (cb > 0) start_group(spg, cb, g, left, load);
        for (int64_t c = cb; c < ce; ++c) {
            const Words wa[2] = {words<B>(ra + c * BQ_LANES * B, 0), words<B>(ra + c * BQ_LANES * B, 1)};
            const Words wc[2] = {words<B>(rc + c * BQ_LANES * B, 0), words<B>(rc + c * BQ_LANES * B, 1)};
            float* p = p0 + (c - cb) * (BQ_CHUNK / 4) * 16;
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                if (left == 0) {
                    load(++g);
                    left = spg;
                }
                --left;
                for (int h = 0; h < 2; ++h) {
                    const __m256 va = ta.get(code<B, I>(wa[h]));
                    const __m256 vc = two ? tc.get(code<B, I>(wc[h])) : _mm256_setzero_ps();
                    _mm256_store_ps(p + (4 * I + 2 * h) * 16, _mm256_permute2f128_ps(va, vc, 0x20));
                    _mm256_store_ps(p + (4 * I + 2 * h + 1) * 16, _mm256_permute2f128_ps(va, vc, 0x31));
                }
            }, std::make_integer_sequence<int, BQ_STEPS>{});
        }
    }
}

void panel_from_rows(const float* T, int64_t K, int nc, float* P, int64_t kb, int64_t k, int64_t ke);

// Columns [n0, n1) (at most 4), k in [kb, ke) (kb a multiple of 128) as a panel slice:
// P[(j * 2 + x) * 8 + 4L + kk] = V[n0 + 2L + x, kb + 4j + kk]; columns past n1 and k past K are 0.
// Full chunks via pack_pairs; the partial chunk and the K % 8 codes are decoded to floats first.
void pack_panel(const QWeight& w, int64_t n0, int64_t n1, float* P, int64_t kb, int64_t ke) {
    const int64_t K = w.K, full = K / BQ_CHUNK, cb = kb / BQ_CHUNK, ce = std::min(full, ke / BQ_CHUNK);
    int64_t k = kb;
    if (cb < ce) {
        with_format(w, [&](auto b, auto lut) { pack_pairs<b.value, lut.value>(w, n0, n1, P, kb, cb, ce); });
        k = ce * BQ_CHUNK;
    }
    if (k == ke) return;
    float* T = scratch(2, size_t(4 * K));
    decode_rows(w, n0, n1, T, K, full, full, true);  // the tail only (k >= full * 128)
    panel_from_rows(T, K, int(n1 - n0), P, kb, k, ke);
}

// P's k in [k, ke) (P starting at kb) from `nc` <= 4 decoded rows T (nc x K): the layout above.
void panel_from_rows(const float* T, int64_t K, int nc, float* P, int64_t kb, int64_t k, int64_t ke) {
    for (; k < ke; k += 4) {
        const __m128i km = _mm_cmpgt_epi32(_mm_set1_epi32(int(std::min<int64_t>(4, K - k))), _mm_setr_epi32(0, 1, 2, 3));
        auto quad = [&](int c) { return c < nc ? _mm_maskload_ps(T + c * K + k, km) : _mm_setzero_ps(); };
        for (int x = 0; x < 2; ++x)
            _mm256_store_ps(P + ((k - kb) / 4 * 2 + x) * 8, _mm256_insertf128_ps(_mm256_castps128_ps256(quad(x)), quad(2 + x), 1));
    }
}

// Y tile (R rows x 4 columns, `cols` stored) (+)= A tile (R x kc, kc a multiple of 4) @ panel
// (kc x 4): 4 chains per element (k mod 4), summed at the end; the first pass stores, later ones add.
template <int R>
void micro(const float* A, int64_t lda, const float* P, int64_t kc, float* Y, int64_t ldy, __m128i cols, bool first) {
    __m256 c[R][2];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k += 4) {
        const __m256 b0 = _mm256_load_ps(P + k * 4), b1 = _mm256_load_ps(P + k * 4 + 8);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m256 a = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(A + i * lda + k));
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
        // half L, lane kk of c[i][x] -> element 2L + x: sum over kk, two pairwise levels
        const __m256 t = _mm256_add_ps(_mm256_unpacklo_ps(c[i][0], c[i][1]), _mm256_unpackhi_ps(c[i][0], c[i][1]));
        const __m256 u = _mm256_add_ps(t, _mm256_shuffle_ps(t, t, 0x4E));
        __m128 s = _mm256_castps256_ps128(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(u), 0x08)));
        if (!first) s = _mm_add_ps(_mm_maskload_ps(Y + i * ldy, cols), s);
        _mm_maskstore_ps(Y + i * ldy, cols, s);
    }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, __m128i, bool);
constexpr MicroFn micros[MR + 1] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};

// Loops as in kernels_avx512.cpp: K slices, blocks of rows (~96 KB of A), panels, row tiles.
// pack(c0, c1, S, kb, ke): columns [c0, c1)'s panel slice k in [kb, ke) into S.
template <class Pack>
void gemm_panels(int64_t K, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
                 Pack&& pack_panel) {
    const int64_t np = (n1 - n0 + 3) / 4;
    if (K % 4) A = pad_k4(A, M, lda, K, &lda);  // the micro-kernel reads 4 k at a time (rare shapes)
    const int64_t MB = (24 << 10) / std::min(K, KC) / MR * MR + MR;
    const bool reuse = MB < M;  // else one slice buffer serves every panel and stays in L1
    float* P = scratch(0, size_t((reuse ? np : 1) * KC * 4));
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t mb = 0; mb < M; mb += MB) {
            const int64_t me = std::min(M, mb + MB);
            for (int64_t p = 0; p < np; ++p) {
                const int64_t c0 = n0 + 4 * p, c1 = std::min(n1, c0 + 4);
                float* S = reuse ? P + p * KC * 4 : P;
                if (mb == 0) pack_panel(c0, c1, S, k0, k0 + kc);
                const __m128i cols = _mm_cmpgt_epi32(_mm_set1_epi32(int(c1 - c0)), _mm_setr_epi32(0, 1, 2, 3));
                for (int64_t m0 = mb; m0 < me; m0 += MR)
                    micros[std::min<int64_t>(MR, me - m0)](A + m0 * lda + k0, lda, S, (kc + 3) / 4 * 4,
                                                           Y + m0 * ldy + c0, ldy, cols, k0 == 0);
            }
        }
    }
}

void gemm(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
    gemm_panels(w.K, A, M, lda, Y, ldy, n0, n1,
                [&](int64_t c0, int64_t c1, float* S, int64_t kb, int64_t ke) { pack_panel(w, c0, c1, S, kb, ke); });
}

// ---- sparse weights ---------------------------------------------------------------------------------
// Eight consecutive weights (8 / of runs, of in 2, 4, 8) are one vpermps of the next 8 survivors' values
// and an AND.  Their runs' pattern indices are consecutive in the mask stream: read together as one
// field of 8 / of * pbits <= 7 bits (one stream read per 8 weights), it indexes a table of each
// weight's source lane and whether it survives.
struct Expand {
    std::vector<int32_t> perm, keep;   // 8 per field value
    int bits = 0, used = 0;            // field width; survivors per 8 weights
};

const Expand& expand_table(int keep, int of) {
    static const auto tables = [] {
        std::vector<Expand> t(9 * 9);
        for (int o : {2, 4, 8})
            for (int k = 1; k < o; ++k) {
                const SparseFields& f = sparse_fields(k, o);
                Expand& e = t[size_t(k * 9 + o)];
                e.bits = f.bits, e.used = f.used;
                for (size_t v = 0; v < f.expand.size(); ++v)
                    for (int j = 0, c = 0; j < 8; ++j) {
                        const bool in = (f.expand[v] >> j) & 1;
                        e.perm.push_back(in ? c++ : 0);
                        e.keep.push_back((f.kept[v] >> j) & 1 ? -1 : 0);
                    }
            }
        return t;
    }();
    return tables[size_t(keep * 9 + of)];
}

// Pattern field u of a mask row (expand_table's width `bits` <= 7): one unaligned 64-bit read where 8
// bytes are there, else the byte-wise stream read.
static inline int field_at(const uint8_t* mrow, int64_t mask_bytes, int bits, int64_t u) {
    const int64_t bit = u * bits;
    if ((bit >> 3) + 8 > mask_bytes) return bq_stream_at(mrow, bits, u);
    uint64_t w;
    std::memcpy(&w, mrow + (bit >> 3), 8);
    return int((w >> (bit & 7)) & ((1u << bits) - 1));
}

// Weights 8u .. 8u+7 of a row from its survivors v (the unit's first) and its field f.
static inline __m256 expand8(const Expand& e, const float* v, int f) {
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.perm.data() + 8 * f));
    const __m256 kept = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.keep.data() + 8 * f)));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(v), p), kept);
}

// Row n of the sparse weight, dense: vc holds the row's survivors and 8 readable floats past them.
void sparse_expand(const SparseWeight& s, int64_t n, const float* vc, float* dst) {
    if (8 % s.of) return sparse_expand_scalar(s, n, vc, dst);
    const Expand& e = expand_table(s.keep, s.of);
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    const int64_t units = s.K / 8;
    for (int64_t u = 0; u < units; ++u)
        _mm256_storeu_ps(dst + 8 * u, expand8(e, vc + u * e.used, field_at(mrow, s.mask_bytes, e.bits, u)));
    // the last runs (K % 8 is a multiple of of), one by one
    sparse_expand_runs(s, n, vc, dst + units * 8, units * 8 / s.of, s.K / s.of);
}

// Row n decoded (survivors, then expanded) into T; vc: scratch of inner.K + 8 floats.
void sparse_row(const SparseWeight& s, int64_t n, float* vc, float* T) {
    decode(s.inner, n, n + 1, vc, s.inner.K);
    _mm256_storeu_ps(vc + s.inner.K, _mm256_setzero_ps());
    sparse_expand(s, n, vc, T);
}

// R rows of A (R <= 4) against column n: each 8 weights expanded in a register and fed to R FMAs, two
// chains per row (even and odd units); the K % 8 runs after.  One summation order per K.
template <int R>
void sparse_dot(const SparseWeight& s, const Expand& e, int64_t n, const float* vc, const float* A, int64_t lda,
                float* Y, int64_t ldy, int64_t u0, const float part[R]) {
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    const int64_t units = s.K / 8;
    const uint64_t fmask = (uint64_t(1) << e.bits) - 1;
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    auto step = [&](int64_t u, int f0, int f1) BQ_INLINE {
        const __m256 w0 = expand8(e, vc + u * e.used, f0);
        const __m256 w1 = expand8(e, vc + (u + 1) * e.used, f1);
        for (int i = 0; i < R; ++i) {
            acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(A + i * lda + 8 * u), w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(A + i * lda + 8 * u + 8), w1, acc[i][1]);
        }
    };
    int64_t u = u0;
    // 8 units' fields (8 * bits <= 56 bits) from one 64-bit read, where 8 bytes are there
    for (; u + 8 <= units && (u * e.bits >> 3) + 8 <= s.mask_bytes; u += 8) {
        uint64_t w;
        std::memcpy(&w, mrow + (u * e.bits >> 3), 8);
        w >>= (u * e.bits) & 7;
        for (int j = 0; j < 8; j += 2) step(u + j, int((w >> (j * e.bits)) & fmask), int((w >> ((j + 1) * e.bits)) & fmask));
    }
    for (; u + 2 <= units; u += 2)
        step(u, bq_stream_at(mrow, e.bits, u), bq_stream_at(mrow, e.bits, u + 1));
    if (u < units) {
        const __m256 w0 = expand8(e, vc + u * e.used, bq_stream_at(mrow, e.bits, u));
        for (int i = 0; i < R; ++i) acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(A + i * lda + 8 * u), w0, acc[i][0]);
    }
    float tail[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};   // the K % 8 weights, expanded
    sparse_expand_runs(s, n, vc, tail, units * 8 / s.of, s.K / s.of);
    for (int i = 0; i < R; ++i) {
        alignas(32) float t[8];
        _mm256_store_ps(t, _mm256_add_ps(acc[i][0], acc[i][1]));
        float sum = part[i] + (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])));
        for (int64_t k = units * 8; k < s.K; ++k) sum += A[i * lda + k] * tail[k - units * 8];
        Y[i * ldy] = sum;
    }
}

// 2:4 and one row of A, the full chunks: A gathered at the survivors' positions instead of the weights
// expanded (two permutes and a blend per 8 survivors, then one FMA; with more rows the expanded weights
// serve them all and win).  A half step's 8 survivors are 4 runs, 16 weights; the permute indices of
// two runs (8 weights, one field of sparse_fields) are the positions of the field's survivors, the
// second pair's offset by 8 (bit 3 picks the upper 8 weights).  Runs with an invalid index (6, 7)
// contribute nothing, as in the expanding paths.
struct Gather24 {
    alignas(32) int32_t lo[64][4], hi[64][4];
    Gather24() {
        const SparseFields& f = sparse_fields(2, 4);
        for (int v = 0; v < 64; ++v)
            for (int t = 0, j = 0; t < 8; ++t)
                if ((f.expand[size_t(v)] >> t) & 1u) {
                    lo[v][j] = t;
                    hi[v][j++] = 8 + t;
                }
    }
};

template <int B>
float sparse_24_chunks(const SparseWeight& s, int64_t n, const float* A) {
    static const Gather24 G;
    const QWeight& w = s.inner;
    const int64_t chunks = w.K / BQ_CHUNK, spg = steps_per_group(w);
    const uint8_t* row = row_of(w, n);
    const uint8_t* mrow = s.mask + n * s.mask_bytes;
    const __m256i shift = _mm256_setr_epi32(0, 0, 3, 3, 6, 6, 9, 9);
    Table<B, false> tab;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t left = 0, g = -1;
    for (int64_t c = 0; c < chunks; ++c) {
        const uint8_t* p = row + c * BQ_LANES * B;
        const Words wd[2] = {words<B>(p, 0), words<B>(p, 1)};
        const float* a = A + c * 2 * BQ_CHUNK;
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            if (left == 0) {
                tab.load(w, n, ++g);
                left = spg;
            }
            --left;
            const uint32_t f = runs24(mrow, s.mask_bytes, 64 * c + 8 * I);   // the step's 8 runs
            const bool invalid = f & (f >> 1) & 0x492492u;   // some index is 6 or 7 (bits 1 and 2 set)
            for (int h = 0; h < 2; ++h) {
                const unsigned fh = (f >> (12 * h)) & 0xFFFu;
                const __m256i idx = _mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(G.lo[fh & 63]))),
                    _mm_load_si128(reinterpret_cast<const __m128i*>(G.hi[fh >> 6])), 1);
                const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));   // bit 3 -> sign
                __m256 v = tab.get(code<B, I>(wd[h]));
                if (invalid) {
                    const __m256i pi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(fh)), shift), _mm256_set1_epi32(7));
                    v = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(6), pi)));
                }
                const float* ah = a + 32 * I + 16 * h;
                const __m256 ag = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(ah), idx),
                                                   _mm256_permutevar8x32_ps(_mm256_loadu_ps(ah + 8), idx), upper);
                acc[h] = _mm256_fmadd_ps(ag, v, acc[h]);
            }
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(acc[0], acc[1]));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// Per column: the survivors decoded once, then A's rows in blocks of 4; one row of 2:4 weights gathers
// over the full chunks and takes the rest from the decoded survivors.
void sparse_gemv(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
                 int64_t n1) {
    if (8 % s.of) return sparse_gemv_scalar(s, A, M, lda, Y, ldy, n0, n1);
    const Expand& e = expand_table(s.keep, s.of);
    float* vc = scratch(2, size_t(s.inner.K + 8));
    const int64_t chunks = s.inner.K / BQ_CHUNK;
    if (M == 1 && s.keep == 2 && s.of == 4 && !s.inner.is_lut) {
        with_format(s.inner, [&](auto b, auto) {
            for (int64_t n = n0; n < n1; ++n) {
                const float part[1] = {sparse_24_chunks<b.value>(s, n, A)};
                if (s.inner.K == chunks * BQ_CHUNK) {   // nothing after them
                    Y[n] = part[0];
                    continue;
                }
                decode_rows(s.inner, n, n + 1, vc, s.inner.K, chunks, chunks, true);   // the survivors after them
                _mm256_storeu_ps(vc + s.inner.K, _mm256_setzero_ps());
                sparse_dot<1>(s, e, n, vc, A, lda, Y + n, ldy, chunks * 2 * BQ_CHUNK / 8, part);
            }
        });
        return;
    }
    using DotFn = void (*)(const SparseWeight&, const Expand&, int64_t, const float*, const float*, int64_t, float*,
                           int64_t, int64_t, const float*);
    constexpr DotFn dots[5] = {nullptr, sparse_dot<1>, sparse_dot<2>, sparse_dot<3>, sparse_dot<4>};
    const float zeros[4] = {};
    for (int64_t n = n0; n < n1; ++n) {
        decode(s.inner, n, n + 1, vc, s.inner.K);
        _mm256_storeu_ps(vc + s.inner.K, _mm256_setzero_ps());
        for (int64_t m = 0; m < M; m += 4)
            dots[std::min<int64_t>(4, M - m)](s, e, n, vc, A + m * lda, lda, Y + m * ldy + n, ldy, 0, zeros);
    }
}

// The dense GEMM's panels, filled from the task's columns expanded once beforehand (gemm_cols of them:
// 128 KB per 1024 of K).
void sparse_gemm(const SparseWeight& s, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
                 int64_t n1) {
    float* vc = scratch(3, size_t(s.inner.K + 8));
    float* T = scratch(2, size_t((n1 - n0) * s.K));
    for (int64_t n = n0; n < n1; ++n) sparse_row(s, n, vc, T + (n - n0) * s.K);
    gemm_panels(s.K, A, M, lda, Y, ldy, n0, n1, [&](int64_t c0, int64_t c1, float* S, int64_t kb, int64_t ke) {
        panel_from_rows(T + (c0 - n0) * s.K, s.K, int(c1 - c0), S, kb, kb, ke);
    });
}

}  // namespace

void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

void float_to_half_f16c(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

const Kernels* kernels_avx2() {
    // GEMV/GEMM switch by bits: the first M where the GEMM was as fast as the GEMV, single thread on a
    // Zen 4 EPYC (BAYESQ_ISA=avx2, BAYESQ_GEMM_MIN_ROWS forcing each path, tools/bench_kernels.py
    // --clock cpu --stat min, shapes 4096x4096, 1024x1024, 384x1536, M = 2..32).  b = 3 (lut3, u3-g32):
    // the two are within 5% of each other at M = 8 and the GEMM wins from 12 on (4096x4096 lut3: 2.9 vs
    // 3.6 ms at M = 6, 6.8 vs 5.9 at 12).  b = 4 (u4-g32: a two-register table, so the GEMV's lookups
    // cost twice): GEMV faster at M = 4 (3.5 vs 3.8 ms), GEMM from 6 on (5.4 vs 6.2); M = 5 is a
    // 4-row block plus one row, so 5.  b = 1, 2 decode like 3; b >= 5 (not measured) like 4.
    static const Kernels k{"avx2", decode, gemv, gemm, 32, {0, 8, 8, 8, 5, 5, 5, 5, 5}, sparse_gemv, sparse_gemm};
    return &k;
}

}  // namespace bq

#else
#include "kernels.h"
namespace bq {
const Kernels* kernels_avx2() { return nullptr; }
void half_to_float_f16c(const uint16_t*, float*, int64_t) {}
void float_to_half_f16c(const float*, uint16_t*, int64_t) {}
}  // namespace bq
#endif
