/* bayesq/cuda.h: the C entry points of the CUDA kernels (libbayesq_cuda.so, custom_ops/cuda/).
 *
 * The kernels read the packed layout of layout.h from device memory, decoding each lane with the
 * same __host__ __device__ functions the CPU kernels use.  Callers (tests, benchmarks, an execution
 * provider's kernel) pass device pointers of torch or cupy buffers and a cudaStream_t as void*.
 * Every call returns 0 or an error code; bq_cuda_last_error() says why in one line (per thread).
 * Launches are asynchronous on the stream, as a CUDA kernel's are.
 */
#ifndef BAYESQ_CUDA_H
#define BAYESQ_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BQ_CUDA_API __attribute__((visibility("default")))   /* the library hides everything else */

/* A packed weight: the view V (N rows of K) of layout.h. */
typedef struct {
    const uint8_t* B;       /* codes (N, ceil(K * bits / 8)) */
    const void* scales;     /* affine: (N, G) */
    const uint8_t* zp;      /* affine: (N, ceil(G * bits / 8)), or NULL (zero point 2^(bits-1)) */
    const void* lut;        /* LUT: (N, G, 2^bits) */
    int64_t K, N, block;    /* block: group size along K, 0 for one group per row */
    int bits;               /* 1..8 */
    int is_lut;
    int s_half;             /* scales / lut are float16 (widened exactly), else float32 */
} bq_cuda_weight;

enum { BQ_CUDA_OK = 0, BQ_CUDA_BAD_ARG = 1, BQ_CUDA_FAILED = 2 };
enum { BQ_CUDA_AUTO = 0, BQ_CUDA_GEMV = 1, BQ_CUDA_GEMM = 2, BQ_CUDA_CUBLAS = 3 };

/* Y (M, N) = A (M, K) @ V^T (+ bias (N)), all row-major and contiguous; A, bias and Y are float16
 * when io_half, else float32.  path: BQ_CUDA_AUTO (the GEMV below bq_cuda_gemm_min_rows() rows,
 * the GEMM from there), or one of them forced (benchmarks, tests).
 *   GEMV: fp32 arithmetic, one warp per column (its K split over blocks where N is narrow, the
 *         partial sums added in a fixed order: the same bytes every run).
 *   GEMM: weights decoded into fp16 tiles in shared memory, A rounded to fp16, tensor cores with
 *         fp32 accumulation (what cuBLAS's fp16 GEMM computes); not bit-equal to the CPU ops.
 *   CUBLAS (forced only): the weight dequantized into a temporary buffer of A's type, then cuBLAS's
 *         GEMM (fp32 accumulation; float32 A stays float32): cuBLAS is looked up in the process at
 *         first use (dlopen of libcublas.so.13 / .12), an error where it is not there. */
BQ_CUDA_API int bq_cuda_matmul(const bq_cuda_weight* w, const void* A, int64_t M, const void* bias, void* Y, int io_half,
                   int path, void* stream);
BQ_CUDA_API int bq_cuda_gemm_min_rows(void);

/* The dequantized weight W (float16 when out_half, else float32): V moved back to the op's layout.
 * V's row n enumerates the axes of W other than the quantized one in C order, so with `inner` the
 * product of W's axes after the quantized one, V[n, k] goes to W[((n / inner) * K + k) * inner + n % inner]:
 * inner 1 writes V itself, inner N a MatMul's W (K, N) = V^T, kh * kw a Conv weight quantized along I. */
BQ_CUDA_API int bq_cuda_dequantize(const bq_cuda_weight* w, int64_t inner, void* W, int out_half, void* stream);

/* Y (count, K) = V[indices] (an embedding lookup; float16 when out_half, else float32).  The indices
 * (int64 when idx64, else int32) are in HOST memory: checked there as the CPU op checks them (in
 * [-N, N), negative ones from the end), then copied to the device. */
BQ_CUDA_API int bq_cuda_gather(const bq_cuda_weight* w, const void* indices, int idx64, int64_t count, void* Y,
                               int out_half, void* stream);

/* An N:M sparse weight (layout.h, "Sparse"): `inner` its survivors, a dense affine weight of K * keep / of
 * codes a row (inner.K) in groups of block * keep / of (inner.block); `mask` the runs' pattern indices. */
typedef struct {
    bq_cuda_weight inner;
    const uint8_t* mask;
    int64_t K;
    int keep, of;
} bq_cuda_sparse_weight;

/* As bq_cuda_dequantize; and Y = A @ W (+ bias) by cuBLAS on W decoded into a temporary buffer of A's type
 * (as the BQ_CUDA_CUBLAS path: cuBLAS from the process). */
BQ_CUDA_API int bq_cuda_sparse_dequantize(const bq_cuda_sparse_weight* w, int64_t inner, void* W, int out_half,
                                          void* stream);
BQ_CUDA_API int bq_cuda_sparse_matmul(const bq_cuda_sparse_weight* w, const void* A, int64_t M, const void* bias,
                                      void* Y, int io_half, void* stream);
BQ_CUDA_API int bq_cuda_sparse_decode_host(const bq_cuda_sparse_weight* w, float* V);   /* host, for tests */

/* V (N, K) float32 decoded on the host from host memory by the kernels' own decode functions
 * (compiled by nvcc for the host): the CPU-side test of the GPU decode. */
BQ_CUDA_API int bq_cuda_decode_host(const bq_cuda_weight* w, float* V);

/* Y (M, N) = A (M, K) @ V^T, all float32 in host memory, by the GEMV's own walk over the codes: each of a
 * warp's 32 threads in turn, each split of K as the kernel would split it on a GPU of `sms` SMs, the
 * partial sums added on the host (in another order than the warp's shuffles).  For the tests. */
BQ_CUDA_API int bq_cuda_gemv_host(const bq_cuda_weight* w, const float* A, int64_t M, int sms, float* Y);

/* The same for the GEMM's tiles (any M): filled thread by thread as the kernel fills them (A and V rounded
 * to fp16, zeros past M, N and K), their product taken in plain fp32 instead of on tensor cores. */
BQ_CUDA_API int bq_cuda_gemm_host(const bq_cuda_weight* w, const float* A, int64_t M, float* Y);

BQ_CUDA_API const char* bq_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* BAYESQ_CUDA_H */
