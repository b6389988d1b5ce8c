// Posterior-weighted Lloyd-Max codebooks, group by group: the native twin of
// bayesq_onnx/quantize/codebook.py (the reference and the fallback; its docstrings define the
// algorithm).  Python checks the inputs and hands over grouped, padded float64 chunks; these entry
// points fit and rate their codebooks.  Plain C ABI for ctypes (which releases the GIL during the
// call, so sites fitted on two threads run on two cores); single-threaded and deterministic.
//
// The arithmetic follows the numpy code operation by operation (the same prefix sums, numpy's
// pairwise summation where numpy sums a row, the same order of the E-step's per-step sums), so the
// two agree to the last bit except where the special functions differ: normal_tail here, scipy's ndtr
// and numpy's exp there (within an ulp or two of each other).  Compiled without FMA contraction.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "pairwise_sum.h"

namespace {

// An array of n elements left uninitialized: every one is written before it is read.  The starts
// hold about 90 bytes per element of a group (the E-step, chunked, 8); zeroed (std::vector), when
// the E-step held 200 more, that was half a one-group fit's time on 2^20 weights (a scaled
// codebook's levels), page faults included.
template <class T>
struct Buf {
    std::unique_ptr<T[]> p;
    int64_t n = 0;   // elements allocated
    Buf() = default;
    explicit Buf(int64_t m) { fit(m); }
    T* data() { return p.get(); }
    const T* data() const { return p.get(); }
    T& operator[](int64_t i) { return p[i]; }
    const T& operator[](int64_t i) const { return p[i]; }
    void fit(int64_t m) {   // room for m elements, reallocated only to grow (the contents go)
        if (m > n) p.reset(new T[static_cast<size_t>(m)]), n = m;
    }
};

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kInvSqrt2Pi = 0.3989422804014327;
constexpr double kInvSqrt2 = 0.70710678118654752440;

inline double f32(double x) { return static_cast<double>(static_cast<float>(x)); }

using bayesq::pairwise_sum;

// the number of entries of the sorted a[0..n) below x (`le`: at most x), without branches on the
// data: std::lower_bound's mispredicted jumps cost more than the rest of an E-step's element
template <bool le>
int64_t count_below(const double* a, int64_t n, double x) {
    if (n <= 0) return 0;
    const double* base = a;
    while (n > 1) {
        const int64_t half = n / 2;
        base = (le ? base[half - 1] <= x : base[half - 1] < x) ? base + half : base;
        n -= half;
    }
    return (base - a) + (le ? *base <= x : *base < x);
}

// ------------------------------------------------------------------------------------------
// The Gaussian tail 0.5 erfc(a / sqrt 2) and density exp(-a^2 / 2) / sqrt(2 pi) of n distances a, the
// E-step's special functions, in + - * / alone: the loop vectorizes (a clone per ISA) and every ISA,
// and the scalar build, gives the same bits.  The values are those of std::erfc(a * kInvSqrt2) and
// std::exp(-0.5 * a * a), i.e. of numpy's ndtr(-a) and exp, with their rounded arguments, to an ulp or
// two (tested), at half their time (5.8 ns an element against 12 on AVX-512; called per element they
// were half of a fit's time):
// - exp(y), y <= 0: Cody-Waite reduction by ln 2 (fdlibm's split, so k * kLn2Hi is exact), Taylor to
//   r^13 on |r| <= ln2 / 2 (truncation 4e-18), 2^k from the exponent bits;
// - erfc(z) = exp(-z^2) t g(t) with t = 2 / (2 + z) and g a Chebyshev series in t fitted for a in
//   [0, 7] (tools/fit_normal_tail.py; truncation 6e-20); z^2 split exactly into hi + lo (Dekker), as
//   exp(-z^2) must not carry the rounding of z^2 (up to 25 ulp here).
// a must lie in [0, 7]: the caller clamps it (a clamp here keeps GCC from vectorizing the loop but for
// AVX-512); the E-step drops distances past its z_cut <= 7 anyway.

constexpr double kTailMax = 7.0;   // the fit's range of a: 2 / (2 + 7 / sqrt 2) = kTailLo
constexpr double kTailLo = 0.28778024081032513862, kTailHi = 1.0;
constexpr double kTailCheb[22] = {
    6.5829856079910471707e-1, 3.0544632404848658437e-1, 3.6308057347613959859e-2,
    3.3606411985831553289e-4, -3.8976504412960518898e-4, -4.9773038089370344508e-6,
    6.0349688540322174717e-6, -2.1703979284860106245e-7, -9.4736059570284770133e-8,
    1.2477856617741290841e-8, 6.7943923664270598235e-10, -3.4981871111748423409e-10,
    2.9472553260023224157e-11, 4.1443981219998377654e-12, -1.3409338830506646513e-12,
    1.0880216312423967443e-13, 1.6567607494620031374e-14, -5.8152833286582240903e-15,
    6.1374436095057655127e-16, 4.5664080818296333231e-17, -2.6515224885902099357e-17,
    4.0600081428137072697e-18,
};
constexpr double kLog2e = 1.4426950408889634074, kLn2Hi = 6.93147180369123816490e-01,
                 kLn2Lo = 1.90821492927058770002e-10, kShifter = 6755399441055744.0;   // 1.5 * 2^52

// exp(y) for y in [-700, 0]
inline double exp_nonpositive(double y) {
    const double kd = y * kLog2e + kShifter;   // k = round(y / ln 2) in the low bits
    const double k = kd - kShifter;
    const double r = (y - k * kLn2Hi) - k * kLn2Lo;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits;
    std::memcpy(&bits, &kd, sizeof bits);
    bits = (bits << 52) + (uint64_t{1023} << 52);   // k's low 12 bits (two's complement) + the bias
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void normal_tail(const double* __restrict a, int64_t n, double* __restrict tail, double* __restrict dens) {
#pragma GCC unroll 4
    for (int64_t i = 0; i < n; ++i) {
        const double x = a[i];
        const double z = x * kInvSqrt2;
        const double c = 134217729.0 * z;            // Veltkamp: z = zh + zl, halves of 26 bits
        const double zh = c - (c - z), zl = z - zh;
        const double hi = z * z;
        const double lo = ((zh * zh - hi) + 2.0 * zh * zl) + zl * zl;   // z^2 = hi + lo exactly
        const double e = exp_nonpositive(-hi) * (1.0 - lo);
        // the density's exp(-0.5 * x * x), argument rounded as numpy rounds it, from the same exp:
        // exp(-x^2 / 2) = e exp(d) with d = z^2 - x^2 / 2, a few ulp of z^2 (hi and x^2 / 2 within a
        // factor 2 of each other: their difference is exact)
        const double d = (hi - 0.5 * (x * x)) + lo;
        dens[i] = (e + e * d) * kInvSqrt2Pi;
        const double t = 2.0 / (2.0 + z);
        const double u = (2.0 * t - (kTailLo + kTailHi)) * (1.0 / (kTailHi - kTailLo));
        double b1 = 0.0, b2 = 0.0;                   // g(t) by Clenshaw on u in [-1, 1]
#pragma GCC unroll 32
        for (int j = 21; j >= 1; --j) {
            const double b0 = kTailCheb[j] + 2.0 * u * b1 - b2;
            b2 = b1, b1 = b0;
        }
        tail[i] = 0.5 * (e * t * (kTailCheb[0] + u * b1 - b2));
    }
}

// n[i] = the number of thresholds below x[i] (count_below's count, a tie going to the lower level),
// counted threshold by threshold over blocks of 512 elements that stay in L1: the loop vectorizes (a
// clone per ISA), where count_below's binary search is a chain of dependent loads and compares per
// element.  For few thresholds (at most kLinearThresholds); the count is the same either way.
constexpr int kLinearThresholds = 31;

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void count_thresholds(const double* __restrict thr, int nthr, const double* __restrict x, int64_t B,
                      int64_t* __restrict n) {
    for (int64_t a = 0; a < B; a += 512) {
        const int64_t b = std::min<int64_t>(a + 512, B);
        for (int64_t i = a; i < b; ++i) n[i] = 0;
        for (int j = 0; j < nthr; ++j) {
            const double t = thr[j];
            for (int64_t i = a; i < b; ++i) n[i] += t < x[i];
        }
    }
}

// levels rounded to float32 and sorted: the stored form after every update
void store_levels(double* c, int K) {
    for (int k = 0; k < K; ++k) c[k] = f32(c[k]);
    std::sort(c, c + K);
}

// ------------------------------------------------------------------------------------------
// the exact E-step of one group (codebook.py, _estep), a chunk of kChunk elements at a time: the
// per-element arrays (nearest level, loss, the walkers' copies and tails: about 100 bytes an element)
// stay in L2 instead of streaming through memory, and a group of 2^20 weights (a scaled codebook's
// levels) allocates 8 MB for them, not 100.  Measured on such a group: a fit 0.22-0.27 s against
// 0.28-0.31 s whole-group, its expected loss 0.08 s against 0.15 s, the same bits.  The sums are
// numpy's, in its order, whatever the chunk: the cell masses and moments, and each walk step's flow
// across each threshold, are running sums over the elements in order, continued from chunk to chunk
// (the flows kept per walk direction and step, added up at the end as numpy adds its steps); the
// loss is one pairwise sum over the group's per-element terms.

constexpr int64_t kChunk = 4096;

struct EStep {
    int64_t B, C;
    int K;
    int64_t T;   // thresholds, and the most steps a walk takes
    std::vector<double> thr, gap, A, Bm, flow, flow_m;
    std::vector<double> steps[2], steps_m[2];   // [up]: the flow across threshold t at walk step s, [s * T + t]
    Buf<double> prod, loss, acc, wm, ws, ww, za, ztail, zdens;
    Buf<int64_t> near, live, wp;
    Buf<int> wt;

    EStep(int64_t B_, int K_)
        : B(B_), C(std::min(B_, kChunk)), K(K_), T(K_ > 1 ? K_ - 1 : 0), thr(K_ > 1 ? K_ - 1 : 1),
          gap(K_ > 1 ? K_ - 1 : 1), A(K_), Bm(K_), flow(K_), flow_m(K_), prod(B_), loss(C), acc(C), wm(C), ws(C),
          ww(C), za(C), ztail(C), zdens(C), near(C), live(C), wp(C), wt(C) {}

    // sum_i w_i E[(Q(w_i) - w_i)^2] over the group; with `stats` the cell masses A and first
    // moments Bm as well.  Thresholds beyond z_cut sigma are dropped.
    double run(const double* mu, const double* sig, const double* w, const double* c, bool stats, double z_cut) {
        for (int j = 0; j + 1 < K; ++j) {
            thr[j] = 0.5 * (c[j + 1] + c[j]);
            gap[j] = c[j + 1] - c[j];
        }
        if (stats) {
            std::fill(A.begin(), A.end(), 0.0), std::fill(Bm.begin(), Bm.end(), 0.0);
            for (int up = 0; up < 2; ++up) steps[up].clear(), steps_m[up].clear();   // grown as walks go on
        }
        for (int64_t a = 0; a < B; a += C) chunk(mu + a, sig + a, w + a, c, std::min(C, B - a), prod.data() + a,
                                                 stats, z_cut);
        if (stats && T) {
            // threshold j moves mass from cell j to cell j + 1; the steps added in numpy's order (all
            // of the upward walk's steps, then the downward's; a chunk's walk that ended earlier than
            // another's added 0 to its later steps, which changes no sum)
            std::fill(flow.begin(), flow.end(), 0.0), std::fill(flow_m.begin(), flow_m.end(), 0.0);
            for (int up = 1; up >= 0; --up)
                for (size_t o = 0; o < steps[up].size(); o += T)
                    for (int64_t t = 0; t < T; ++t) flow[t] += steps[up][o + t], flow_m[t] += steps_m[up][o + t];
            for (int j = 0; j + 1 < K; ++j) {
                A[j + 1] += flow[j], A[j] -= flow[j];
                Bm[j + 1] += flow_m[j], Bm[j] -= flow_m[j];
            }
        }
        return pairwise_sum(prod.data(), B);
    }

  private:
    // elements [0, n) of the chunk at mu: their weighted losses into out; A, Bm and the steps' flows
    // carried on
    void chunk(const double* mu, const double* sig, const double* w, const double* c, int64_t n, double* out,
               bool stats, double z_cut) {
        int64_t nlive = 0;
        // nearest level: the thresholds below mu (a tie goes to the lower level)
        if (K - 1 <= kLinearThresholds)
            count_thresholds(thr.data(), K - 1, mu, n, near.data());
        else
            for (int64_t i = 0; i < n; ++i) near[i] = count_below<false>(thr.data(), K - 1, mu[i]);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t nr = near[i];
            const double d = c[nr] - mu[i];
            loss[i] = d * d + sig[i] * sig[i];
            if (stats) A[nr] += w[i], Bm[nr] += w[i] * mu[i];
            if (K > 1) {
                const double reach = z_cut * sig[i];
                if ((nr > 0 && mu[i] - thr[nr - 1] < reach) || (nr < K - 1 && thr[nr] - mu[i] < reach))
                    live[nlive++] = i;
            }
        }
        if (nlive) {
            for (int64_t p = 0; p < nlive; ++p) acc[p] = 0.0;
            for (int up = 1; up >= 0; --up) {
                // walk outwards one threshold per step, all live elements per step (numpy's order);
                // the walkers still going are kept packed with their own copies of mu, sigma, weight
                int64_t nw = nlive;
                for (int64_t p = 0; p < nlive; ++p) {
                    const int64_t i = live[p];
                    wp[p] = p, wm[p] = mu[i], ws[p] = sig[i], ww[p] = w[i];
                    wt[p] = static_cast<int>(up ? near[i] : near[i] - 1);
                }
                for (int64_t s = 0; s < T && nw; ++s) {
                    double *step = nullptr, *step_m = nullptr;
                    if (stats) {
                        const size_t end = static_cast<size_t>((s + 1) * T);
                        if (steps[up].size() < end) steps[up].resize(end, 0.0), steps_m[up].resize(end, 0.0);
                        step = steps[up].data() + s * T, step_m = steps_m[up].data() + s * T;
                    }
                    for (int64_t q = 0; q < nw; ++q) {   // the step's distances, then their tails at once
                        const int t = wt[q];
                        const double a = t < 0 || t > K - 2 ? kInf        // past the last threshold
                                         : up ? (thr[t] - wm[q]) / ws[q] : (wm[q] - thr[t]) / ws[q];
                        za[q] = a < kTailMax ? a : kTailMax;   // (a >= 0: walkers go away from mu)
                    }
                    normal_tail(za.data(), nw, ztail.data(), zdens.data());
                    int64_t kept = 0;
                    for (int64_t q = 0; q < nw; ++q) {
                        const double a = za[q];
                        if (!(a < z_cut)) continue;
                        const int t = wt[q];
                        const double ms = wm[q], ss = ws[q];
                        const double tail = ztail[q], dens = zdens[q];   // mass beyond t, away from mu
                        acc[wp[q]] += gap[t] * (dens - a * tail);
                        if (stats) {
                            const double wq = ww[q];
                            const double mom = wq * (ms * tail + (up ? ss : -ss) * dens);
                            step[t] += up ? wq * tail : -wq * tail;
                            step_m[t] += up ? mom : -mom;
                        }
                        wp[kept] = wp[q], wm[kept] = ms, ws[kept] = ss, ww[kept] = ww[q];
                        wt[kept++] = up ? t + 1 : t - 1;
                    }
                    nw = kept;
                }
            }
            for (int64_t p = 0; p < nlive; ++p) {
                const int64_t i = live[p];
                loss[i] -= 2.0 * sig[i] * acc[p];
            }
        }
        for (int64_t i = 0; i < n; ++i) out[i] = std::max(loss[i], 0.0) * w[i];
    }
};

// ------------------------------------------------------------------------------------------
// starts (codebook.py, _start_levels and what it calls), on one group's sorted live entries

// stable LSD radix sort of n (key, index) pairs by key, a byte per pass (a pass is skipped where every
// key shares that byte); k2 and o2 are scratch.  Leaves the sorted indices in o.
template <class Key>
void radix_argsort(Key* k, Key* k2, int64_t* o, int64_t* o2, int64_t n) {
    int64_t* const out = o;
    for (int shift = 0; shift < 8 * static_cast<int>(sizeof(Key)); shift += 8) {
        int64_t count[257] = {0};
        for (int64_t r = 0; r < n; ++r) ++count[((k[r] >> shift) & 0xFF) + 1];
        if (std::find(count + 1, count + 257, n) != count + 257) continue;   // one byte value: in order
        for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
        for (int64_t r = 0; r < n; ++r) {
            const int64_t d = count[(k[r] >> shift) & 0xFF]++;
            k2[d] = k[r], o2[d] = o[r];
        }
        std::swap(k, k2), std::swap(o, o2);
    }
    if (o != out) std::copy(o, o + n, out);
}

// an order-preserving unsigned key of a float or double (-0 and +0 equal: ties go by index)
template <class Key, class F>
Key sort_key(F f) {
    constexpr Key top = Key{1} << (8 * sizeof(Key) - 1);
    Key u;
    std::memcpy(&u, &f, sizeof u);
    if (f == F(0)) u = 0;
    return (u & top) ? ~u : (u | top);
}

struct Sorted {
    Buf<double> x, v, P0, P1;
    Buf<int64_t> order, idx2;
    Buf<uint32_t> key, key2;
    Buf<uint64_t> wide, wide2;   // only for values that are not all float32
    int64_t n_live = 0, distinct = 0;
    explicit Sorted(int64_t B)
        : x(B), v(B), P0(B + 1), P1(B + 1), order(B), idx2(B), key(B), key2(B) {}

    // order[0..n) (live indices, increasing) sorted by mu, ties by index: numpy's stable argsort, by a
    // stable radix sort of order-preserving keys.  Values that are all float32 (weights are) take
    // 32-bit keys; others (a scaled codebook's weights over their scales) 64-bit ones: on 2^20 of
    // those a quarter of std::sort's time on (value, index) pairs.
    void argsort(const double* mu, int64_t n) {
        for (int64_t r = 0; r < n; ++r) {
            const double m = mu[order[r]];
            const float f = static_cast<float>(m);
            if (static_cast<double>(f) != m) {
                wide.fit(n), wide2.fit(n);
                for (int64_t q = 0; q < n; ++q) wide[q] = sort_key<uint64_t>(mu[order[q]]);
                radix_argsort(wide.data(), wide2.data(), order.data(), idx2.data(), n);
                return;
            }
            key[r] = sort_key<uint32_t>(f);
        }
        radix_argsort(key.data(), key2.data(), order.data(), idx2.data(), n);
    }

    // entries with weight first, sorted by mu (stable), the rest repeating the largest live value
    // with weight 0; a group without any weight counts its real entries equally
    void build(const double* mu, const double* w, const uint8_t* valid, int64_t B) {
        bool any = false;
        for (int64_t i = 0; i < B; ++i) any |= valid[i] && w[i] > 0;
        auto wt = [&](int64_t i) { return !valid[i] ? 0.0 : any ? w[i] : 1.0; };
        int64_t n = 0;
        for (int64_t i = 0; i < B; ++i)
            if (wt(i) > 0) order[n++] = i;
        n_live = n;
        argsort(mu, n);
        for (int64_t i = 0; i < B; ++i)
            if (!(wt(i) > 0)) order[n++] = i;
        distinct = 0;
        for (int64_t r = 0; r < B; ++r) {
            const int64_t i = order[r];
            x[r] = r < n_live ? mu[i] : x[n_live - 1];
            v[r] = wt(i);
            distinct += r < n_live && (r == 0 || x[r] != x[r - 1]);
        }
    }
};

// sigma = 0 Lloyd on the sorted values: a cell is a run of them (codebook.py, _lloyd_sorted)
void lloyd_sorted(Sorted& s, int64_t B, double* c, int K, int rounds, std::vector<double>& thr,
                  std::vector<double>& nw, std::vector<int64_t>& cut) {
    if (K == 1 || rounds <= 0) return;
    s.P0[0] = s.P1[0] = 0.0;
    for (int64_t i = 0; i < B; ++i) {
        s.P0[i + 1] = s.P0[i] + s.v[i];
        s.P1[i + 1] = s.P1[i] + s.v[i] * s.x[i];
    }
    thr.resize(K), nw.resize(K), cut.resize(K + 1);
    for (int r = 0; r < rounds; ++r) {
        for (int j = 0; j + 1 < K; ++j) thr[j] = 0.5 * (c[j + 1] + c[j]);
        cut[0] = 0, cut[K] = B;
        for (int j = 0; j + 1 < K; ++j)   // entries <= t_j belong to levels <= j (a tie goes down)
            cut[j + 1] = count_below<true>(s.x.data(), B, thr[j]);
        bool moved = false;
        for (int k = 0; k < K; ++k) {
            const double a = s.P0[cut[k + 1]] - s.P0[cut[k]], m = s.P1[cut[k + 1]] - s.P1[cut[k]];
            double x = a > 0 ? m / a : c[k];
            if (k > 0) x = std::max(x, thr[k - 1]);
            if (k < K - 1) x = std::min(x, thr[k]);
            nw[k] = x;
        }
        store_levels(nw.data(), K);
        for (int k = 0; k < K; ++k) moved |= nw[k] != c[k], c[k] = nw[k];
        if (!moved) break;
    }
}

// weighted quantiles (k + 1/2) / K of the sorted values (codebook.py, _quantile_levels)
void quantile_levels(const Sorted& s, int64_t B, double* c, int K, std::vector<double>& cum) {
    cum.resize(B);
    double t = 0.0;
    for (int64_t i = 0; i < B; ++i) cum[i] = t += s.v[i];
    const double tot = cum[B - 1];
    for (int64_t i = 0; i < B; ++i) cum[i] /= tot;
    for (int k = 0; k < K; ++k) {
        const double q = (k + 0.5) / K;
        int64_t idx = 0;
        for (int64_t i = 0; i < B; ++i) idx += cum[i] < q;
        c[k] = s.x[std::min(idx, B - 1)];
    }
}

// at most M runs of the n_live sorted values: M/2 of equal count merged with M/2 of equal width
// (codebook.py, _run_bounds); writes M + 1 boundaries (the tail repeating n_live), returns the runs
int64_t run_bounds(const Sorted& s, int64_t M, int64_t* bnd, std::vector<int64_t>& both) {
    const int64_t h = M / 2, nl = s.n_live;
    both.resize(2 * (h + 1));
    const double lo = s.x[0], hi = s.x[nl - 1];
    for (int64_t m = 0; m <= h; ++m) {
        both[m] = nl <= h ? std::min(m, nl) : (m * nl) / h;
        const double cut = lo + (hi - lo) * (static_cast<double>(m) / static_cast<double>(h));
        both[h + 1 + m] = m == h ? nl : count_below<false>(s.x.data(), nl, cut);
    }
    std::sort(both.begin(), both.end());
    const int64_t u = std::unique(both.begin(), both.end()) - both.begin();
    const int64_t n = std::min(u, M + 1);
    for (int64_t m = 0; m <= M; ++m) bnd[m] = m < n ? std::min(both[m], nl) : nl;
    return n - 1;
}

// the first j in [lo, hi) with the least e[j] - g[j] (np.argmin; no NaN here): eight independent
// running minima, each keeping its first minimum, merged by (value, index); the plain loop is
// latency-bound
int64_t first_argmin(const double* e, const double* g, int64_t lo, int64_t hi) {
    constexpr int L = 8;
    int64_t best = lo;
    double v = e[lo] - g[lo];
    int64_t j = lo + 1;
    if (hi - lo >= 2 * L) {
        double bv[L];
        int64_t bj[L];
        for (int r = 0; r < L; ++r) bv[r] = e[lo + r] - g[lo + r], bj[r] = lo + r;
        for (j = lo + L; j + L <= hi; j += L)
            for (int r = 0; r < L; ++r) {
                const double m = e[j + r] - g[j + r];
                const bool lt = m < bv[r];
                bv[r] = lt ? m : bv[r];
                bj[r] = lt ? j + r : bj[r];
            }
        v = bv[0], best = bj[0];
        for (int r = 1; r < L; ++r)
            if (bv[r] < v || (bv[r] == v && bj[r] < best)) v = bv[r], best = bj[r];
    }
    for (; j < hi; ++j) {   // indices above all the lanes': a tie keeps the earlier one
        const double m = e[j] - g[j];
        if (m < v) v = m, best = j;
    }
    return best;
}

// weighted 1-D k-means of the sorted values by dynamic programming over contiguous cells, on at
// most M runs (codebook.py, _kmeans_levels)
struct KMeans {
    Buf<double> vs, P0, P1, P2, prod;
    std::vector<double> Q0, Q1, Q2, gain, D, Dn, E;
    std::vector<int64_t> args, bnd, both, bounds;

    void levels(const Sorted& s, int64_t B, double* c, int K, int64_t M) {
        vs.fit(B), prod.fit(B);
        double vmax = s.v[0];
        for (int64_t i = 1; i < B; ++i) vmax = std::max(vmax, s.v[i]);
        for (int64_t i = 0; i < B; ++i) vs[i] = s.v[i] / vmax;   // the optimum ignores the weights' scale
        for (int64_t i = 0; i < B; ++i) prod[i] = s.x[i] * vs[i];
        const double mean = pairwise_sum(prod.data(), B) / pairwise_sum(vs.data(), B);
        int64_t nl = s.n_live;
        const double *p0, *p1, *p2;
        if (M < B) {
            // the prefix sums read at the run bounds only (non-decreasing): the same running sums,
            // without three arrays of the group's length (24 MB on 2^20 weights)
            bnd.resize(M + 1), Q0.resize(M + 1), Q1.resize(M + 1), Q2.resize(M + 1);
            nl = run_bounds(s, M, bnd.data(), both);
            double a0 = 0.0, a1 = 0.0, a2 = 0.0;
            for (int64_t i = 0, m = 0; m <= M; ++i) {
                for (; m <= M && bnd[m] == i; ++m) Q0[m] = a0, Q1[m] = a1, Q2[m] = a2;
                if (m > M) break;
                const double xc = s.x[i] - mean;   // centred: prefix sums lose less
                a0 = a0 + vs[i];
                a1 = a1 + vs[i] * xc;
                a2 = a2 + vs[i] * xc * xc;
            }
            p0 = Q0.data(), p1 = Q1.data(), p2 = Q2.data();
        } else {
            P0.fit(B + 1), P1.fit(B + 1), P2.fit(B + 1);
            P0[0] = P1[0] = P2[0] = 0.0;
            for (int64_t i = 0; i < B; ++i) {
                const double xc = s.x[i] - mean;
                P0[i + 1] = P0[i] + vs[i];
                P1[i + 1] = P1[i] + vs[i] * xc;
                P2[i + 1] = P2[i] + vs[i] * xc * xc;
            }
            p0 = P0.data(), p1 = P1.data(), p2 = P2.data();
        }
        const int64_t N = M + 1;
        // gain[i, j] = (P1[i] - P1[j])^2 / (P0[i] - P0[j]); j >= i is no cell (-inf), a cell of
        // weight 0 (past n_live) gains 0
        gain.resize(N * N);
        for (int64_t i = 0; i < N; ++i)
            for (int64_t j = 0; j < N; ++j) {
                if (j >= i) {
                    gain[i * N + j] = -kInf;
                    continue;
                }
                double g = p1[i] - p1[j];
                g *= g;
                const double d0 = p0[i] - p0[j];
                gain[i * N + j] = g / (d0 > 0 ? d0 : 1.0);
            }
        D.resize(N), Dn.resize(N), E.resize(N), args.assign(static_cast<size_t>(K > 1 ? K - 1 : 1) * N, 0);
        for (int64_t i = 0; i < N; ++i) D[i] = p2[i] - gain[i * N];   // one cell: cost(0, i)
        for (int k = 1; k < K; ++k) {
            // cell k ends at i after k cells and before K - 1 - k more: j in [k, i)
            const int64_t hi = M - (K - 1 - k);
            for (int64_t j = 0; j < N; ++j) E[j] = D[j] - p2[j];
            std::fill(Dn.begin(), Dn.end(), kInf);
            for (int64_t i = k + 1; i <= hi; ++i) {
                // numpy's argmin over j in [k, hi): the first minimum; j >= i (no cell) is +inf
                // there and never the minimum unless all are, and then the first, k, wins here too
                const int64_t best = first_argmin(E.data(), gain.data() + i * N, k, i);
                args[(k - 1) * N + i] = best;
                Dn[i] = (E[best] - gain[i * N + best]) + p2[i];
            }
            std::swap(D, Dn);
        }
        bounds.resize(K + 1);
        int64_t i = nl;
        bounds[K] = i;
        for (int k = K - 1; k > 0; --k) bounds[k] = i = args[(k - 1) * N + i];
        bounds[0] = 0;
        for (int k = 0; k < K; ++k) {
            const int64_t a = bounds[k], b = bounds[k + 1];
            c[k] = (p1[b] - p1[a]) / (p0[b] - p0[a]) + mean;
        }
    }
};

struct Params {
    int64_t B;
    int K;
    int start;          // 0: levels given, 1: k-means, 2: quantiles
    int iters;
    double tol;
    int64_t dp_bins;    // k-means runs per group (codebook._DP_BINS / _DP_BINS_MANY, chosen by K)
    int kmeans_rounds;
    double z_lloyd;
};

struct Fitter {
    Params p;
    EStep e;
    Sorted s;
    KMeans km;
    std::vector<double> work, cb, nw, A0, B0;
    std::vector<int64_t> cut;

    explicit Fitter(const Params& p_) : p(p_), e(p_.B, p_.K), s(p_.B), cb(p_.K), nw(p_.K) {}

    void start_levels(const double* mu, const double* w, const uint8_t* valid, double* c) {
        const int K = p.K;
        const int64_t B = p.B;
        s.build(mu, w, valid, B);
        if (s.distinct <= K) {
            // at most K distinct values: exactly those, the largest repeated
            int k = 0;
            for (int64_t r = 0; r < s.n_live; ++r)
                if (r == 0 || s.x[r] != s.x[r - 1]) c[k++] = s.x[r];
            for (; k < K; ++k) c[k] = s.x[s.n_live - 1];
        } else if (p.start == 1) {
            km.levels(s, B, c, K, std::min<int64_t>(B, p.dp_bins));
        } else {
            quantile_levels(s, B, c, K, work);
        }
        store_levels(c, K);
        lloyd_sorted(s, B, c, K, p.kmeans_rounds, work, nw, cut);
    }

    // Lloyd rounds on one group (codebook.py, _lloyd_chunk); c in/out, alt a second start or null
    void lloyd(const double* mu, const double* sig, const double* w, double* c, const double* alt) {
        const int K = p.K;
        store_levels(c, K);
        double prev = kInf;
        const int rounds = std::max(p.iters, alt ? 1 : 0);
        for (int r = 0; r < rounds; ++r) {
            double J = e.run(mu, sig, w, c, true, p.z_lloyd);
            if (r == 0 && alt) {
                A0 = e.A, B0 = e.Bm;   // c's statistics, kept while the E-step rates alt
                for (int k = 0; k < K; ++k) cb[k] = alt[k];
                store_levels(cb.data(), K);
                const double Jb = e.run(mu, sig, w, cb.data(), true, p.z_lloyd);
                if (Jb < J) {   // ties keep c
                    std::copy(cb.begin(), cb.end(), c);
                    J = Jb;
                } else {
                    e.A = A0, e.Bm = B0;
                }
                if (r >= p.iters) break;
            }
            const double total = pairwise_sum(e.A.data(), K);
            for (int k = 0; k < K; ++k) {
                // a cell with (almost) no mass keeps its level; the centroid lies in its cell
                double x = e.A[k] > 1e-12 * total ? e.Bm[k] / e.A[k] : c[k];
                if (k > 0) x = std::max(x, 0.5 * (c[k] + c[k - 1]));
                if (k < K - 1) x = std::min(x, 0.5 * (c[k + 1] + c[k]));
                nw[k] = x;
            }
            store_levels(nw.data(), K);
            bool moved = false;
            for (int k = 0; k < K; ++k) moved |= nw[k] != c[k], c[k] = nw[k];
            const bool go_on = prev - J > p.tol * J && moved;
            prev = J;
            if (!go_on) break;
        }
    }
};

}  // namespace

extern "C" {

// Fit `groups` codebooks of `levels` levels to grouped, padded float64 rows `(groups, width)`:
// mu, sigma, weight (0 on pads) and valid (0 on pads).  start: 0 = the levels in `codebook`,
// 1 = k-means, 2 = quantiles; alt: a second start rated in the first round (or null).  Writes
// `codebook` (groups, levels), float32 values, sorted.  Returns 0, or 1 on bad sizes, a z_lloyd past
// normal_tail's range, or no memory.
__attribute__((visibility("default"))) int BayesqCodebookFit(
    int64_t groups, int64_t width, int32_t levels, const double* mu, const double* sigma, const double* weight,
    const uint8_t* valid, int32_t start, const double* alt, int32_t iters, double tol, int64_t dp_bins,
    int32_t kmeans_rounds, double z_lloyd, double* codebook) {
    if (groups < 0 || width < 1 || levels < 1 || levels > 256 || start < 0 || start > 2 || iters < 0 || dp_bins < 2 ||
        !(z_lloyd <= kTailMax))
        return 1;
    try {
        Fitter f(Params{width, levels, start, iters, tol, dp_bins, kmeans_rounds, z_lloyd});
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t o = g * width;
            double* c = codebook + g * levels;
            if (start) f.start_levels(mu + o, weight + o, valid + o, c);
            f.lloyd(mu + o, sigma + o, weight + o, c, alt ? alt + g * levels : nullptr);
        }
    } catch (const std::bad_alloc&) {
        return 1;
    }
    return 0;
}

// Expected loss sum_i weight_i E[(Q(w_i) - w_i)^2] of each group's codebook (sorted levels),
// thresholds beyond z_cut sigma dropped: out (groups,).  Returns 0, or 1 on bad sizes, a z_cut past
// normal_tail's range, or no memory.
__attribute__((visibility("default"))) int BayesqCodebookLoss(
    int64_t groups, int64_t width, int32_t levels, const double* mu, const double* sigma, const double* weight,
    const double* codebook, double z_cut, double* out) {
    if (groups < 0 || width < 1 || levels < 1 || levels > 256 || !(z_cut <= kTailMax)) return 1;
    try {
        EStep e(width, levels);
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t o = g * width;
            out[g] = e.run(mu + o, sigma + o, weight + o, codebook + g * levels, false, z_cut);
        }
    } catch (const std::bad_alloc&) {
        return 1;
    }
    return 0;
}

// normal_tail itself, for its test: tail[i] = 0.5 erfc(a[i] / sqrt 2), dens[i] = exp(-a[i]^2 / 2) / sqrt(2 pi),
// a[i] clamped to [0, 7].  Returns 0, or 1 on no memory.
__attribute__((visibility("default"))) int BayesqNormalTail(int64_t n, const double* a, double* tail, double* dens) {
    try {
        std::vector<double> x(a, a + n);
        for (double& v : x) v = v > 0.0 ? (v < kTailMax ? v : kTailMax) : 0.0;
        normal_tail(x.data(), n, tail, dens);
    } catch (const std::bad_alloc&) {
        return 1;
    }
    return 0;
}

}  // extern "C"
