// The bayesq MatMul*, Dequantize* and Gather* ops (dense and N:M sparse) for onnxruntime's
// CUDAExecutionProvider, run by the CUDA kernels (C API: include/bayesq/cuda.h).  Plain C++: no CUDA
// header is needed, the session's stream is a void* handed on to the kernels.
//
// Same signatures (ort_util.h's op descriptions: T and S float / float16), attributes and input checks
// as the CPU ops of src/ops.cpp, which add these to domain "bayesq" after their own when built with
// BAYESQ_CUDA_OPS (libbayesq_ops_cuda.so): onnxruntime gives a node to the CUDA kernel where the session
// runs the CUDA provider, and to the CPU one where the node falls back to the CPU.  Shapes and attributes
// are host metadata; inputs and the output (allocated by the kernel context) are device memory; the
// kernels are launched on the kernel context's compute stream, in order with onnxruntime's own kernels.
#include "bayesq/cuda.h"
#include "ort_util.h"

namespace bq {
namespace {

void cuda_check(int rc) {
    if (rc != BQ_CUDA_OK) throw Error(bq_cuda_last_error());
}

void* stream_of(OrtKernelContext* ctx) { return Ort::KernelContext(ctx).GetGPUComputeStream(); }

struct CudaKernel : QAttrs {
    static constexpr const char* provider = "CUDAExecutionProvider";

    using QAttrs::QAttrs;

    // Inputs first.. (B, scales/lut, zero_points?) checked against the attributes, as device pointers.
    bq_cuda_weight weight(OrtKernelContext* ctx, size_t first) const {
        const PackedInputs in = packed_inputs(ctx, first, *this);
        bq_cuda_weight w{};
        w.B = static_cast<const uint8_t*>(in.B.data);
        (is_lut ? w.lut : w.scales) = in.T.data;
        w.zp = in.Z ? static_cast<const uint8_t*>(in.Z.data) : nullptr;
        w.K = K, w.N = N, w.block = block, w.bits = bits;
        w.is_lut = is_lut;
        w.s_half = in.T.type == F16;
        return w;
    }
};

// A MatMul's A (input 0: (..., K)), optional bias (input `bias`: N) and Y (..., N), checked, on the device.
struct MatMulArgs {
    const void* a;
    const void* bias;
    void* y;
    int64_t M;   // rows of A

    MatMulArgs(OrtKernelContext* ctx, size_t bias_input, int64_t K, int64_t N) {
        const Tensor A = input(ctx, 0), b = input(ctx, bias_input);
        if (A.shape.empty() || A.shape.back() != K) throw Error("A's last dimension must be K=" + std::to_string(K));
        if (b) expect_numel(b, N, "bias");
        std::vector<int64_t> yshape = A.shape;
        yshape.back() = N;
        a = A.data, bias = b ? b.data : nullptr, y = output(ctx, 0, yshape), M = A.numel / K;
    }
};

// Y (..., N) = A (..., K) @ W (+ bias): the GEMV for few rows, the tensor-core GEMM from
// bq_cuda_gemm_min_rows() rows (cuda.h).
struct CudaMatMulKernel : CudaKernel {
    bool fp16;   // T: A, bias and Y are float16
    CudaMatMulKernel(const OrtKernelInfo* info, bool lut, bool half) : CudaKernel(info, lut), fp16(half) {}

    void Compute(OrtKernelContext* ctx) const {
        const bq_cuda_weight w = weight(ctx, 1);
        const MatMulArgs io(ctx, is_lut ? 3 : 4, K, N);
        cuda_check(bq_cuda_matmul(&w, io.a, io.M, io.bias, io.y, fp16, BQ_CUDA_AUTO, stream_of(ctx)));
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq CUDA matmul", [&] { Compute(ctx); });
    }
};

// W (float32, attribute `shape`) from its view: inner = the product of W's axes after `axis` (cuda.h).
struct CudaDequantizeKernel : CudaKernel {
    NativeLayout layout;
    CudaDequantizeKernel(const OrtKernelInfo* info, bool lut) : CudaKernel(info, lut), layout(info, K, N) {}

    void Compute(OrtKernelContext* ctx) const {
        const bq_cuda_weight w = weight(ctx, 0);
        void* out = output(ctx, 0, layout.shape);
        cuda_check(bq_cuda_dequantize(&w, layout.inner, out, 0, stream_of(ctx)));
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq CUDA dequantize", [&] { Compute(ctx); });
    }
};

// Y (*indices.shape, K) = rows of the table; the indices in host memory (GatherOp), checked by the kernel's
// entry point as the CPU op checks them.
struct CudaGatherKernel : CudaKernel {
    using CudaKernel::CudaKernel;

    void Compute(OrtKernelContext* ctx) const {
        const bq_cuda_weight w = weight(ctx, 1);
        const Tensor I = input(ctx, 0);
        std::vector<int64_t> yshape = I.shape;
        yshape.push_back(K);
        void* out = output(ctx, 0, yshape);
        cuda_check(bq_cuda_gather(&w, I.data, I.type == I64, I.numel, out, 0, stream_of(ctx)));
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq CUDA gather", [&] { Compute(ctx); });
    }
};

// N:M sparse weights: the survivors (B, scales, zero_points) checked as a dense weight of K * keep / of codes a
// row (SparseAttrs), then the mask.
struct CudaSparseKernel : CudaKernel, SparseAttrs {
    explicit CudaSparseKernel(const OrtKernelInfo* info) : CudaKernel(info, false), SparseAttrs(info, *this) {}

    bq_cuda_sparse_weight sparse(OrtKernelContext* ctx, size_t first) const {
        bq_cuda_sparse_weight s{};
        s.inner = weight(ctx, first);
        s.mask = mask(ctx, first + 3, N);
        s.K = K_full, s.keep = keep, s.of = of;
        return s;
    }
};

// Y = A @ W (+ bias): W decoded, then cuBLAS (cuda.h: the sparse ops' MatMul is correct, not fast).
struct CudaSparseMatMulKernel : CudaSparseKernel {
    bool fp16;
    CudaSparseMatMulKernel(const OrtKernelInfo* info, bool half) : CudaSparseKernel(info), fp16(half) {}

    void Compute(OrtKernelContext* ctx) const {
        const bq_cuda_sparse_weight w = sparse(ctx, 1);
        const MatMulArgs io(ctx, 5, K_full, N);
        cuda_check(bq_cuda_sparse_matmul(&w, io.a, io.M, io.bias, io.y, fp16, stream_of(ctx)));
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq CUDA sparse matmul", [&] { Compute(ctx); });
    }
};

struct CudaSparseDequantizeKernel : CudaSparseKernel {
    NativeLayout layout;
    explicit CudaSparseDequantizeKernel(const OrtKernelInfo* info) : CudaSparseKernel(info), layout(info, K_full, N) {}

    void Compute(OrtKernelContext* ctx) const {
        const bq_cuda_sparse_weight w = sparse(ctx, 0);
        void* out = output(ctx, 0, layout.shape);
        cuda_check(bq_cuda_sparse_dequantize(&w, layout.inner, out, 0, stream_of(ctx)));
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
        return guarded(ORT_RUNTIME_EXCEPTION, "bayesq CUDA sparse dequantize", [&] { Compute(ctx); });
    }
};

}  // namespace

OrtStatus* add_cuda_ops(OrtCustomOpDomain* domain) {
    return add_ops<CudaMatMulKernel, CudaDequantizeKernel, CudaGatherKernel, CudaSparseMatMulKernel,
                   CudaSparseDequantizeKernel>(domain);
}

}  // namespace bq
