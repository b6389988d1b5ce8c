// What the bayesq ops share on every execution provider (src/ops.cpp: CPU; cuda/ort_ops.cpp: CUDA): the ORT
// C API handle, attribute and tensor access, the checks of a packed weight's inputs against the attributes
// (one-line errors), the Dequantize ops' output layout, and the MatMul / Dequantize op descriptions (types,
// optional inputs), templated on the kernel so that each provider's ops declare exactly the same signature.
// Included only by those two files, both compiled with the target's baseline flags (no -m flags: unlike
// kernels.h's helpers, these may be inline).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bayesq/layout.h"

namespace bq {

inline const OrtApi* g_api = nullptr;   // set by RegisterCustomOps

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

inline int64_t attr_int(const OrtKernelInfo* info, const char* name, bool required, int64_t dflt) {
    int64_t v = dflt;
    OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, &v);
    if (st) {
        g_api->ReleaseStatus(st);
        if (required) throw Error(std::string("missing attribute '") + name + "'");
        return dflt;
    }
    return v;
}

inline std::vector<int64_t> attr_ints(const OrtKernelInfo* info, const char* name) {
    size_t n = 0;
    OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
    if (st) {
        g_api->ReleaseStatus(st);
        return {};
    }
    std::vector<int64_t> v(n);
    if (n) {
        st = g_api->KernelInfoGetAttributeArray_int64(info, name, v.data(), &n);
        if (st) {
            g_api->ReleaseStatus(st);
            throw Error(std::string("cannot read attribute '") + name + "'");
        }
    }
    return v;
}

inline void check(OrtStatus* st) {
    if (st) {
        std::string msg = g_api->GetErrorMessage(st);
        g_api->ReleaseStatus(st);
        throw Error(msg);
    }
}

// An input's shape and type (host metadata) and its data: host memory on the CPU provider, device
// memory on CUDA.
struct Tensor {
    const OrtValue* v = nullptr;
    std::vector<int64_t> shape;
    int64_t numel = 0;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    const void* data = nullptr;
    explicit operator bool() const { return v != nullptr; }
};

inline Tensor input(OrtKernelContext* ctx, size_t i) {
    Tensor t;
    size_t count = 0;
    check(g_api->KernelContext_GetInputCount(ctx, &count));
    if (i >= count) return t;
    check(g_api->KernelContext_GetInput(ctx, i, &t.v));
    if (!t.v) return t;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(g_api->GetTensorTypeAndShape(t.v, &info));
    size_t nd = 0;
    OrtStatus* st = g_api->GetDimensionsCount(info, &nd);
    if (!st) {
        t.shape.resize(nd);
        st = g_api->GetDimensions(info, t.shape.data(), nd);
    }
    if (!st) st = g_api->GetTensorElementType(info, &t.type);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    check(st);
    t.numel = 1;
    for (int64_t d : t.shape) t.numel *= d;
    void* p = nullptr;
    check(g_api->GetTensorMutableData(const_cast<OrtValue*>(t.v), &p));
    t.data = p;
    return t;
}

// Output i allocated by the kernel context (on the provider's device).
inline void* output(OrtKernelContext* ctx, size_t i, const std::vector<int64_t>& shape) {
    OrtValue* v = nullptr;
    check(g_api->KernelContext_GetOutput(ctx, i, shape.data(), shape.size(), &v));
    void* p = nullptr;
    check(g_api->GetTensorMutableData(v, &p));
    return p;
}

inline void expect_numel(const Tensor& t, int64_t n, const char* what) {
    if (t.numel != n)
        throw Error(std::string(what) + " has " + std::to_string(t.numel) + " elements, expected " + std::to_string(n));
}

// f() with any exception turned into an onnxruntime status ("what: message"): nothing may unwind
// through the C API.
template <class F>
OrtStatusPtr guarded(OrtErrorCode code, const std::string& what, F&& f) {
    try {
        f();
        return nullptr;
    } catch (const std::exception& e) {
        return g_api->CreateStatus(code, (what + ": " + e.what()).c_str());
    }
}

template <class Make>
OrtStatusPtr create(void** out, const char* what, Make make) {
    return guarded(ORT_INVALID_ARGUMENT, std::string("bayesq ") + what, [&] { *out = make(); });
}

constexpr ONNXTensorElementDataType F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ONNXTensorElementDataType I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
constexpr ONNXTensorElementDataType I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;

// The attributes every op has (layout.h): K, N, bits, block_size, checked.
struct QAttrs {
    int64_t K, N, block;
    int bits;
    bool is_lut;

    QAttrs(const OrtKernelInfo* info, bool lut) : is_lut(lut) {
        K = attr_int(info, "K", true, 0);
        N = attr_int(info, "N", true, 0);
        bits = int(attr_int(info, "bits", true, 0));
        block = attr_int(info, "block_size", true, 0);
        if (K < 1 || N < 1) throw Error("K and N must be >= 1");
        if (bits < 1 || bits > BQ_MAX_BITS) throw Error("bits must be 1..8, got " + std::to_string(bits));
        if (block < 0) throw Error("block_size must be >= 0");
    }
};

// A packed weight's inputs first.. (B, scales/lut, zero_points?) checked against the attributes.
struct PackedInputs {
    Tensor B, T, Z;   // Z: absent for a LUT, or without zero points
    int64_t G, col_bytes, zp_bytes;
};

inline PackedInputs packed_inputs(OrtKernelContext* ctx, size_t first, const QAttrs& a) {
    PackedInputs in;
    in.G = bq_n_groups(a.K, a.block);
    in.col_bytes = bq_col_bytes(a.K, a.bits);
    in.zp_bytes = bq_zp_bytes(in.G, a.bits);
    in.B = input(ctx, first);
    in.T = input(ctx, first + 1);
    if (!in.B || in.B.type != U8) throw Error("B must be uint8");
    expect_numel(in.B, a.N * in.col_bytes, "B");
    if (!in.T || (in.T.type != F32 && in.T.type != F16))
        throw Error(a.is_lut ? "lut must be float or float16" : "scales must be float or float16");
    expect_numel(in.T, a.is_lut ? a.N * in.G * (int64_t(1) << a.bits) : a.N * in.G, a.is_lut ? "lut" : "scales");
    if (a.is_lut) return in;
    in.Z = input(ctx, first + 2);
    if (in.Z) {
        if (in.Z.type != U8) throw Error("zero_points must be uint8");
        expect_numel(in.Z, a.N * in.zp_bytes, "zero_points");
    }
    return in;
}

// The Dequantize ops' output layout (attributes shape, axis): view row n, element k goes to
// at(n, k) of the native tensor.
struct NativeLayout {
    std::vector<int64_t> shape;
    int64_t K, axis, inner;

    NativeLayout(const OrtKernelInfo* info, int64_t K_, int64_t N) : K(K_) {
        shape = attr_ints(info, "shape");
        if (shape.empty()) shape = {K, N};
        axis = attr_int(info, "axis", false, 0);
        const int64_t r = int64_t(shape.size());
        if (axis < -r || axis >= r) throw Error("axis out of range for shape");
        if (axis < 0) axis += r;
        int64_t numel = 1;
        for (int64_t d : shape) numel *= d;
        if (shape[size_t(axis)] != K || numel != K * N)
            throw Error("shape must have K at axis and K*N elements");
        inner = 1;
        for (int64_t i = axis + 1; i < r; ++i) inner *= shape[size_t(i)];
    }
    int64_t at(int64_t n, int64_t k) const { return (n / inner) * K * inner + k * inner + n % inner; }
};

// ---- op descriptions: Kernel(info, lut, fp16) / Kernel(info, lut) runs them on Kernel::provider ----------
// One registration per (activation type T, scales/LUT type S): onnxruntime merges same-named ops into
// one schema whose inputs accept the union of the types, and picks the kernel matching the inputs and
// the node's execution provider.
template <class Kernel>
struct MatMulOp : Ort::CustomOpBase<MatMulOp<Kernel>, Kernel, true> {
    bool lut;
    ONNXTensorElementDataType t, s;
    MatMulOp(bool lut_, ONNXTensorElementDataType t_, ONNXTensorElementDataType s_) : lut(lut_), t(t_), s(s_) {}
    OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
        return create(kernel, GetName(), [&] { return new Kernel(info, lut, t == F16); });
    }
    const char* GetName() const { return lut ? "MatMulLut" : "MatMulAffine"; }
    const char* GetExecutionProviderType() const { return Kernel::provider; }
    // affine: A, B, scales, zero_points?, bias?   LUT: A, B, lut, bias?
    size_t GetInputTypeCount() const { return lut ? 4 : 5; }
    ONNXTensorElementDataType GetInputType(size_t i) const {
        if (i == 0) return t;
        if (i == 1) return U8;
        if (i == 2) return s;
        if (!lut && i == 3) return U8;
        return t;  // bias
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
        return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return t; }
};

template <class Kernel>
struct DequantizeOp : Ort::CustomOpBase<DequantizeOp<Kernel>, Kernel, true> {
    bool lut;
    ONNXTensorElementDataType s;  // scales / LUT type
    DequantizeOp(bool lut_, ONNXTensorElementDataType s_) : lut(lut_), s(s_) {}
    OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
        return create(kernel, GetName(), [&] { return new Kernel(info, lut); });
    }
    const char* GetName() const { return lut ? "DequantizeLut" : "DequantizeAffine"; }
    const char* GetExecutionProviderType() const { return Kernel::provider; }
    size_t GetInputTypeCount() const { return lut ? 2 : 3; }
    ONNXTensorElementDataType GetInputType(size_t i) const { return i == 1 ? s : U8; }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
        return i < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return F32; }
};

// indices: int64 or int32 (one registration each, as for the table types).  The indices are read in host
// memory on every provider (OrtMemTypeCPUInput: onnxruntime copies them there), where they are checked:
// a kernel could not report a bad index without a synchronisation.
template <class Kernel>
struct GatherOp : Ort::CustomOpBase<GatherOp<Kernel>, Kernel, true> {
    bool lut;
    ONNXTensorElementDataType idx, s;  // indices type, scales / LUT type
    GatherOp(bool lut_, ONNXTensorElementDataType idx_, ONNXTensorElementDataType s_) : lut(lut_), idx(idx_), s(s_) {}
    OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
        return create(kernel, GetName(), [&] { return new Kernel(info, lut); });
    }
    const char* GetName() const { return lut ? "GatherLut" : "GatherAffine"; }
    const char* GetExecutionProviderType() const { return Kernel::provider; }
    // affine: indices, B, scales, zero_points?   LUT: indices, B, lut
    size_t GetInputTypeCount() const { return lut ? 3 : 4; }
    ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? idx : i == 2 ? s : U8; }
    OrtMemType GetInputMemoryType(size_t i) const { return i == 0 ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
        return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return F32; }
};

// N:M sparse weights (layout.h, "Sparse"): keep, of and the pattern stream's widths; the kernel's QAttrs K and
// block_size become the survivors' (K * keep / of, block_size * keep / of).
struct SparseAttrs {
    int64_t K_full, mask_bytes;
    int keep, of, pbits;

    SparseAttrs(const OrtKernelInfo* info, QAttrs& a) {
        keep = int(attr_int(info, "keep", true, 0));
        of = int(attr_int(info, "of", true, 0));
        if (!(1 <= keep && keep < of && of <= 8)) throw Error("keep and of must satisfy 1 <= keep < of <= 8");
        if (a.K % of || a.block <= 0 || a.block % of)
            throw Error("K and block_size must be multiples of of (block_size > 0)");
        K_full = a.K;
        a.K = a.K * keep / of;
        a.block = a.block * keep / of;
        uint8_t patterns[70];
        pbits = bq_pattern_bits(bq_sparse_patterns(keep, of, patterns));
        mask_bytes = bq_col_bytes(K_full / of, pbits);
    }
    // Input i (the mask), checked: N rows of mask_bytes.
    const uint8_t* mask(OrtKernelContext* ctx, size_t i, int64_t N) const {
        const Tensor Mk = input(ctx, i);
        if (!Mk || Mk.type != U8) throw Error("mask must be uint8");
        expect_numel(Mk, N * mask_bytes, "mask");
        return static_cast<const uint8_t*>(Mk.data);
    }
};

// A, B, scales, zero_points, mask, bias?
template <class Kernel>
struct SparseMatMulOp : Ort::CustomOpBase<SparseMatMulOp<Kernel>, Kernel, true> {
    ONNXTensorElementDataType t, s;
    SparseMatMulOp(ONNXTensorElementDataType t_, ONNXTensorElementDataType s_) : t(t_), s(s_) {}
    OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
        return create(kernel, GetName(), [&] { return new Kernel(info, t == F16); });
    }
    const char* GetName() const { return "MatMulSparseAffine"; }
    const char* GetExecutionProviderType() const { return Kernel::provider; }
    size_t GetInputTypeCount() const { return 6; }
    ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 || i == 5 ? t : i == 2 ? s : U8; }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
        return i < 5 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return t; }
};

// B, scales, zero_points, mask
template <class Kernel>
struct SparseDequantizeOp : Ort::CustomOpBase<SparseDequantizeOp<Kernel>, Kernel, true> {
    ONNXTensorElementDataType s;
    SparseDequantizeOp(ONNXTensorElementDataType s_) : s(s_) {}
    OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
        return create(kernel, GetName(), [&] { return new Kernel(info); });
    }
    const char* GetName() const { return "DequantizeSparseAffine"; }
    const char* GetExecutionProviderType() const { return Kernel::provider; }
    size_t GetInputTypeCount() const { return 4; }
    ONNXTensorElementDataType GetInputType(size_t i) const { return i == 1 ? s : U8; }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t) const { return INPUT_OUTPUT_REQUIRED; }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return F32; }
};

// Every op of the domain added to `domain` for one provider, its kernels the classes given: one registration
// per type variant (T, S, indices).  The descriptions live as long as the process (a session may outlive
// anything shorter).
template <class MatMulK, class DequantizeK, class GatherK, class SparseMatMulK, class SparseDequantizeK>
OrtStatus* add_ops(OrtCustomOpDomain* domain) {
    static MatMulOp<MatMulK> matmul[] = {{false, F32, F32}, {false, F32, F16}, {false, F16, F32}, {false, F16, F16},
                                         {true, F32, F32},  {true, F32, F16},  {true, F16, F32},  {true, F16, F16}};
    static DequantizeOp<DequantizeK> dequantize[] = {{false, F32}, {false, F16}, {true, F32}, {true, F16}};
    static GatherOp<GatherK> gather[] = {{false, I64, F32}, {false, I64, F16}, {false, I32, F32}, {false, I32, F16},
                                         {true, I64, F32},  {true, I64, F16},  {true, I32, F32},  {true, I32, F16}};
    static SparseMatMulOp<SparseMatMulK> sparse_matmul[] = {{F32, F32}, {F32, F16}, {F16, F32}, {F16, F16}};
    static SparseDequantizeOp<SparseDequantizeK> sparse_dequantize[] = {{F32}, {F16}};
    auto add = [&](auto& ops) -> OrtStatus* {
        for (OrtCustomOp& op : ops)
            if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &op)) return st;
        return nullptr;
    };
    OrtStatus* st = add(matmul);
    if (!st) st = add(dequantize);
    if (!st) st = add(gather);
    if (!st) st = add(sparse_matmul);
    if (!st) st = add(sparse_dequantize);
    return st;
}

// The CUDAExecutionProvider's ops added to `domain` (cuda/ort_ops.cpp; only in a library built with
// BAYESQ_CUDA_OPS, whose RegisterCustomOps calls it after adding the CPU ops).
OrtStatus* add_cuda_ops(OrtCustomOpDomain* domain);

}  // namespace bq
