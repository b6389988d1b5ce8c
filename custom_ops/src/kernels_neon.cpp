// ARM NEON (AArch64 Advanced SIMD) kernels.  A 16-lane chunk step is four 4-lane vectors.  Lane words
// come from zero-extending plane loads (layout.h); step i's codes are (word >> b*i) & mask.  The table
// lookup is a byte shuffle: code q becomes the byte indices 4q..4q+3 of its fp32 entry and `tbl` reads
// them from a table of 2^b floats held in 1, 2 or 4 registers (b <= 4; b = 5 LUT adds one `tbx` for
// the upper 64 bytes).  Affine groups build their table (iota - zp) * scale once per group, the exact
// reference arithmetic, so decoding is bit-exact; wider affine codes are converted and scaled the same
// way, wider LUT codes read their entry lane by lane.  Partial chunks are first copied into a
// zero-padded 16-lane chunk, as on AVX2.
//
// Built and tested on x86 only through a cross compiler and qemu-aarch64 (custom_ops/test/,
// tests/test_neon.py): correct there, speed never measured (no ARM machine).
#if defined(__aarch64__)
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels.h"

#define BQ_INLINE __attribute__((always_inline))

namespace bq {
namespace {

// 16 lanes of W bytes each (one plane of a full chunk), zero-extended to 32 bits: 4 vectors.
template <int W>
inline void plane(const uint8_t* p, uint32x4_t (&v)[4]) {
    if constexpr (W == 4) {
        for (int i = 0; i < 4; ++i) v[i] = vreinterpretq_u32_u8(vld1q_u8(p + 16 * i));
    } else if constexpr (W == 2) {
        for (int h = 0; h < 2; ++h) {
            const uint16x8_t x = vreinterpretq_u16_u8(vld1q_u8(p + 16 * h));
            v[2 * h] = vmovl_u16(vget_low_u16(x));
            v[2 * h + 1] = vmovl_u16(vget_high_u16(x));
        }
    } else {
        const uint8x16_t x = vld1q_u8(p);
        const uint16x8_t lo = vmovl_u8(vget_low_u8(x)), hi = vmovl_u8(vget_high_u8(x));
        v[0] = vmovl_u16(vget_low_u16(lo));
        v[1] = vmovl_u16(vget_high_u16(lo));
        v[2] = vmovl_u16(vget_low_u16(hi));
        v[3] = vmovl_u16(vget_high_u16(hi));
    }
}

// A full chunk's lane words: bytes 0..3 (lo) and 4..7 (hi) of each of the 16 lanes, 4 lanes a vector.
struct Words {
    uint32x4_t lo[4], hi[4];
};

template <int NB>  // bytes per lane (= bits, for 8 steps)
inline Words words(const uint8_t* p) {
    constexpr int L = BQ_LANES;
    Words w;
    uint32x4_t t[4];
    auto or_shift16 = [&](uint32x4_t(&dst)[4], const uint8_t* q) {  // | (1-byte plane << 16)
        plane<1>(q, t);
        for (int i = 0; i < 4; ++i) dst[i] = vorrq_u32(dst[i], vshlq_n_u32(t[i], 16));
    };
    for (int i = 0; i < 4; ++i) w.hi[i] = vdupq_n_u32(0);
    if constexpr (NB == 1) {
        plane<1>(p, w.lo);
    } else if constexpr (NB == 2) {
        plane<2>(p, w.lo);
    } else if constexpr (NB == 3) {
        plane<2>(p, w.lo);
        or_shift16(w.lo, p + 2 * L);
    } else {
        plane<4>(p, w.lo);
        const uint8_t* q = p + 4 * L;
        if constexpr (NB == 5) plane<1>(q, w.hi);
        if constexpr (NB == 6) plane<2>(q, w.hi);
        if constexpr (NB == 7) {
            plane<2>(q, w.hi);
            or_shift16(w.hi, q + 2 * L);
        }
        if constexpr (NB == 8) plane<4>(q, w.hi);
    }
    return w;
}

// Codes of step I, lanes 4v..4v+3 (higher bits not yet masked).
template <int B, int I>
inline uint32x4_t code(const Words& w, int v) {
    constexpr int o = B * I;
    if constexpr (o + B <= 32) return vshlq_u32(w.lo[v], vdupq_n_s32(-o));
    else if constexpr (o >= 32) return vshlq_u32(w.hi[v], vdupq_n_s32(-(o - 32)));
    else return vorrq_u32(vshlq_u32(w.lo[v], vdupq_n_s32(-o)), vshlq_u32(w.hi[v], vdupq_n_s32(32 - o)));
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

// Table registers: 2^B floats in 16-byte registers where `tbl` can reach them (B <= 4; LUT B = 5).
template <int B, bool LUT>
constexpr int table_regs() {
    return B <= 2 ? 1 : B == 3 ? 2 : B == 4 ? 4 : (B == 5 && LUT) ? 8 : 0;
}

// LUT entries; affine values (q - zp) * s (decode); or, with CODES, q * s (the affine GEMV, which
// subtracts the zero points' share once at the end).
template <int B, bool LUT, bool CODES = false>
struct Table {
    static constexpr int NT = table_regs<B, LUT>();
    uint8x16_t t[NT > 0 ? NT : 1];
    float32x4_t zp, s;
    const float* base = nullptr;

    inline void load(const QWeight& w, int64_t n, int64_t g) {
        if constexpr (LUT) {
            const float* p = w.lut + ((n * w.G + g) << B);
            const uint8_t* pb = reinterpret_cast<const uint8_t*>(p);
            if constexpr (B == 1) t[0] = vcombine_u8(vld1_u8(pb), vld1_u8(pb));  // 8 bytes, twice
            else if constexpr (NT > 0)
                for (int i = 0; i < NT; ++i) t[i] = vld1q_u8(pb + 16 * i);
            else base = p;
        } else {
            const float32x4_t sc = vdupq_n_f32(w.scales[n * w.G + g]);
            const float32x4_t z = vdupq_n_f32(CODES ? 0.f : float(zero_point(w, n, g)));
            if constexpr (NT > 0) {
                for (int i = 0; i < NT; ++i) {
                    // entries q = 4i..4i+3 (B = 1: 0, 1, 0, 1); q - 0 is exact, so CODES gives q * s
                    const float32x4_t q = B == 1 ? float32x4_t{0.f, 1.f, 0.f, 1.f}
                                                 : float32x4_t{float(4 * i), float(4 * i + 1), float(4 * i + 2),
                                                               float(4 * i + 3)};
                    t[i] = vreinterpretq_u8_f32(vmulq_f32(vsubq_f32(q, z), sc));
                }
            } else {
                zp = z;
                s = sc;
            }
        }
    }

    inline float32x4_t get(uint32x4_t c) const {
        const uint32x4_t q = vandq_u32(c, vdupq_n_u32((1u << B) - 1u));
        if constexpr (NT > 0) {
            // byte j of lane l selects table byte 4 q_l + j
            const uint8x16_t idx = vreinterpretq_u8_u32(vmlaq_u32(vdupq_n_u32(0x03020100u), q, vdupq_n_u32(0x04040404u)));
            uint8x16_t r;
            if constexpr (NT == 1) {
                r = vqtbl1q_u8(t[0], idx);
            } else if constexpr (NT == 2) {
                r = vqtbl2q_u8(uint8x16x2_t{{t[0], t[1]}}, idx);
            } else if constexpr (NT == 4) {
                r = vqtbl4q_u8(uint8x16x4_t{{t[0], t[1], t[2], t[3]}}, idx);
            } else {  // 128 bytes: tbl gives 0 for indices >= 64, tbx then fills those from the upper half
                r = vqtbl4q_u8(uint8x16x4_t{{t[0], t[1], t[2], t[3]}}, idx);
                r = vqtbx4q_u8(r, uint8x16x4_t{{t[4], t[5], t[6], t[7]}}, vsubq_u8(idx, vdupq_n_u8(64)));
            }
            return vreinterpretq_f32_u8(r);
        } else if constexpr (LUT) {
            float32x4_t r = vdupq_n_f32(0.f);
            r = vld1q_lane_f32(base + vgetq_lane_u32(q, 0), r, 0);
            r = vld1q_lane_f32(base + vgetq_lane_u32(q, 1), r, 1);
            r = vld1q_lane_f32(base + vgetq_lane_u32(q, 2), r, 2);
            r = vld1q_lane_f32(base + vgetq_lane_u32(q, 3), r, 3);
            return r;
        } else {
            const float32x4_t qf = vcvtq_f32_u32(q);
            if constexpr (CODES) return vmulq_f32(qf, s);
            else return vmulq_f32(vsubq_f32(qf, zp), s);
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

// ---- fused GEMV: MR rows x NC columns at a time; accumulators per (row, column) in two chains ------
template <int B, bool LUT, int MR, int NC>
void gemv_block(const QWeight& w, const float* A, int64_t lda, const float* SA, int64_t ldsa, float* Y, int64_t ldy,
                int64_t n) {
    const int64_t K = w.K, full = K / BQ_CHUNK;
    float32x4_t acc[MR][NC][2];
    float extra[MR][NC] = {};
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NC; ++j) acc[m][j][0] = acc[m][j][1] = vdupq_n_f32(0.f);
    Table<B, LUT, !LUT> tab[NC];
    const uint8_t* row[NC];
    for (int j = 0; j < NC; ++j) row[j] = row_of(w, n + j);
    const int64_t spg = steps_per_group(w);
    int64_t left = 0, g = -1;

    auto enter = [&](int64_t gn) BQ_INLINE {
        for (int j = 0; j < NC; ++j) tab[j].load(w, n + j, gn);
        g = gn;
    };
    auto scalar = [&](int j, int64_t k, int q) BQ_INLINE {
        const int64_t gk = group_of(w, k);
        const float v = LUT ? value(w, n + j, gk, q) : float(q) * w.scales[(n + j) * w.G + gk];
        for (int m = 0; m < MR; ++m) extra[m][j] += A[m * lda + k] * v;
    };
    // one step: 16 lanes, activations at a[m * ast + 4v] (ast: row stride of a)
    auto step = [&](const Words (&wd)[NC], const float* a, int64_t ast, auto ic) BQ_INLINE {
        constexpr int I = decltype(ic)::value;
        for (int v = 0; v < 4; ++v) {
            float32x4_t av[MR];
            for (int m = 0; m < MR; ++m) av[m] = vld1q_f32(a + m * ast + 4 * v);
            for (int j = 0; j < NC; ++j) {
                const float32x4_t x = tab[j].get(code<B, I>(wd[j], v));
                for (int m = 0; m < MR; ++m) acc[m][j][v & 1] = vfmaq_f32(acc[m][j][v & 1], av[m], x);
            }
        }
    };

    for (int64_t c = 0; c < full; ++c) {
        Words wd[NC];
        for (int j = 0; j < NC; ++j) wd[j] = words<B>(row[j] + c * BQ_LANES * B);
        unroll([&](auto ic) BQ_INLINE {
            if (left == 0) {
                enter(g + 1);
                left = spg;
            }
            --left;
            step(wd, A + c * BQ_CHUNK + BQ_LANES * decltype(ic)::value, lda, ic);
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }

    const int L = int((K % BQ_CHUNK) / BQ_STEPS);
    if (L) {
        const int64_t k0 = full * BQ_CHUNK;
        Words wd[NC];
        uint8_t buf[BQ_LANES * BQ_MAX_BITS];
        for (int j = 0; j < NC; ++j) {
            widen(row[j] + k0 * B / 8, L, B, buf);
            wd[j] = words<B>(buf);
        }
        float ab[MR][BQ_LANES] = {};  // the step's L activations, zero-padded: lanes >= L add 0 * table[0]
        unroll([&](auto ic) BQ_INLINE {
            constexpr int I = decltype(ic)::value;
            const int64_t kk = k0 + int64_t(L) * I, gf = group_of(w, kk);
            if (gf != group_of(w, kk + L - 1)) {
                for (int j = 0; j < NC; ++j)
                    for (int l = 0; l < L; ++l) scalar(j, kk + l, bq_code_at(row[j], K, B, kk + l));
                return;
            }
            if (gf != g) enter(gf);
            for (int m = 0; m < MR; ++m) std::memcpy(ab[m], A + m * lda + kk, size_t(L) * sizeof(float));
            step(wd, &ab[0][0], BQ_LANES, ic);
        }, std::make_integer_sequence<int, BQ_STEPS>{});
    }

    const int r = int(K % BQ_STEPS);
    for (int i = 0; i < r; ++i)
        for (int j = 0; j < NC; ++j) scalar(j, K - r + i, bq_stream_at(row[j] + (K - r) * B / 8, B, i));

    for (int j = 0; j < NC; ++j) {
        float corr[MR] = {};
        if constexpr (!LUT) {
            const float* s = w.scales + (n + j) * w.G;
            for (int64_t gg = 0; gg < w.G; ++gg) {
                const float sz = s[gg] * float(zero_point(w, n + j, gg));
                for (int m = 0; m < MR; ++m) corr[m] += sz * SA[m * ldsa + gg];
            }
        }
        for (int m = 0; m < MR; ++m)
            Y[m * ldy + n + j] = vaddvq_f32(vaddq_f32(acc[m][j][0], acc[m][j][1])) + extra[m][j] - corr[m];
    }
}

template <int B, bool LUT, int MR>
void gemv_rows(const QWeight& w, const float* A, int64_t lda, const float* SA, int64_t ldsa, float* Y, int64_t ldy,
               int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) gemv_block<B, LUT, MR, 2>(w, A, lda, SA, ldsa, Y, ldy, n);
    for (; n < n1; ++n) gemv_block<B, LUT, MR, 1>(w, A, lda, SA, ldsa, Y, ldy, n);
}

template <int B, bool LUT>
void gemv_t(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0,
            int64_t n1, const float* SA) {
    const int64_t G = w.G;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
        gemv_rows<B, LUT, 2>(w, A + m * lda, lda, LUT ? nullptr : SA + m * G, G, Y + m * ldy, ldy, n0, n1);
    if (m < M) gemv_rows<B, LUT, 1>(w, A + m * lda, lda, LUT ? nullptr : SA + m * G, G, Y + m * ldy, ldy, n0, n1);
}

// ---- decode (bit-exact: the table holds the reference's values) ----------------------------------
template <int B, bool LUT>
void decode_t(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    const int64_t K = w.K, full = K / BQ_CHUNK, spg = steps_per_group(w);
    const int L = int((K % BQ_CHUNK) / BQ_STEPS), r = int(K % BQ_STEPS);
    Table<B, LUT> tab;
    float tmp[BQ_LANES];
    uint8_t buf[BQ_LANES * BQ_MAX_BITS];
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = row_of(w, n);
        float* d = dst + (n - n0) * ld;
        int64_t left = 0, g = -1;  // steps left in group g (then the next group is loaded)
        for (int64_t c = 0; c < full; ++c) {
            const Words wd = words<B>(row + c * BQ_LANES * B);
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                if (left == 0) {
                    tab.load(w, n, ++g);
                    left = spg;
                }
                --left;
                for (int v = 0; v < 4; ++v) vst1q_f32(d + c * BQ_CHUNK + BQ_LANES * I + 4 * v, tab.get(code<B, I>(wd, v)));
            }, std::make_integer_sequence<int, BQ_STEPS>{});
        }
        if (L) {
            const int64_t k0 = full * BQ_CHUNK;
            widen(row + k0 * B / 8, L, B, buf);
            const Words wd = words<B>(buf);
            unroll([&](auto ic) BQ_INLINE {
                constexpr int I = decltype(ic)::value;
                const int64_t kk = k0 + int64_t(L) * I, gf = group_of(w, kk);
                if (gf != group_of(w, kk + L - 1)) {
                    for (int l = 0; l < L; ++l) d[kk + l] = value(w, n, group_of(w, kk + l), bq_code_at(row, K, B, kk + l));
                    return;
                }
                if (gf != g) tab.load(w, n, g = gf);
                for (int v = 0; v < 4; ++v) vst1q_f32(tmp + 4 * v, tab.get(code<B, I>(wd, v)));
                std::memcpy(d + kk, tmp, size_t(L) * sizeof(float));
            }, std::make_integer_sequence<int, BQ_STEPS>{});
        }
        for (int i = 0; i < r; ++i) {
            const int64_t k = K - r + i;
            d[k] = value(w, n, group_of(w, k), bq_stream_at(row + (K - r) * B / 8, B, i));
        }
    }
}

void gemv(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1,
          const float* SA) {
    with_format(w, [&](auto b, auto lut) { gemv_t<b.value, lut.value>(w, A, M, lda, Y, ldy, n0, n1, SA); });
}

void decode(const QWeight& w, int64_t n0, int64_t n1, float* dst, int64_t ld) {
    with_format(w, [&](auto b, auto lut) { decode_t<b.value, lut.value>(w, n0, n1, dst, ld); });
}

// ---- GEMM ----------------------------------------------------------------------------------------
// A task decodes its columns once (exactly) into a buffer of whole columns, then runs the GotoBLAS
// loops over it: K slices of KC, blocks of MB rows of A (~128 KB), panels of 4 columns, tiles of R <= 6
// rows.  The micro-kernel keeps R x 4 accumulators of 4 consecutive k (24 of the 32 registers at R = 6)
// and loads 4 weight vectors + R activation vectors per 4 k; no shuffles in the loop.  An element's
// sum (4 chains per K slice, reduced with faddp, slices added in order) depends on K only, never on
// the task's columns or on M.
constexpr int MR = 6;
constexpr int64_t KC = 512;  // K per slice: a panel slice (4 x KC floats) is 8 KB, an R-row A slice 12 KB

template <int R>
void micro(const float* A, int64_t lda, const float* W, int64_t ldw, int64_t kc, float* Y, int64_t ldy, int nc,
           bool first) {
    float32x4_t c[R][4];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < 4; ++j) c[i][j] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < kc; k += 4) {
        float32x4_t b[4];
        for (int j = 0; j < 4; ++j) b[j] = vld1q_f32(W + j * ldw + k);
        for (int i = 0; i < R; ++i) {
            const float32x4_t a = vld1q_f32(A + i * lda + k);
            for (int j = 0; j < 4; ++j) c[i][j] = vfmaq_f32(c[i][j], a, b[j]);
        }
    }
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < nc; ++j) {
            const float s = vaddvq_f32(c[i][j]);
            Y[i * ldy + j] = first ? s : Y[i * ldy + j] + s;
        }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int, bool);
constexpr MicroFn micros[MR + 1] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};

void gemm(const QWeight& w, const float* A, int64_t M, int64_t lda, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t K = w.K, K4 = (K + 3) / 4 * 4, nn = n1 - n0, np = (nn + 3) / 4;
    if (K % 4) A = pad_k4(A, M, lda, K, &lda);  // the micro-kernel reads 4 k at a time (rare shapes)
    // whole columns, K4 apart; the K padding and the last panel's missing columns are 0 (the padded
    // activations are 0 too, and 0 * garbage could be NaN)
    float* T = scratch(2, size_t(np * 4 * K4));
    decode(w, n0, n1, T, K4);
    for (int64_t j = 0; j < np * 4; ++j)
        std::memset(T + j * K4 + (j < nn ? K : 0), 0, size_t(j < nn ? K4 - K : K4) * sizeof(float));
    const int64_t MB = std::max<int64_t>(MR, (32 << 10) / std::min(K4, KC) / MR * MR);  // ~128 KB of A
    for (int64_t k0 = 0; k0 < K4; k0 += KC) {
        const int64_t kc = std::min(KC, K4 - k0);
        for (int64_t mb = 0; mb < M; mb += MB) {
            const int64_t me = std::min(M, mb + MB);
            for (int64_t p = 0; p < np; ++p) {
                const int nc = int(std::min<int64_t>(4, nn - 4 * p));
                for (int64_t m0 = mb; m0 < me; m0 += MR)
                    micros[std::min<int64_t>(MR, me - m0)](A + m0 * lda + k0, lda, T + 4 * p * K4 + k0, K4, kc,
                                                           Y + m0 * ldy + n0 + 4 * p, ldy, nc, k0 == 0);
            }
        }
    }
}

}  // namespace

const Kernels* kernels_neon() {
    // gemm_cols 16: a task's decoded columns (16 x K floats, 256 KB at K = 4096) stay in L2.
    // gemm_min_rows 8: AVX2's former switch point, not measured on ARM.
    static const Kernels k{"neon", decode, gemv, gemm, 16, {8, 8, 8, 8, 8, 8, 8, 8, 8}};
    return &k;
}

}  // namespace bq

#else
#include "kernels.h"
namespace bq {
const Kernels* kernels_neon() { return nullptr; }
}  // namespace bq
#endif
