// Kernel check: calls a kernel set's entry points (decode, gemv, gemm) directly on generated packed
// weights and compares them with a plain reference computed from the unpacked codes: decoding bit for
// bit (blocks of rows, and single rows as the Gather ops decode them), matmuls within the fp32 summation bound, and column splits giving identical bytes.  No
// onnxruntime: it runs where the library cannot, e.g. the NEON kernels under qemu-aarch64
// (tests/test_neon.py cross-compiles it with kernels_scalar.cpp and kernels_neon.cpp).
//
//   kernel_check [--fault] [--bits B] ISA...     ISA: scalar, neon (AArch64), avx2, avx512 (x86-64)
//   (--bits B: only codes of B bits; default 1..8)
//
// Prints one line per ISA ("ISA: N checks passed") and the first failures; exit status 0 only when
// every check passed.  --fault spoils one element of each kernel output before it is checked: then
// every check must fail (the test asserts it: the comparisons can fail).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

using namespace bq;

namespace {

bool g_fault = false;
long g_checks = 0, g_failures = 0;

void fail(const std::string& what) {
    if (++g_failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

struct Case {
    int64_t K, N, block;
    bool lut, has_zp;
    int bits;
};

std::string name(const Case& c) {
    return std::string(c.lut ? "lut" : "affine") + " b" + std::to_string(c.bits) + " K" + std::to_string(c.K) +
           " N" + std::to_string(c.N) + " block" + std::to_string(c.block) + (c.lut || c.has_zp ? "" : " no-zp");
}

// A packed weight and its plain reference V (N, K), generated from random codes.
struct Packed {
    QWeight w;
    std::vector<uint8_t> B, zp;
    std::vector<float> scales, lut, V, zs;  // zs: |zp * s| per (n, k), the affine GEMV's extra term
};

// Code q of weight k, written where layout.h's bq_code_at reads it.
void put_code(uint8_t* row, int64_t K, int bits, int64_t k, int q) {
    int64_t c = k / BQ_CHUNK;
    bq_chunk ch = bq_chunk_at(K, bits, c);
    if (k >= ch.k0 + int64_t(ch.lanes) * ch.steps) ch = bq_chunk_at(K, bits, c + 1);
    const int64_t d = k - ch.k0;
    const int l = int(d % ch.lanes), i = int(d / ch.lanes);
    for (int t = 0; t < bits; ++t) {
        const int bit = i * bits + t;
        row[ch.byte0 + bq_lane_byte(ch.lanes, ch.lane_bytes, bit >> 3, l)] |= uint8_t(((q >> t) & 1) << (bit & 7));
    }
}

Packed make(const Case& c, std::mt19937_64& rng) {
    Packed p;
    QWeight& w = p.w;
    w.K = c.K; w.N = c.N; w.bits = c.bits; w.block = c.block; w.is_lut = c.lut;
    w.G = bq_n_groups(c.K, c.block);
    w.col_bytes = bq_col_bytes(c.K, c.bits);
    w.zp_bytes = bq_zp_bytes(w.G, c.bits);
    const int levels = 1 << c.bits;
    std::uniform_int_distribution<int> code(0, levels - 1);
    std::uniform_real_distribution<float> unif(-1.f, 1.f), scale(0.01f, 0.2f);
    std::vector<int> q(size_t(c.N * c.K)), z(size_t(c.N * w.G), levels / 2);
    for (int& v : q) v = code(rng);
    p.B.assign(size_t(c.N * w.col_bytes), 0);
    for (int64_t n = 0; n < c.N; ++n)
        for (int64_t k = 0; k < c.K; ++k) put_code(p.B.data() + n * w.col_bytes, c.K, c.bits, k, q[size_t(n * c.K + k)]);
    w.B = p.B.data();
    if (c.lut) {
        p.lut.resize(size_t(c.N * w.G * levels));
        for (float& v : p.lut) v = unif(rng);
        w.lut = p.lut.data();
    } else {
        p.scales.resize(size_t(c.N * w.G));
        for (float& v : p.scales) v = scale(rng);
        w.scales = p.scales.data();
        if (c.has_zp) {
            p.zp.assign(size_t(c.N * w.zp_bytes), 0);
            for (int64_t n = 0; n < c.N; ++n)
                for (int64_t g = 0; g < w.G; ++g) {
                    const int v = z[size_t(n * w.G + g)] = code(rng);
                    for (int t = 0; t < c.bits; ++t) {
                        const int64_t bit = g * c.bits + t;
                        p.zp[size_t(n * w.zp_bytes + bit / 8)] |= uint8_t(((v >> t) & 1) << (bit % 8));
                    }
                }
            w.zp = p.zp.data();
        }
    }
    p.V.resize(size_t(c.N * c.K));
    p.zs.assign(size_t(c.N * c.K), 0.f);
    for (int64_t n = 0; n < c.N; ++n)
        for (int64_t k = 0; k < c.K; ++k) {
            const int64_t g = bq_group_of(k, c.block), i = n * c.K + k;
            const int qq = q[size_t(i)];
            if (c.lut) {
                p.V[size_t(i)] = p.lut[size_t((n * w.G + g) * levels + qq)];
            } else {
                const float s = p.scales[size_t(n * w.G + g)], zz = float(z[size_t(n * w.G + g)]);
                p.V[size_t(i)] = (float(qq) - zz) * s;  // the layout's fp32 arithmetic
                p.zs[size_t(i)] = std::fabs(zz * s);
            }
        }
    return p;
}

void perturb(float* x) {
    if (g_fault) *x = NAN;  // fails the bitwise, the bound and the split comparisons alike
}

void check_decode(const Kernels& kr, const Packed& p, const std::string& what) {
    const QWeight& w = p.w;
    const int64_t ld = w.K + 3;  // a row stride other than K
    for (int64_t n0 : {int64_t(0), w.N / 2}) {
        std::vector<float> dst(size_t((w.N - n0) * ld), -7.f);
        kr.decode(w, n0, w.N, dst.data(), ld);
        perturb(&dst[0]);
        bool ok = true;
        for (int64_t n = n0; n < w.N && ok; ++n)
            ok = std::memcmp(&dst[size_t((n - n0) * ld)], &p.V[size_t(n * w.K)], size_t(w.K) * sizeof(float)) == 0;
        ++g_checks;
        if (!ok) fail(what + ": decode from column " + std::to_string(n0) + " differs from the reference");
    }
    // one row at a time, in any order: what GatherAffine / GatherLut do per index
    std::vector<float> row(size_t(w.K), -7.f);
    bool ok = true;
    for (int64_t n = w.N - 1; n >= 0 && ok; --n) {
        kr.decode(w, n, n + 1, row.data(), w.K);
        if (n == 0) perturb(&row[0]);
        ok = std::memcmp(row.data(), &p.V[size_t(n * w.K)], size_t(w.K) * sizeof(float)) == 0;
    }
    ++g_checks;
    if (!ok) fail(what + ": single-row decode (gather) differs from the reference");
}

// Y (a whole run) and Y2 (columns [0, cut) then [cut, N)) of A (M x K, lda apart) @ V^T: within the
// summation bound of the exact product, and the same bytes.
void check_product(const std::string& tag, const std::vector<float>& A, int64_t lda, int64_t M, int64_t N, int64_t K,
                   const std::vector<float>& V, const std::vector<float>& zs, const std::vector<float>& Y,
                   const std::vector<float>& Y2, int64_t cut) {
    const float eps = 1.1920929e-07f;
    int bad = 0;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            double exact = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
                const double a = A[size_t(m * lda + k)];
                exact += a * V[size_t(n * K + k)];
                mag += std::fabs(a) * (std::fabs(V[size_t(n * K + k)]) + zs[size_t(n * K + k)]);
            }
            // Higham's gamma_K for any summation order in fp32, doubled for margin (as in
            // tests/test_custom_ops.py); the |zp * s| term: the affine GEMV subtracts zp * s * sum(a)
            // apart from its sum of a * q * s.
            const double bound = 2.0 * double(K) * eps * mag + 1e-30;
            const float y = Y[size_t(m * N + n)];
            if (!(std::fabs(double(y) - exact) <= bound) && bad++ == 0)
                fail(tag + ": y[" + std::to_string(m) + "," + std::to_string(n) + "] = " + std::to_string(y) +
                     ", exact " + std::to_string(exact) + ", bound " + std::to_string(bound));
        }
    ++g_checks;
    ++g_checks;
    if (std::memcmp(Y.data(), Y2.data(), Y.size() * sizeof(float)) != 0)
        fail(tag + ": columns split at " + std::to_string(cut) + " give other bytes");
}

// gemv (gemm=false) or gemm: within the summation bound of the exact product, and the same bytes when
// the columns are split in two at `cut` (tasks split columns; sums must not depend on it).
void check_matmul(const Kernels& kr, const Packed& p, int64_t M, bool gemm, int64_t cut, std::mt19937_64& rng,
                  const std::string& what) {
    const QWeight& w = p.w;
    const int64_t K = w.K, N = w.N, lda = K + 3;
    std::uniform_real_distribution<float> unif(-1.f, 1.f);
    std::vector<float> A(size_t(M * lda));
    for (float& v : A) v = unif(rng);
    std::vector<float> SA(size_t(M * w.G));
    if (!w.is_lut) group_sums(w, A.data(), M, lda, SA.data());
    auto run = [&](float* Y, int64_t n0, int64_t n1) {
        if (gemm) kr.gemm(w, A.data(), M, lda, Y, N, n0, n1);
        else kr.gemv(w, A.data(), M, lda, Y, N, n0, n1, SA.data());
    };
    std::vector<float> Y(size_t(M * N), NAN), Y2(size_t(M * N), NAN);
    run(Y.data(), 0, N);
    perturb(&Y[0]);
    run(Y2.data(), 0, cut);
    run(Y2.data(), cut, N);
    check_product(what + (gemm ? " gemm" : " gemv") + " M" + std::to_string(M), A, lda, M, N, K, p.V, p.zs, Y, Y2, cut);
}

// ---- N:M sparse weights -------------------------------------------------------------------------------
// The keep-subsets of 0..of-1 in lexicographic order, built recursively (kernels_scalar.cpp iterates):
// positions as bitmasks.
void subsets(int of, int keep, int from, unsigned bits, std::vector<unsigned>& out) {
    if (keep == 0) {
        out.push_back(bits);
        return;
    }
    for (int t = from; t <= of - keep; ++t) subsets(of, keep - 1, t + 1, bits | (1u << t), out);
}

struct SparsePacked {
    Packed inner;            // the survivors (compacted view)
    SparseWeight s;
    std::vector<uint8_t> mask;
    std::vector<float> V, zs;  // dense reference (N, K), |zp * s| per weight (0 where pruned)
};

SparsePacked make_sparse(int keep, int of, int bits, int64_t K, int64_t N, int64_t block, std::mt19937_64& rng) {
    SparsePacked sp;
    const int64_t Kc = K * keep / of, runs = K / of;
    sp.inner = make(Case{Kc, N, block * keep / of, false, true, bits}, rng);
    std::vector<unsigned> pats;
    subsets(of, keep, 0, 0, pats);
    int pbits = 1;
    while ((size_t(1) << pbits) < pats.size()) ++pbits;
    const int64_t mb = (runs * pbits + 7) / 8;
    sp.mask.assign(size_t(N * mb), 0);
    sp.V.assign(size_t(N * K), 0.f);
    sp.zs.assign(size_t(N * K), 0.f);
    std::uniform_int_distribution<int> pick(0, int(pats.size()) - 1), bad(int(pats.size()), std::max(int(pats.size()), (1 << pbits) - 1));
    for (int64_t n = 0; n < N; ++n) {
        int64_t c = 0;
        for (int64_t r = 0; r < runs; ++r) {
            // one run in 16 with an index past the last pattern where the width allows one (a corrupt
            // mask): the kernels keep none of it and skip its keep survivors
            const bool invalid = (1 << pbits) > int(pats.size()) && rng() % 16 == 0;
            const int p = invalid ? bad(rng) : pick(rng);
            for (int t = 0; t < pbits; ++t)
                sp.mask[size_t(n * mb + (r * pbits + t) / 8)] |= uint8_t(((p >> t) & 1) << ((r * pbits + t) % 8));
            if (invalid) {
                c += keep;
                continue;
            }
            for (int t = 0; t < of; ++t)
                if ((pats[size_t(p)] >> t) & 1) {
                    sp.V[size_t(n * K + r * of + t)] = sp.inner.V[size_t(n * Kc + c)];
                    sp.zs[size_t(n * K + r * of + t)] = sp.inner.zs[size_t(n * Kc + c)];
                    ++c;
                }
        }
    }
    sp.s.inner = sp.inner.w;
    sp.s.mask = sp.mask.data();
    sp.s.K = K; sp.s.mask_bytes = mb; sp.s.keep = keep; sp.s.of = of; sp.s.pbits = pbits;
    return sp;
}

// sparse_gemv / sparse_gemm within the summation bound, and the same bytes under a column split.
void check_sparse(const Kernels& kr, const SparsePacked& sp, int64_t M, bool gemm, std::mt19937_64& rng,
                  const std::string& what) {
    const SparseWeight& s = sp.s;
    const int64_t K = s.K, N = s.inner.N, lda = K + 3, cut = N / 2 | 1;
    std::uniform_real_distribution<float> unif(-1.f, 1.f);
    std::vector<float> A(size_t(M * lda));
    for (float& v : A) v = unif(rng);
    auto run = [&](float* Y, int64_t n0, int64_t n1) { (gemm ? kr.sparse_gemm : kr.sparse_gemv)(s, A.data(), M, lda, Y, N, n0, n1); };
    std::vector<float> Y(size_t(M * N), NAN), Y2(size_t(M * N), NAN);
    run(Y.data(), 0, N);
    perturb(&Y[0]);
    run(Y2.data(), 0, cut);
    run(Y2.data(), cut, N);
    check_product(what + (gemm ? " sparse_gemm" : " sparse_gemv") + " M" + std::to_string(M), A, lda, M, N, K, sp.V, sp.zs,
                  Y, Y2, cut);
}

const Kernels* kernels_named(const std::string& isa) {
    if (isa == "scalar") return kernels_scalar();
    if (isa == "neon") return kernels_neon();
#if defined(__x86_64__)
    if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kernels_avx2() : nullptr;
    if (isa == "avx512") return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") ? kernels_avx512() : nullptr;
#endif
    return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> isas;
    int bits_lo = 1, bits_hi = 8;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--fault") g_fault = true;
        else if (a == "--bits" && i + 1 < argc) bits_lo = bits_hi = std::atoi(argv[++i]);
        else isas.push_back(a);
    }
    if (bits_lo < 1 || bits_hi > 8) {
        std::printf("--bits: 1..8\n");
        return 2;
    }
    if (isas.empty()) {
        std::printf("usage: kernel_check [--fault] ISA...\n");
        return 2;
    }
    // (K, N, block): full chunks; partial chunks of 8, 9 and 15 lanes (the latter two straddle groups
    // of 16); K % 8 tails; K < 8; odd N; one group per row; then GEMM blocking: several K slices
    // (K > 512), K % 4 tails, more columns than one task, and M over one row block below
    // (K > 1024: several GEMV K slices of 1024, the last one partial; 1100 x 6: a slice ending in a
    // partial chunk, N not a multiple of the 4-column GEMM panels)
    const int64_t shapes[][3] = {{203, 13, 16}, {576, 9, 32}, {255, 5, 64}, {136, 4, 0},  {5, 3, 16},
                                 {1000, 7, 128}, {2100, 24, 64}, {1030, 20, 32}, {131, 19, 0}, {600, 36, 16},
                                 {1100, 6, 32}};
    int status = 0;
    for (const std::string& isa : isas) {
        const Kernels* kr = kernels_named(isa);
        if (!kr) {
            std::printf("%s: not available in this build or on this CPU\n", isa.c_str());
            status = 1;
            continue;
        }
        const long checks0 = g_checks, failures0 = g_failures;
        std::mt19937_64 rng(12345);
        for (int bits = bits_lo; bits <= bits_hi; ++bits)
            for (int kind = 0; kind < 3; ++kind)  // LUT, affine with zero points, affine without
                for (const auto& s : shapes) {
                    const Case c{s[0], s[1], s[2], kind == 0, kind == 1, bits};
                    if (kind == 2 && s[0] != 576 && s[0] != 1030) continue;  // no-zp: two shapes suffice
                    const Packed p = make(c, rng);
                    const std::string what = isa + " " + name(c);
                    check_decode(*kr, p, what);
                    // GEMV: blocks of 4 rows and every remainder (1-3 rows); GEMM: a tile's row counts
                    // 1-6 and past it, row blocks (63-65, 150)
                    for (int64_t M = 1; M <= 9; ++M) check_matmul(*kr, p, M, false, std::min<int64_t>(4, c.N), rng, what);
                    std::vector<int64_t> ms = {1, 7, 8, 9, 64};
                    if (c.K > 1000) ms.insert(ms.end(), {63, 65, 150});
                    for (int64_t M : ms) check_matmul(*kr, p, M, true, c.N / 2 | 1, rng, what);
                }
        // sparse weights, where the set has its own kernels: patterns of 2, 4 and 8 (vector paths) and 6
        // (run by run), K % 8 tails, K slices of the GEMM, N not a multiple of the panels; survivors that
        // fill whole chunks (the fused GEMVs' last mask reads).  (keep, of, block, K, N)
        const int sparse[][5] = {{2, 4, 64, 1100, 37}, {1, 2, 32, 203 * 2, 5}, {4, 8, 64, 1096, 9}, {6, 8, 128, 256, 13},
                                 {3, 4, 64, 260, 6}, {3, 6, 96, 1098, 7}, {2, 4, 32, 1024, 11}, {4, 8, 128, 512, 6}};
        if (kr->sparse_gemv)
            for (int bits = bits_lo; bits <= bits_hi; ++bits)
                for (const auto& c : sparse) {
                    const SparsePacked sp = make_sparse(c[0], c[1], bits, c[3], c[4], c[2], rng);
                    const std::string what = isa + " sparse " + std::to_string(c[0]) + ":" + std::to_string(c[1]) +
                                             " b" + std::to_string(bits) + " K" + std::to_string(c[3]);
                    for (int64_t M : {1, 3, 9}) check_sparse(*kr, sp, M, false, rng, what);
                    for (int64_t M : {1, 7, 70}) check_sparse(*kr, sp, M, true, rng, what);
                }
        std::printf("%s: %ld checks, %ld failed\n", kr->name, g_checks - checks0, g_failures - failures0);
        if (g_failures > failures0) status = 1;
    }
    return status;
}
