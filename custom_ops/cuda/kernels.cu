// CUDA kernels of the bayesq ops (C entry points: bayesq/cuda.h).
//
// One decode for every path: a lane's word of layout.h (bq_lane_word), its step codes
// (bq_word_code) and a code's value (Decoder::value, bq_affine) are __host__ __device__, shared with
// the CPU kernels through layout.h, and bq_cuda_decode_host runs them on the host for the tests.
//   GEMV (up to 8 rows of A; decode): a warp per column of Y, each half-warp a chunk's 16 lanes, so the
//     codes are read once and coalesced, 4 chunks' words read ahead; where N is too narrow to fill the
//     GPU, K is split over blocks and the partial sums added in a fixed order.
//   GEMM (prefill, from 9 rows): 64 x 64 tiles of Y, one chunk (128 codes) of K per step, weights decoded into an
//     fp16 shared-memory tile, tensor cores (WMMA 16x16x16) with fp32 accumulators.
//   Dequantize: the weight into its op layout, for a library GEMM or an unpacked session.
//   Gather: rows of the view (an embedding table), indices checked on the host.
//   Sparse (N:M): a thread per run decodes its survivors code by code into the weight's layout; the
//     MatMul takes that weight, dense, into cuBLAS (correct, not fast: sparse formats are off by default).
//   cuBLAS (a forced path, for prefill): the weight dequantized into a temporary buffer of A's type, then
//     cuBLAS's GEMM; cuBLAS is not linked but taken from the process (torch and onnxruntime-gpu load it).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "bayesq/cuda.h"
#include "bayesq/layout.h"

namespace {

thread_local char g_error[512];

int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

int launched(cudaError_t e, const char* what) {
    if (e != cudaSuccess) return fail(BQ_CUDA_FAILED, "%s: %s", what, cudaGetErrorString(e));
    return BQ_CUDA_OK;
}

__host__ __device__ __forceinline__ float to_f(float x) { return x; }
__host__ __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// A packed weight's decode, shared by host and device: S the scales' (or table's) element type.
template <class S, bool LUT>
struct Decoder {
    const uint8_t* B;
    const S* s;
    const uint8_t* zp;
    int64_t K, N, block, G, col_bytes, zp_bytes;
    int bits;

    // What a group's values need: its table, or its zero point and scale.
    struct Group {
        const S* table;
        int zp;
        float scale;
    };

    __host__ __device__ const uint8_t* row(int64_t n) const { return B + n * col_bytes; }
    __host__ __device__ Group group(int64_t n, int64_t g) const {
        if (LUT) return Group{s + ((n * G + g) << bits), 0, 0.f};
        return Group{nullptr, zp ? bq_stream_at(zp + n * zp_bytes, bits, g) : (1 << (bits - 1)), to_f(s[n * G + g])};
    }
    __host__ __device__ float value(const Group& gr, int q) const {
        return LUT ? to_f(gr.table[q]) : bq_affine(q, gr.zp, gr.scale);
    }
    __host__ __device__ float value(int64_t n, int64_t g, int q) const { return value(group(n, g), q); }

    // f(k, V[n, k]) for the codes of lane l of chunk c of row n, in k order.
    template <class F>
    __host__ __device__ __forceinline__ void lane(int64_t n, int64_t c, int l, F&& f) const {
        const bq_chunk ch = bq_chunk_at(K, bits, c);
        if (l < ch.lanes) steps(n, ch, l, bq_lane_word(row(n) + ch.byte0, ch.lanes, ch.lane_bytes, l), f);
    }
    // The same from the lane's word, read beforehand (so that several reads can be in flight).
    template <class F>
    __host__ __device__ __forceinline__ void steps(int64_t n, const bq_chunk& ch, int l, uint64_t word, F&& f) const {
        if (ch.lanes == BQ_LANES && block % BQ_LANES == 0) {
            // a step of 16 lanes lies in one group: the group follows the step, one division a lane
            const unsigned per = unsigned(block / BQ_LANES), step0 = unsigned(ch.k0 / BQ_LANES);   // per 0: one group
            unsigned g = per ? step0 / per : 0u, r = per ? step0 % per : 0u;
            Group gr = group(n, g);
            for (int i = 0; i < ch.steps; ++i) {
                f(ch.k0 + BQ_LANES * i + l, value(gr, bq_word_code(word, bits, i)));
                if (per && ++r == per && i + 1 < ch.steps) r = 0, gr = group(n, ++g);
            }
            return;
        }
        for (int i = 0; i < ch.steps; ++i) {
            const int64_t k = ch.k0 + int64_t(ch.lanes) * i + l;
            f(k, value(n, bq_group_of(k, block), bq_word_code(word, bits, i)));
        }
    }
};

template <class S, bool LUT>
Decoder<S, LUT> decoder(const bq_cuda_weight& w) {
    Decoder<S, LUT> d;
    d.B = w.B;
    d.s = static_cast<const S*>(LUT ? w.lut : w.scales);
    d.zp = LUT ? nullptr : w.zp;
    d.K = w.K, d.N = w.N, d.block = w.block, d.bits = w.bits;
    d.G = bq_n_groups(w.K, w.block);
    d.col_bytes = bq_col_bytes(w.K, w.bits);
    d.zp_bytes = bq_zp_bytes(d.G, w.bits);
    return d;
}

// An N:M sparse weight (layout.h, "Sparse"): its survivors a dense affine weight `in` of K * keep / of
// codes a row; run r of row n keeps the positions of pattern bq_stream_at(mask row n, pbits, r).
struct Patterns {
    uint8_t bits[70];   // pattern p: bit t set when position t survives; C(8, 4) = 70 at most
    int count;
};

template <class S>
struct SparseDecoder {
    Decoder<S, false> in;
    const uint8_t* mask;
    int64_t K, mask_bytes;
    int keep, of, pbits;
    Patterns pat;

    // f(k, W[n, k]) for the `of` weights of run r of row n, zeros included.  A run whose index is past the
    // last pattern (a corrupt mask) keeps none; its survivors' slots are skipped all the same.
    template <class F>
    __host__ __device__ __forceinline__ void run(int64_t n, int64_t r, F&& f) const {
        const int p = bq_stream_at(mask + n * mask_bytes, pbits, r);
        const unsigned kept = p < pat.count ? pat.bits[p] : 0u;
        int64_t j = r * keep;   // its first survivor
        for (int t = 0; t < of; ++t) {
            float v = 0.f;
            if (kept >> t & 1u) {
                v = in.value(n, bq_group_of(j, in.block), bq_code_at(in.row(n), in.K, in.bits, j));
                ++j;
            }
            f(r * of + t, v);
        }
    }
};

// ---- GEMV ---------------------------------------------------------------------------------------

constexpr int kGemvWarps = 4;   // columns per block
constexpr int kGemvMaxRows = 8;

constexpr int kGemvBatch = 4;   // full chunks whose words a thread reads before using any

// Thread t's share (t in 0..31) of column n's dot products with MT >= M rows of A over chunks [c0, c1):
// the half-warp t / 16 takes every other chunk, lane t % 16 of it.  The words of kGemvBatch full chunks
// are read first, so that their loads are in flight together (a word is used right after its load
// otherwise, and a warp waits a memory latency per chunk).  __host__ too: bq_cuda_gemv_host runs the
// 32 threads of a warp one after another, which is how the tests check this walk on a CPU.
template <int MT, class T, class S, bool LUT>
__host__ __device__ __forceinline__ void warp_share(const Decoder<S, LUT>& d, const T* A, int M, int64_t n, int64_t c0,
                                                    int64_t c1, int t, float acc[MT]) {
    auto fma_rows = [&](int64_t k, float v) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
            if (m < M) acc[m] = fmaf(to_f(A[m * d.K + k]), v, acc[m]);
    };
    const int l = t & 15;
    const int64_t full = d.K / BQ_CHUNK < c1 ? d.K / BQ_CHUNK : c1;
    int64_t c = c0 + (t >> 4);
    for (; c + 2 * (kGemvBatch - 1) < full; c += 2 * kGemvBatch) {
        uint64_t word[kGemvBatch];
#pragma unroll
        for (int j = 0; j < kGemvBatch; ++j)
            word[j] = bq_lane_word(d.row(n) + (c + 2 * j) * BQ_LANES * d.bits, BQ_LANES, d.bits, l);
#pragma unroll
        for (int j = 0; j < kGemvBatch; ++j) d.steps(n, bq_chunk_at(d.K, d.bits, c + 2 * j), l, word[j], fma_rows);
    }
    for (; c < c1; c += 2) d.lane(n, c, l, fma_rows);
}

// How many blocks share a column's K (bq_cuda.h: split-K where N is narrow) and chunks per share: a warp
// per column; narrower than 16 warps per SM, K is split (at least 4 chunks a split, at most 64 splits).
__host__ __device__ inline void gemv_splits(int64_t N, int64_t nc, int sms, int64_t* splits, int64_t* per) {
    const int64_t want = int64_t(sms) * 16;
    int64_t s = N >= want ? 1 : (want + N - 1) / N;
    if (s > nc / 4) s = nc / 4 > 0 ? nc / 4 : 1;
    if (s > 64) s = 64;
    *per = (nc + s - 1) / s;
    *splits = (nc + *per - 1) / *per;
}

// Y[m, n] (or, split over K, part[split, m, n]) for the block's columns; MT >= M rows of A.
template <int MT, class T, class S, bool LUT>
__global__ void __launch_bounds__(kGemvWarps * 32, 1)   // min 1 block an SM: without it ptxas spilled 8 bytes at 80 registers
gemv_kernel(Decoder<S, LUT> d, const T* __restrict__ A, int M, const T* __restrict__ bias, T* __restrict__ Y,
            float* __restrict__ part, int64_t chunks_per_split) {
    const int t = threadIdx.x & 31;
    const int64_t n = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
    if (n >= d.N) return;   // the whole warp
    const int64_t nc = bq_n_chunks(d.K);
    const int64_t c0 = int64_t(blockIdx.y) * chunks_per_split;
    const int64_t c1 = c0 + chunks_per_split < nc ? c0 + chunks_per_split : nc;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    warp_share<MT>(d, A, M, n, c0, c1, t, acc);
#pragma unroll
    for (int m = 0; m < MT; ++m)
        for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
    if (t != 0) return;
#pragma unroll
    for (int m = 0; m < MT; ++m) {   // unrolled: acc stays in registers (a runtime index spills it)
        if (m >= M) break;
        if (part) part[(int64_t(blockIdx.y) * M + m) * d.N + n] = acc[m];
        else Y[m * d.N + n] = from_f<T>(bias ? acc[m] + to_f(bias[n]) : acc[m]);
    }
}

// Y[m, n] = sum over splits, in split order (the same bytes every run), plus the bias.
template <class T>
__global__ void add_splits(const float* __restrict__ part, int splits, int64_t MN, int64_t N, const T* __restrict__ bias,
                           T* __restrict__ Y) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= MN) return;
    float s = 0.f;
    for (int j = 0; j < splits; ++j) s += part[j * MN + i];
    Y[i] = from_f<T>(bias ? s + to_f(bias[i % N]) : s);
}

int sm_count() {
    static int count = [] {
        int dev = 0, c = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
            c = 0;
        return c > 0 ? c : 80;
    }();
    return count;
}

template <int MT, class T, class S, bool LUT>
cudaError_t gemv(const Decoder<S, LUT>& d, const T* A, int M, const T* bias, T* Y, cudaStream_t st) {
    int64_t splits = 1, per = 1;
    gemv_splits(d.N, bq_n_chunks(d.K), sm_count(), &splits, &per);
    const dim3 grid(unsigned((d.N + kGemvWarps - 1) / kGemvWarps), unsigned(splits));
    if (splits == 1) {
        gemv_kernel<MT, T, S, LUT><<<grid, kGemvWarps * 32, 0, st>>>(d, A, M, bias, Y, nullptr, per);
        return cudaGetLastError();
    }
    float* part = nullptr;
    const int64_t MN = int64_t(M) * d.N;
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&part), size_t(splits * MN) * sizeof(float), st);
    if (e != cudaSuccess) return e;
    gemv_kernel<MT, T, S, LUT><<<grid, kGemvWarps * 32, 0, st>>>(d, A, M, bias, Y, part, per);
    add_splits<T><<<unsigned((MN + 255) / 256), 256, 0, st>>>(part, int(splits), MN, d.N, bias, Y);
    e = cudaGetLastError();
    cudaError_t f = cudaFreeAsync(part, st);
    return e != cudaSuccess ? e : f;
}

// ---- GEMM ---------------------------------------------------------------------------------------

constexpr int kTileM = 64, kTileN = 64, kTileK = BQ_CHUNK, kLds = kTileK + 8;   // +8 halves: rows off by 16 bytes
constexpr int kGemmThreads = 128;                                               // 4 warps, 32 x 32 of Y each

// Thread tid's share of K step kt's tiles: A's rows m0 .. m0 + 63 rounded to fp16, and V's rows n0 .. n0 + 63
// decoded into fp16 (Bs[j][k]: V's rows, i.e. W (K x N) column-major), zeros past M, N and K.  __host__
// too: bq_cuda_gemm_host fills the tiles thread by thread on the CPU, which is how the tests check it.
template <class T, class S, bool LUT>
__host__ __device__ __forceinline__ void fill_tiles(const Decoder<S, LUT>& d, const T* A, int64_t M, int64_t m0,
                                                    int64_t n0, int64_t kt, int tid, __half (*As)[kLds],
                                                    __half (*Bs)[kLds]) {
    const int64_t k0 = kt * kTileK;
    for (int e = tid; e < kTileM * kTileK; e += kGemmThreads) {
        const int r = e / kTileK, c = e % kTileK;
        const int64_t m = m0 + r, k = k0 + c;
        As[r][c] = __float2half_rn(m < M && k < d.K ? to_f(A[m * d.K + k]) : 0.f);
    }
    if (kt < d.K / BQ_CHUNK) {
        // a full chunk: 16 lanes x 8 steps of each of the tile's 64 rows of V
        for (int e = tid; e < kTileN * BQ_LANES; e += kGemmThreads) {
            const int j = e / BQ_LANES, l = e % BQ_LANES;
            const int64_t n = n0 + j;
            if (n < d.N) d.lane(n, kt, l, [&](int64_t k, float v) { Bs[j][k - k0] = __float2half_rn(v); });
            else
                for (int i = 0; i < BQ_STEPS; ++i) Bs[j][i * BQ_LANES + l] = __float2half_rn(0.f);
        }
        return;
    }
    // the tail (< 128 codes, one or two short chunks): code by code, zeros past K
    for (int e = tid; e < kTileN * kTileK; e += kGemmThreads) {
        const int j = e / kTileK, c = e % kTileK;
        const int64_t n = n0 + j, k = k0 + c;
        Bs[j][c] = __float2half_rn(n < d.N && k < d.K
                                       ? d.value(n, bq_group_of(k, d.block), bq_code_at(d.row(n), d.K, d.bits, k))
                                       : 0.f);
    }
}

template <class T, class S, bool LUT>
__global__ void __launch_bounds__(kGemmThreads)
gemm_kernel(Decoder<S, LUT> d, const T* __restrict__ A, int64_t M, const T* __restrict__ bias, T* __restrict__ Y) {
    using namespace nvcuda;
    __shared__ __align__(32) __half As[kTileM][kLds];
    __shared__ __align__(32) __half Bs[kTileN][kLds];   // Bs[j][k]: V's rows, i.e. W (K x N) column-major
    const int64_t m0 = int64_t(blockIdx.y) * kTileM, n0 = int64_t(blockIdx.x) * kTileN;
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const int64_t tiles = (d.K + kTileK - 1) / kTileK;
    for (int64_t kt = 0; kt < tiles; ++kt) {
        fill_tiles(d, A, M, m0, n0, kt, tid, As, Bs);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wm + 16 * i][kk], kLds);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wn + 16 * j][kk], kLds);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    // through shared memory (As reused: 64 x 64 floats fit in its 64 x 136 halves), then guarded stores
    float* Cs = reinterpret_cast<float*>(&As[0][0]);
    static_assert(kTileM * kTileN * sizeof(float) <= sizeof(As), "C tile must fit in A's tile");
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Cs + (wm + 16 * i) * kTileN + wn + 16 * j, acc[i][j], kTileN, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < kTileM * kTileN; e += kGemmThreads) {
        const int64_t m = m0 + e / kTileN, n = n0 + e % kTileN;
        if (m < M && n < d.N) Y[m * d.N + n] = from_f<T>(bias ? Cs[e] + to_f(bias[n]) : Cs[e]);
    }
}

template <class T, class S, bool LUT>
cudaError_t gemm(const Decoder<S, LUT>& d, const T* A, int64_t M, const T* bias, T* Y, cudaStream_t st) {
    const dim3 grid(unsigned((d.N + kTileN - 1) / kTileN), unsigned((M + kTileM - 1) / kTileM));
    gemm_kernel<T, S, LUT><<<grid, kGemmThreads, 0, st>>>(d, A, M, bias, Y);
    return cudaGetLastError();
}

// ---- Dequantize ---------------------------------------------------------------------------------

// One thread per lane of a chunk of a row.  Into V (inner 1) consecutive threads take consecutive
// lanes (consecutive k); into a transposed layout consecutive rows n, so the stores stay coalesced.
template <class O, class S, bool LUT>
__global__ void dequant_kernel(Decoder<S, LUT> d, int64_t inner, O* __restrict__ W) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t lanes = bq_n_chunks(d.K) * BQ_LANES;
    if (idx >= d.N * lanes) return;
    int64_t n, cl;
    if (inner == 1) n = idx / lanes, cl = idx % lanes;
    else n = idx % d.N, cl = idx / d.N;
    const int64_t o = n / inner, i = n % inner;
    d.lane(n, cl / BQ_LANES, int(cl % BQ_LANES), [&](int64_t k, float v) { W[(o * d.K + k) * inner + i] = from_f<O>(v); });
}

// The same for a sparse weight: one thread per run of a row.
template <class O, class S>
__global__ void sparse_dequant_kernel(SparseDecoder<S> d, int64_t inner, O* __restrict__ W) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t runs = d.K / d.of;
    if (idx >= d.in.N * runs) return;
    int64_t n, r;
    if (inner == 1) n = idx / runs, r = idx % runs;
    else n = idx % d.in.N, r = idx / d.in.N;
    const int64_t o = n / inner, i = n % inner;
    d.run(n, r, [&](int64_t k, float v) { W[(o * d.K + k) * inner + i] = from_f<O>(v); });
}

// Y[r, :] = V[rows[r], :]: one thread per lane of a chunk of an output row.
template <class O, class S, bool LUT>
__global__ void gather_kernel(Decoder<S, LUT> d, const int64_t* __restrict__ rows, int64_t count, O* __restrict__ Y) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t lanes = bq_n_chunks(d.K) * BQ_LANES;
    if (idx >= count * lanes) return;
    const int64_t r = idx / lanes, cl = idx % lanes;
    d.lane(rows[r], cl / BQ_LANES, int(cl % BQ_LANES), [&](int64_t k, float v) { Y[r * d.K + k] = from_f<O>(v); });
}

// ---- cuBLAS, found at run time -------------------------------------------------------------------

// The three functions used, declared by their C ABI (cublas_api.h is not needed to build): handles
// and streams are pointers, enums ints.  Values: CUBLAS_OP_N 0, CUBLAS_OP_T 1, CUBLAS_COMPUTE_32F 68,
// CUBLAS_GEMM_DEFAULT -1; data types from library_types.h.
struct Cublas {
    int (*create)(void** handle) = nullptr;
    int (*set_stream)(void* handle, cudaStream_t stream) = nullptr;
    int (*gemm)(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int a_type,
                int lda, const void* B, int b_type, int ldb, const void* beta, void* C, int c_type, int ldc,
                int compute_type, int algo) = nullptr;
    bool ok = false;
};

const Cublas& cublas() {
    static const Cublas c = [] {
        Cublas r;
        for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
            void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
            if (!h) continue;
            r.create = reinterpret_cast<decltype(r.create)>(dlsym(h, "cublasCreate_v2"));
            r.set_stream = reinterpret_cast<decltype(r.set_stream)>(dlsym(h, "cublasSetStream_v2"));
            r.gemm = reinterpret_cast<decltype(r.gemm)>(dlsym(h, "cublasGemmEx"));
            r.ok = r.create && r.set_stream && r.gemm;
            if (r.ok) break;
        }
        return r;
    }();
    return c;
}

// One handle per thread and device (a handle belongs to the device current when it was made), kept for
// the process's life: destroying it at thread exit could run after the CUDA context is gone.
void* cublas_handle() {
    thread_local void* handles[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return nullptr;
    if (!handles[dev] && cublas().create(&handles[dev]) != 0) handles[dev] = nullptr;
    return handles[dev];
}

template <class T>
__global__ void fill_rows(T* __restrict__ Y, const T* __restrict__ bias, int64_t MN, int64_t N) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < MN) Y[i] = bias[i % N];
}

// Y = A @ V^T (+ bias) as cuBLAS computes it, V (N x K) written into a temporary buffer of A's type by
// fill(V, stream): column-major, Y^T (N x M) = V (N x K, i.e. V^T's K x N stored column-major, transposed)
// times A^T (K x M); the bias goes in as C with beta 1, so the sum is rounded once.
template <class T, class Fill>
int cublas_matmul(int64_t K, int64_t N, Fill&& fill, const T* A, int64_t M, const T* bias, T* Y, cudaStream_t st) {
    if (!cublas().ok) return fail(BQ_CUDA_FAILED, "cuBLAS not found in this process (libcublas.so.13 / .12)");
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return fail(BQ_CUDA_BAD_ARG, "cuBLAS takes 32-bit sizes");
    void* h = cublas_handle();
    if (!h) return fail(BQ_CUDA_FAILED, "cuBLAS: no handle");
    const bool half = sizeof(T) == 2;
    T* V = nullptr;
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&V), size_t(N * K) * sizeof(T), st);
    if (e != cudaSuccess) return launched(e, "cuBLAS path: temporary weight");
    fill(V, st);
    if (bias) fill_rows<<<unsigned((M * N + 255) / 256), 256, 0, st>>>(Y, bias, M * N, N);
    const float one = 1.f, beta = bias ? 1.f : 0.f;
    const int type = half ? CUDA_R_16F : CUDA_R_32F;
    int status = cublas().set_stream(h, st);
    if (status == 0)
        status = cublas().gemm(h, 1, 0, int(N), int(M), int(K), &one, V, type, int(K), A, type, int(K), &beta, Y, type,
                               int(N), 68, -1);
    e = cudaGetLastError();
    const cudaError_t f = cudaFreeAsync(V, st);
    if (status != 0) return fail(BQ_CUDA_FAILED, "cuBLAS GEMM: status %d", status);
    return launched(e != cudaSuccess ? e : f, "cuBLAS path");
}

template <class T, class D>
int cublas_matmul(const D& d, const T* A, int64_t M, const T* bias, T* Y, cudaStream_t st) {
    const int64_t lanes = d.N * bq_n_chunks(d.K) * BQ_LANES;
    return cublas_matmul(d.K, d.N, [&](T* V, cudaStream_t s) {
        dequant_kernel<<<unsigned((lanes + 255) / 256), 256, 0, s>>>(d, 1, V);
    }, A, M, bias, Y, st);
}

// ---- Entry points -------------------------------------------------------------------------------

int check(const bq_cuda_weight* w) {
    if (!w) return fail(BQ_CUDA_BAD_ARG, "no weight given");
    if (w->bits < 1 || w->bits > BQ_MAX_BITS) return fail(BQ_CUDA_BAD_ARG, "bits must be 1..8, got %d", w->bits);
    if (w->K < 1 || w->N < 1) return fail(BQ_CUDA_BAD_ARG, "K and N must be positive, got K=%lld N=%lld", (long long)w->K, (long long)w->N);
    if (w->block < 0) return fail(BQ_CUDA_BAD_ARG, "block_size must be 0 or positive, got %lld", (long long)w->block);
    if (!w->B || !(w->is_lut ? w->lut : w->scales))
        return fail(BQ_CUDA_BAD_ARG, "the codes and the %s are required", w->is_lut ? "table" : "scales");
    return BQ_CUDA_OK;
}

// f(Decoder<S, LUT>) for the weight's scale type and kind, and what f returns.
template <class F>
auto with_decoder(const bq_cuda_weight& w, F&& f) {
    if (w.is_lut) return w.s_half ? f(decoder<__half, true>(w)) : f(decoder<float, true>(w));
    return w.s_half ? f(decoder<__half, false>(w)) : f(decoder<float, false>(w));
}

template <class T, class D>
cudaError_t matmul(const D& d, const void* A, int64_t M, const void* bias, void* Y, bool use_gemm, cudaStream_t st) {
    const T* a = static_cast<const T*>(A);
    const T* b = static_cast<const T*>(bias);
    T* y = static_cast<T*>(Y);
    if (use_gemm) return gemm(d, a, M, b, y, st);
    const int m = int(M);
    if (m <= 1) return gemv<1>(d, a, m, b, y, st);
    if (m <= 2) return gemv<2>(d, a, m, b, y, st);
    if (m <= 4) return gemv<4>(d, a, m, b, y, st);
    return gemv<kGemvMaxRows>(d, a, m, b, y, st);
}

template <class S>
SparseDecoder<S> sparse_decoder(const bq_cuda_sparse_weight& w) {
    SparseDecoder<S> d;
    d.in = decoder<S, false>(w.inner);
    d.mask = w.mask;
    d.K = w.K, d.keep = w.keep, d.of = w.of;
    d.pat.count = bq_sparse_patterns(w.keep, w.of, d.pat.bits);
    d.pbits = bq_pattern_bits(d.pat.count);
    d.mask_bytes = bq_col_bytes(w.K / w.of, d.pbits);
    return d;
}

int check_sparse(const bq_cuda_sparse_weight* w) {
    if (!w) return fail(BQ_CUDA_BAD_ARG, "no weight given");
    if (!(1 <= w->keep && w->keep < w->of && w->of <= 8)) return fail(BQ_CUDA_BAD_ARG, "keep and of must satisfy 1 <= keep < of <= 8");
    if (w->K < 1 || w->K % w->of || w->inner.K != w->K / w->of * w->keep)
        return fail(BQ_CUDA_BAD_ARG, "K must be a multiple of of, the survivors' K = K * keep / of");
    if (w->inner.is_lut || !w->mask) return fail(BQ_CUDA_BAD_ARG, "a sparse weight has affine survivors and a mask");
    return check(&w->inner);
}

template <class F>
auto with_sparse_decoder(const bq_cuda_sparse_weight& w, F&& f) {
    return w.inner.s_half ? f(sparse_decoder<__half>(w)) : f(sparse_decoder<float>(w));
}

}  // namespace

extern "C" {

const char* bq_cuda_last_error(void) { return g_error; }

int bq_cuda_gemm_min_rows(void) { return kGemvMaxRows + 1; }

int bq_cuda_matmul(const bq_cuda_weight* w, const void* A, int64_t M, const void* bias, void* Y, int io_half, int path,
                   void* stream) {
    if (int rc = check(w)) return rc;
    if (M < 0 || (M > 0 && (!A || !Y))) return fail(BQ_CUDA_BAD_ARG, "A and Y are required (M=%lld)", (long long)M);
    if (path < BQ_CUDA_AUTO || path > BQ_CUDA_CUBLAS) return fail(BQ_CUDA_BAD_ARG, "unknown path %d", path);
    const bool use_gemm = path == BQ_CUDA_GEMM || (path == BQ_CUDA_AUTO && M > kGemvMaxRows);
    if (!use_gemm && M > kGemvMaxRows) return fail(BQ_CUDA_BAD_ARG, "the GEMV takes at most %d rows, got %lld", kGemvMaxRows, (long long)M);
    if (M == 0) return BQ_CUDA_OK;
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    if (path == BQ_CUDA_CUBLAS)
        return with_decoder(*w, [&](auto d) {
            return io_half ? cublas_matmul(d, static_cast<const __half*>(A), M, static_cast<const __half*>(bias),
                                           static_cast<__half*>(Y), st)
                           : cublas_matmul(d, static_cast<const float*>(A), M, static_cast<const float*>(bias),
                                           static_cast<float*>(Y), st);
        });
    return launched(with_decoder(*w, [&](auto d) {
                        return io_half ? matmul<__half>(d, A, M, bias, Y, use_gemm, st) : matmul<float>(d, A, M, bias, Y, use_gemm, st);
                    }),
                    use_gemm ? "bayesq GEMM" : "bayesq GEMV");
}

int bq_cuda_dequantize(const bq_cuda_weight* w, int64_t inner, void* W, int out_half, void* stream) {
    if (int rc = check(w)) return rc;
    if (!W) return fail(BQ_CUDA_BAD_ARG, "no output given");
    if (inner < 1 || w->N % inner != 0) return fail(BQ_CUDA_BAD_ARG, "inner (%lld) must divide N (%lld)", (long long)inner, (long long)w->N);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int64_t threads = w->N * bq_n_chunks(w->K) * BQ_LANES;
    const unsigned blocks = unsigned((threads + 255) / 256);
    return launched(with_decoder(*w, [&](auto d) {
                        if (out_half) dequant_kernel<<<blocks, 256, 0, st>>>(d, inner, static_cast<__half*>(W));
                        else dequant_kernel<<<blocks, 256, 0, st>>>(d, inner, static_cast<float*>(W));
                        return cudaGetLastError();
                    }),
                    "bayesq dequantize");
}

int bq_cuda_gather(const bq_cuda_weight* w, const void* indices, int idx64, int64_t count, void* Y, int out_half,
                   void* stream) {
    if (int rc = check(w)) return rc;
    if (count < 0 || (count > 0 && (!indices || !Y))) return fail(BQ_CUDA_BAD_ARG, "indices and Y are required");
    if (count == 0) return BQ_CUDA_OK;
    // checked here, as the CPU op checks them (a kernel could not report it without a synchronisation)
    std::vector<int64_t> rows(static_cast<size_t>(count));
    for (int64_t r = 0; r < count; ++r) {
        int64_t i = idx64 ? static_cast<const int64_t*>(indices)[r] : static_cast<const int32_t*>(indices)[r];
        if (i < -w->N || i >= w->N)
            return fail(BQ_CUDA_BAD_ARG, "index %lld out of range for %lld rows", (long long)i, (long long)w->N);
        rows[size_t(r)] = i < 0 ? i + w->N : i;
    }
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    int64_t* drows = nullptr;
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&drows), size_t(count) * sizeof(int64_t), st);
    if (e != cudaSuccess) return launched(e, "bayesq gather");
    // from pageable memory the copy has taken the rows before it returns, so `rows` may go
    e = cudaMemcpyAsync(drows, rows.data(), size_t(count) * sizeof(int64_t), cudaMemcpyHostToDevice, st);
    const int64_t threads = count * bq_n_chunks(w->K) * BQ_LANES;
    const unsigned blocks = unsigned((threads + 255) / 256);
    if (e == cudaSuccess)
        e = with_decoder(*w, [&](auto d) {
            if (out_half) gather_kernel<<<blocks, 256, 0, st>>>(d, drows, count, static_cast<__half*>(Y));
            else gather_kernel<<<blocks, 256, 0, st>>>(d, drows, count, static_cast<float*>(Y));
            return cudaGetLastError();
        });
    const cudaError_t f = cudaFreeAsync(drows, st);
    return launched(e != cudaSuccess ? e : f, "bayesq gather");
}

int bq_cuda_gemv_host(const bq_cuda_weight* w, const float* A, int64_t M, int sms, float* Y) {
    if (int rc = check(w)) return rc;
    if (M < 1 || M > kGemvMaxRows || !A || !Y) return fail(BQ_CUDA_BAD_ARG, "the GEMV takes 1..%d rows", kGemvMaxRows);
    with_decoder(*w, [&](auto d) {
        const int64_t nc = bq_n_chunks(d.K);
        int64_t splits = 1, per = 1;
        gemv_splits(d.N, nc, sms, &splits, &per);
        for (int64_t n = 0; n < d.N; ++n) {
            float y[kGemvMaxRows] = {};
            for (int64_t sp = 0; sp < splits; ++sp)
                for (int t = 0; t < 32; ++t) {
                    float acc[kGemvMaxRows] = {};
                    const int64_t c0 = sp * per, c1 = c0 + per < nc ? c0 + per : nc;
                    warp_share<kGemvMaxRows>(d, A, int(M), n, c0, c1, t, acc);
                    for (int m = 0; m < M; ++m) y[m] += acc[m];
                }
            for (int m = 0; m < M; ++m) Y[m * d.N + n] = y[m];
        }
    });
    return BQ_CUDA_OK;
}

int bq_cuda_gemm_host(const bq_cuda_weight* w, const float* A, int64_t M, float* Y) {
    if (int rc = check(w)) return rc;
    if (M < 1 || !A || !Y) return fail(BQ_CUDA_BAD_ARG, "A and Y are required");
    with_decoder(*w, [&](auto d) {
        std::vector<__half> as(size_t(kTileM) * kLds), bs(size_t(kTileN) * kLds);
        auto* As = reinterpret_cast<__half(*)[kLds]>(as.data());
        auto* Bs = reinterpret_cast<__half(*)[kLds]>(bs.data());
        std::vector<float> C(size_t(kTileM) * kTileN);
        for (int64_t m0 = 0; m0 < M; m0 += kTileM)
            for (int64_t n0 = 0; n0 < d.N; n0 += kTileN) {
                std::fill(C.begin(), C.end(), 0.f);
                for (int64_t kt = 0; kt < (d.K + kTileK - 1) / kTileK; ++kt) {
                    for (int tid = 0; tid < kGemmThreads; ++tid) fill_tiles(d, A, M, m0, n0, kt, tid, As, Bs);
                    for (int r = 0; r < kTileM; ++r)       // the tensor cores' product, in plain fp32 here
                        for (int j = 0; j < kTileN; ++j)
                            for (int c = 0; c < kTileK; ++c)
                                C[size_t(r) * kTileN + j] += __half2float(As[r][c]) * __half2float(Bs[j][c]);
                }
                for (int r = 0; r < kTileM && m0 + r < M; ++r)
                    for (int j = 0; j < kTileN && n0 + j < d.N; ++j) Y[(m0 + r) * d.N + n0 + j] = C[size_t(r) * kTileN + j];
            }
    });
    return BQ_CUDA_OK;
}

int bq_cuda_sparse_dequantize(const bq_cuda_sparse_weight* w, int64_t inner, void* W, int out_half, void* stream) {
    if (int rc = check_sparse(w)) return rc;
    if (!W) return fail(BQ_CUDA_BAD_ARG, "no output given");
    if (inner < 1 || w->inner.N % inner != 0)
        return fail(BQ_CUDA_BAD_ARG, "inner (%lld) must divide N (%lld)", (long long)inner, (long long)w->inner.N);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int64_t threads = w->inner.N * (w->K / w->of);
    const unsigned blocks = unsigned((threads + 255) / 256);
    return launched(with_sparse_decoder(*w, [&](auto d) {
                        if (out_half) sparse_dequant_kernel<<<blocks, 256, 0, st>>>(d, inner, static_cast<__half*>(W));
                        else sparse_dequant_kernel<<<blocks, 256, 0, st>>>(d, inner, static_cast<float*>(W));
                        return cudaGetLastError();
                    }),
                    "bayesq sparse dequantize");
}

int bq_cuda_sparse_matmul(const bq_cuda_sparse_weight* w, const void* A, int64_t M, const void* bias, void* Y,
                          int io_half, void* stream) {
    if (int rc = check_sparse(w)) return rc;
    if (M < 0 || (M > 0 && (!A || !Y))) return fail(BQ_CUDA_BAD_ARG, "A and Y are required (M=%lld)", (long long)M);
    if (M == 0) return BQ_CUDA_OK;
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int64_t N = w->inner.N, threads = N * (w->K / w->of);
    return with_sparse_decoder(*w, [&](auto d) {
        auto go = [&](auto* a, auto* b, auto* y) {
            using T = std::remove_const_t<std::remove_pointer_t<decltype(a)>>;
            return cublas_matmul(w->K, N, [&](T* V, cudaStream_t s) {
                sparse_dequant_kernel<<<unsigned((threads + 255) / 256), 256, 0, s>>>(d, 1, V);
            }, a, M, b, y, st);
        };
        return io_half ? go(static_cast<const __half*>(A), static_cast<const __half*>(bias), static_cast<__half*>(Y))
                       : go(static_cast<const float*>(A), static_cast<const float*>(bias), static_cast<float*>(Y));
    });
}

int bq_cuda_sparse_decode_host(const bq_cuda_sparse_weight* w, float* V) {
    if (int rc = check_sparse(w)) return rc;
    if (!V) return fail(BQ_CUDA_BAD_ARG, "no output given");
    with_sparse_decoder(*w, [&](auto d) {
        for (int64_t n = 0; n < d.in.N; ++n)
            for (int64_t r = 0; r < d.K / d.of; ++r) d.run(n, r, [&](int64_t k, float v) { V[n * d.K + k] = v; });
    });
    return BQ_CUDA_OK;
}

int bq_cuda_decode_host(const bq_cuda_weight* w, float* V) {
    if (int rc = check(w)) return rc;
    if (!V) return fail(BQ_CUDA_BAD_ARG, "no output given");
    with_decoder(*w, [&](auto d) {
        const int64_t nc = bq_n_chunks(d.K);
        for (int64_t n = 0; n < d.N; ++n)
            for (int64_t c = 0; c < nc; ++c)
                for (int l = 0; l < BQ_LANES; ++l) d.lane(n, c, l, [&](int64_t k, float v) { V[n * d.K + k] = v; });
    });
    return BQ_CUDA_OK;
}

}  // extern "C"
