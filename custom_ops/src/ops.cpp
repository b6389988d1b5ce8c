// The `bayesq` onnxruntime custom-op library: MatMulAffine, MatMulLut, DequantizeAffine, DequantizeLut,
// GatherAffine, GatherLut, MatMulSparseAffine, DequantizeSparseAffine (signatures and layout: include/bayesq/layout.h).  Built against the ORT C/C++ API headers of
// API version 21; loads in any later onnxruntime (the C API only grows).
//
// Kernels are picked once per kernel instance (session): BAYESQ_ISA=avx512|avx2|neon|scalar forces one
// (tests use it to check every path on one machine), otherwise the best the CPU supports.  Work is
// split over N through ORT's intra-op thread pool (KernelContext_ParallelFor).
//
// Attribute / input checks, the op descriptions and their registration are in ort_util.h, shared with the
// CUDAExecutionProvider's ops (cuda/ort_ops.cpp), which RegisterCustomOps adds after these when built with
// BAYESQ_CUDA_OPS (libbayesq_ops_cuda.so).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "ort_util.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace bq {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

// Advanced SIMD is part of the AArch64 base architecture on Linux; the hwcap check only guards
// against unusual kernels or emulators that hide it.
bool cpu_has_neon() {
#if defined(__aarch64__) && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#elif defined(__aarch64__)
    return true;
#else
    return false;
#endif
}

const Kernels* select_kernels() {
    const char* env = std::getenv("BAYESQ_ISA");
    std::string want = env && *env ? env : "auto";
    const Kernels* a512 = cpu_has_avx512() ? kernels_avx512() : nullptr;
    const Kernels* a2 = cpu_has_avx2() ? kernels_avx2() : nullptr;
    const Kernels* neon = cpu_has_neon() ? kernels_neon() : nullptr;
    if (want == "auto") return a512 ? a512 : a2 ? a2 : neon ? neon : kernels_scalar();
    if (want == "scalar") return kernels_scalar();
    if (want == "avx2" && a2) return a2;
    if (want == "avx512" && a512) return a512;
    if (want == "neon" && neon) return neon;
    if (want == "avx2" || want == "avx512" || want == "neon")
        throw Error("BAYESQ_ISA=" + want + ": this CPU (or this build) does not support it");
    throw Error("BAYESQ_ISA=" + want + ": expected auto, avx512, avx2, neon or scalar");
}

// ---- fp16 <-> fp32: F16C when the CPU has it, else the ORT headers' converters (both exact, round
// to nearest even) ------------------------------------------------------------------------------------
void to_float(const Ort::Float16_t* src, float* dst, int64_t n) {
    if (cpu_has_avx2() && kernels_avx2()) return half_to_float_f16c(reinterpret_cast<const uint16_t*>(src), dst, n);
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i].ToFloat();
}
void from_float(const float* src, Ort::Float16_t* dst, int64_t n) {
    if (cpu_has_avx2() && kernels_avx2()) return float_to_half_f16c(src, reinterpret_cast<uint16_t*>(dst), n);
    for (int64_t i = 0; i < n; ++i) dst[i] = Ort::Float16_t(src[i]);
}

// ---- parallel loop over ORT's intra-op pool ----------------------------------------------------------
template <class F>
void parallel_for(OrtKernelContext* ctx, size_t total, F&& f) {
    if (total == 0) return;
    if (total == 1) {
        f(size_t(0));
        return;
    }
    struct Box {
        F* f;
        std::exception_ptr err;
        std::mutex mu;
    } box{&f, nullptr, {}};
    auto tramp = [](void* p, size_t i) {
        Box* b = static_cast<Box*>(p);
        try {
            (*b->f)(i);
        } catch (...) {
            std::lock_guard<std::mutex> lock(b->mu);
            if (!b->err) b->err = std::current_exception();
        }
    };
    check(g_api->KernelContext_ParallelFor(ctx, tramp, total, 0, &box));
    if (box.err) std::rethrow_exception(box.err);
}

// ---- the common part of all four ops -----------------------------------------------------------------
// A weight whose scales/LUT may be float16.  float16 tables are widened (exactly) per task, rows
// [n0, n1) into a thread-local buffer, just before the kernels read them: no fp32 copy of the whole
// table (memory stays that of the fp16 file) and the widened rows are cache-hot.  The kernels see the
// same fp32 values, in the same per-column arithmetic, as for a float32 table.
struct Weight {
    QWeight w;
    const Ort::Float16_t* half = nullptr;  // the float16 table, or null (w already holds a float one)
    int64_t per_row = 0;                   // table entries per row (G, or G * 2^bits)

    // Rows [n0, n1) as a weight: returns `base` such that row n of `w` is row n - base of `*sub`.
    int64_t rows(int64_t n0, int64_t n1, QWeight* sub) const {
        *sub = w;
        if (!half) return 0;
        sub->N = n1 - n0;
        sub->B = w.B + n0 * w.col_bytes;
        if (w.zp) sub->zp = w.zp + n0 * w.zp_bytes;
        float* t = scratch(1, size_t((n1 - n0) * per_row));
        to_float(half + n0 * per_row, t, (n1 - n0) * per_row);
        (w.is_lut ? sub->lut : sub->scales) = t;
        return n0;
    }
};

struct QKernel : QAttrs {
    static constexpr const char* provider = "CPUExecutionProvider";   // the op descriptions of ort_util.h read it
    const Kernels* kern;

    QKernel(const OrtKernelInfo* info, bool lut) : QAttrs(info, lut), kern(select_kernels()) {}

    // Inputs first.. (B, scales/lut, zero_points?) checked against the attributes.
    Weight weight(OrtKernelContext* ctx, size_t first) const {
        const PackedInputs in = packed_inputs(ctx, first, *this);
        Weight out;
        QWeight& w = out.w;
        w.K = K; w.N = N; w.bits = bits; w.block = block; w.is_lut = is_lut;
        w.G = in.G;
        w.col_bytes = in.col_bytes;
        w.zp_bytes = in.zp_bytes;
        w.B = static_cast<const uint8_t*>(in.B.data);
        const float* t = static_cast<const float*>(in.T.data);
        if (in.T.type == F16) {
            out.half = static_cast<const Ort::Float16_t*>(in.T.data);
            out.per_row = in.T.numel / N;
            t = nullptr;  // only row slices, widened, are ever read
        }
        (is_lut ? w.lut : w.scales) = t;
        if (in.Z) w.zp = static_cast<const uint8_t*>(in.Z.data);
        return out;
    }
};

// Columns per task: about 64 tasks (the pool balances them dynamically), at least min_cols, whole
// groups of 4 columns (the SIMD GEMVs' unit).
int64_t column_block(int64_t N, int64_t min_cols) {
    const int64_t target = std::max<int64_t>(min_cols, (N + 63) / 64);
    return (target + 3) / 4 * 4;
}

// A MatMul's activations and output in fp32 (float16 ones converted, the output converted back by
// finish()), and its bias: shared by the dense and the sparse MatMul kernels.
struct MatMulIo {
    const float* a = nullptr;
    float* y = nullptr;
    const float* bias = nullptr;
    int64_t M = 0;
    bool fp16;
    void* yraw = nullptr;
    std::vector<float> a32, y32, b32;

    MatMulIo(OrtKernelContext* ctx, size_t bias_idx, int64_t K, int64_t N, bool half) : fp16(half) {
        Tensor A = input(ctx, 0), b = input(ctx, bias_idx);
        if (A.shape.empty() || A.shape.back() != K) throw Error("A's last dimension must be K=" + std::to_string(K));
        if (b) expect_numel(b, N, "bias");
        std::vector<int64_t> yshape = A.shape;
        yshape.back() = N;
        yraw = output(ctx, 0, yshape);
        M = A.numel / K;
        a = static_cast<const float*>(A.data);
        y = static_cast<float*>(yraw);
        bias = b ? static_cast<const float*>(b.data) : nullptr;
        if (!fp16) return;
        a32.resize(size_t(M * K));
        to_float(static_cast<const Ort::Float16_t*>(A.data), a32.data(), M * K);
        a = a32.data();
        y32.resize(size_t(M * N));
        y = y32.data();
        if (b) {
            b32.resize(size_t(N));
            to_float(static_cast<const Ort::Float16_t*>(b.data), b32.data(), N);
            bias = b32.data();
        }
    }
    void add_bias(int64_t N, int64_t n0, int64_t n1) const {
        if (!bias) return;
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = n0; n < n1; ++n) y[m * N + n] += bias[n];
    }
    void finish(int64_t N) const {
        if (fp16) from_float(y, static_cast<Ort::Float16_t*>(yraw), M * N);
    }
};

struct MatMulKernel : QKernel {
    bool fp16;
    int64_t gemm_min_rows = 0;  // BAYESQ_GEMM_MIN_ROWS: the GEMV/GEMM switch point, for tuning
    MatMulKernel(const OrtKernelInfo* info, bool lut, bool half) : QKernel(info, lut), fp16(half) {
        if (const char* e = std::getenv("BAYESQ_GEMM_MIN_ROWS")) gemm_min_rows = std::atoll(e);
    }

    void Compute(OrtKernelContext* ctx) {
        const Weight wt = weight(ctx, 1);
        const QWeight& w = wt.w;
        const MatMulIo io(ctx, is_lut ? 3 : 4, K, N, fp16);
        const int64_t M = io.M;
        if (M == 0) return;
        const float* a = io.a;
        float* y = io.y;
        auto add_bias = [&](int64_t n0, int64_t n1) { io.add_bias(N, n0, n1); };

        const Kernels* kr = simd_groups(w) ? kern : kernels_scalar();
        if (M < (gemm_min_rows > 0 ? gemm_min_rows : kr->gemm_min_rows[bits])) {
            std::vector<float> sa;
            if (!is_lut) {
                sa.resize(size_t(M * w.G));
                group_sums(w, a, M, K, sa.data());
            }
            const int64_t nb = column_block(N, 16);
            parallel_for(ctx, size_t((N + nb - 1) / nb), [&](size_t t) {
                const int64_t n0 = int64_t(t) * nb, n1 = std::min(N, n0 + nb);
                QWeight ws;
                const int64_t base = wt.rows(n0, n1, &ws);
                kr->gemv(ws, a, M, K, y + base, N, n0 - base, n1 - base, sa.data());
                add_bias(n0, n1);
            });
        } else {
            // Column blocks: each task decodes its columns once and runs every row of A through them
            // (so a task's panels are reused by all rows; the sums never depend on the split).
            const int64_t nb = kr->gemm_cols;
            parallel_for(ctx, size_t((N + nb - 1) / nb), [&](size_t t) {
                const int64_t n0 = int64_t(t) * nb, n1 = std::min(N, n0 + nb);
                QWeight ws;
                const int64_t base = wt.rows(n0, n1, &ws);
                kr->gemm(ws, a, M, K, y + base, N, n0 - base, n1 - base);
                add_bias(n0, n1);
            });
        }
        io.finish(N);
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq matmul", [&] { Compute(ctx); });
    }
};

struct DequantizeKernel : QKernel {
    NativeLayout layout;

    DequantizeKernel(const OrtKernelInfo* info, bool lut) : QKernel(info, lut), layout(info, K, N) {}

    void Compute(OrtKernelContext* ctx) {
        const Weight wt = weight(ctx, 0);
        const QWeight& w = wt.w;
        float* out = static_cast<float*>(output(ctx, 0, layout.shape));
        const Kernels* kr = simd_groups(w) ? kern : kernels_scalar();
        const int64_t nb = 16;
        parallel_for(ctx, size_t((N + nb - 1) / nb), [&](size_t t) {
            const int64_t n0 = int64_t(t) * nb, n1 = std::min(N, n0 + nb);
            float* buf = scratch(0, size_t(nb * K));
            QWeight ws;
            const int64_t base = wt.rows(n0, n1, &ws);
            kr->decode(ws, n0 - base, n1 - base, buf, K);
            // view row r = (outer, inner index) -> out[outer * K * inner + k * inner + inner index]
            for (int64_t k = 0; k < K; ++k)
                for (int64_t n = n0; n < n1; ++n) out[layout.at(n, k)] = buf[(n - n0) * K + k];
        });
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq dequantize", [&] { Compute(ctx); });
    }
};

// ---- N:M sparse weights (layout.h, "Sparse") ------------------------------------------------------------
// The survivors are a dense affine weight of K * keep / of codes per row (QKernel's K and block_size are
// set to that compacted view's); the pattern indices follow the zero points.
struct SparseKernel : QKernel, SparseAttrs {
    const Kernels* skern;   // the sparse entry points: the chosen set's, else AVX2's, else scalar

    explicit SparseKernel(const OrtKernelInfo* info) : QKernel(info, false), SparseAttrs(info, *this) {
        skern = kern->sparse_gemv ? kern : (cpu_has_avx2() && kernels_avx2()) ? kernels_avx2() : kernels_scalar();
    }

    // The weight from inputs first.. (B, scales, zero_points, mask); rows [n0, n1) as in Weight::rows.
    SparseWeight sparse(OrtKernelContext* ctx, size_t first, const Weight& wt, int64_t n0, int64_t n1, int64_t* base) const {
        SparseWeight s;
        *base = wt.rows(n0, n1, &s.inner);
        s.mask = mask(ctx, first + 3, N) + *base * mask_bytes;
        s.K = K_full; s.mask_bytes = mask_bytes; s.keep = keep; s.of = of; s.pbits = pbits;
        return s;
    }
    const Kernels* kernels_for(const QWeight& w) const { return simd_groups(w) ? skern : kernels_scalar(); }
};

struct SparseMatMulKernel : SparseKernel {
    bool fp16;
    SparseMatMulKernel(const OrtKernelInfo* info, bool half) : SparseKernel(info), fp16(half) {}

    void Compute(OrtKernelContext* ctx) {
        const Weight wt = weight(ctx, 1);
        const MatMulIo io(ctx, 5, K_full, N, fp16);
        const int64_t M = io.M;
        if (M == 0) return;
        const Kernels* kr = kernels_for(wt.w);
        const bool gemv = M < kr->gemm_min_rows[bits];
        const int64_t nb = gemv ? column_block(N, 16) : kr->gemm_cols;
        parallel_for(ctx, size_t((N + nb - 1) / nb), [&](size_t t) {
            const int64_t n0 = int64_t(t) * nb, n1 = std::min(N, n0 + nb);
            int64_t base = 0;
            const SparseWeight s = sparse(ctx, 1, wt, n0, n1, &base);
            (gemv ? kr->sparse_gemv : kr->sparse_gemm)(s, io.a, M, K_full, io.y + base, N, n0 - base, n1 - base);
            io.add_bias(N, n0, n1);
        });
        io.finish(N);
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq sparse matmul", [&] { Compute(ctx); });
    }
};

struct SparseDequantizeKernel : SparseKernel {
    NativeLayout layout;

    explicit SparseDequantizeKernel(const OrtKernelInfo* info) : SparseKernel(info), layout(info, K_full, N) {}

    void Compute(OrtKernelContext* ctx) {
        const Weight wt = weight(ctx, 0);
        float* out = static_cast<float*>(output(ctx, 0, layout.shape));
        const Kernels* kr = simd_groups(wt.w) ? kern : kernels_scalar();
        const int64_t nb = 16;
        parallel_for(ctx, size_t((N + nb - 1) / nb), [&](size_t t) {
            const int64_t n0 = int64_t(t) * nb, n1 = std::min(N, n0 + nb);
            int64_t base = 0;
            const SparseWeight s = sparse(ctx, 0, wt, n0, n1, &base);
            float* vc = scratch(0, size_t(K));
            float* row = scratch(2, size_t(K_full));
            for (int64_t n = n0; n < n1; ++n) {
                kr->decode(s.inner, n - base, n - base + 1, vc, K);
                sparse_expand_scalar(s, n - base, vc, row);
                for (int64_t k = 0; k < K_full; ++k) out[layout.at(n, k)] = row[k];
            }
        });
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq sparse dequantize", [&] { Compute(ctx); });
    }
};

// Rows of a packed table picked by index (an embedding lookup): each row is decoded, exactly, by the
// kernels' row decode straight into the output; a float16 table widens only the rows it reads.
struct GatherKernel : QKernel {
    GatherKernel(const OrtKernelInfo* info, bool lut) : QKernel(info, lut) {}

    void Compute(OrtKernelContext* ctx) {
        const Weight wt = weight(ctx, 1);
        Tensor I = input(ctx, 0);
        // ONNX Gather's rule: indices in [-N, N), negative ones count from the end; others are an error
        std::vector<int64_t> rows(size_t(I.numel));
        for (int64_t i = 0; i < I.numel; ++i) {
            const int64_t v = I.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 ? int64_t(static_cast<const int32_t*>(I.data)[i])
                                                                            : static_cast<const int64_t*>(I.data)[i];
            if (v < -N || v >= N)
                throw Error("index " + std::to_string(v) + " is out of range [-" + std::to_string(N) + ", " +
                            std::to_string(N) + ")");
            rows[size_t(i)] = v < 0 ? v + N : v;
        }
        std::vector<int64_t> yshape = I.shape;
        yshape.push_back(K);
        float* out = static_cast<float*>(output(ctx, 0, yshape));
        const Kernels* kr = simd_groups(wt.w) ? kern : kernels_scalar();
        const int64_t per_task = 64;   // rows per task: one row is a few hundred ns, a task a few us
        parallel_for(ctx, size_t((I.numel + per_task - 1) / per_task), [&](size_t t) {
            const int64_t i0 = int64_t(t) * per_task, i1 = std::min(I.numel, i0 + per_task);
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t n = rows[size_t(i)];
                QWeight ws;
                const int64_t base = wt.rows(n, n + 1, &ws);
                kr->decode(ws, n - base, n + 1 - base, out + i * K, K);
            }
        });
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq gather", [&] { Compute(ctx); });
    }
};

}  // namespace
}  // namespace bq

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
    const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
    if (!api) return nullptr;  // cannot even report: this ORT is older than API 21
    bq::g_api = api;
    Ort::InitApi(api);
    // One domain per registration, never released: a session may outlive anything we could tie it
    // to, and releasing at exit could run after onnxruntime itself is gone.
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain("bayesq", &domain)) return st;
    if (OrtStatus* st = bq::add_ops<bq::MatMulKernel, bq::DequantizeKernel, bq::GatherKernel, bq::SparseMatMulKernel,
                                    bq::SparseDequantizeKernel>(domain))
        return st;
#ifdef BAYESQ_CUDA_OPS
    if (OrtStatus* st = bq::add_cuda_ops(domain)) return st;   // libbayesq_ops_cuda.so: cuda/ort_ops.cpp
#endif
    return api->AddCustomOpDomain(options, domain);
}

// Which kernels a session created now would use (for reports and benchmarks).
__attribute__((visibility("default"))) const char* BayesqKernelIsa() {
    try {
        return bq::select_kernels()->name;
    } catch (...) {
        return "invalid BAYESQ_ISA";
    }
}

}  // extern "C"
