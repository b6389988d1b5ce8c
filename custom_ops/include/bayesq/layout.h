/* bayesq/layout.h: the packed weight layout of the `bayesq` ops, and the ops' signatures.
 *
 * This header is the single definition of the layout: the CPU kernels, the CUDA kernels (custom_ops/cuda/) and
 * a TensorRT plugin include it, and bayesq_onnx/formats/bayesq_uniform.py + runtime/reference_ops.py
 * implement the same rules in numpy.  C99/C++/CUDA, no dependencies.
 *
 * ---- The weight -------------------------------------------------------------------------------
 * A matmul weight W (K, N) is stored as its view V = W^T: N rows ("columns" of W) of K codes each,
 * b = bits in 1..8.  Codes are grouped along K in groups of `block_size` (block_size 0: one group per
 * row); G = n_groups = ceil(K / block_size) (1 when block_size is 0).
 *   affine: V[n, k] = ((float)q[n, k] - (float)zp[n, g]) * scales[n, g]        (fp32 arithmetic)
 *   LUT:    V[n, k] = lut[n, g, q[n, k]]                                           (a copy, exact)
 * with g = k / block_size.  Kernels need block_size % 16 == 0 (or 0) for their fast paths.
 *
 * ---- Codes: B, uint8 (N, col_bytes), col_bytes = ceil(K * b / 8) -----------------------------
 * Each row is packed on its own in exactly ceil(K*b/8) bytes (padding: < 8 bits per row, only when
 * K*b % 8 != 0).  A row is a sequence of chunks, each of `lanes` x `steps`:
 *   - K / 128 full chunks of 16 lanes x 8 steps (128 codes);
 *   - then, if (K % 128) >= 8, one chunk of (K % 128) / 8 lanes x 8 steps;
 *   - then, if K % 8 != 0, one chunk of 1 lane x (K % 8) steps.
 * In a chunk that starts at code k0 with L lanes, lane l step i holds the code of k = k0 + L*i + l
 * (so one step of all lanes is L consecutive k: a SIMD vector of consecutive activations).
 * Lane l's codes form an integer v_l = sum_i q_i << (b*i) of steps*b bits, stored in
 * nb = ceil(steps*b/8) little-endian bytes.  The chunk's L*nb bytes are split into *planes*: the
 * bytes of v_l are cut into pieces of 4, 2 and 1 bytes, greedily (nb = 8: 4+4, 7: 4+2+1, 6: 4+2,
 * 5: 4+1, 4: 4, 3: 2+1, 2: 2, 1: 1); plane p (piece width w_p, starting at byte s_p of v_l) holds
 * that piece of all L lanes contiguously, lane l at plane_offset_p + l*w_p.  Planes follow each
 * other in that order; chunks follow each other.  So a full chunk of 3-bit codes is a 32-byte plane
 * of uint16 (bytes 0-1 of each lane) then a 16-byte plane of uint8 (byte 2): two zero-extending
 * vector loads give each lane its 24-bit word of 8 codes, and step i is (word >> 3i) & 7.
 *
 * ---- Zero points: uint8 (N, ceil(G * b / 8)) ------------------------------------------------------
 * Row n's G zero points packed LSB-first as a plain bit stream (code j at bits [j*b, j*b+b)), each row
 * on its own (the same rule as com.microsoft.MatMulNBits' zero_points).  Absent: zp = 2^(b-1).
 * Scales: S (N, G).  LUT: S (N, G, 2^b).  S = float32 or float16; float16 values are widened
 * (exactly) to fp32 before use, so the result equals the op run on the same values cast to float32.
 *
 * ---- Ops (domain "bayesq", opset 1) ------------------------------------------------------------
 *   MatMulAffine(A: T[..., K], B: uint8, scales: S, zero_points?: uint8, bias?: T[N]) -> Y: T[..., N]
 *   MatMulLut   (A: T[..., K], B: uint8, lut: S, bias?: T[N])                      -> Y: T[..., N]
 *       Y = A @ W (+ bias); T = float or float16 (float16 is converted to float, computed in fp32);
 *       S = float or float16, independently of T.
 *   DequantizeAffine(B, scales: S, zero_points?) -> W: float;   DequantizeLut(B, lut: S) -> W: float
 *       W has shape `shape` (default [K, N]) and is the view moved back to that layout: V's rows
 *       enumerate, in C order, the axes of `shape` other than `axis` (shape[axis] == K), i.e.
 *       V = moveaxis(W, axis, -1).reshape(-1, K).  Default: W (K, N) = V^T for a MatMul.
 *       A Conv weight (O, I, kh, kw) quantized along I: shape = [O, I, kh, kw], axis = 1.
 *   GatherAffine(indices: I, B: uint8, scales: S, zero_points?: uint8) -> Y: float[*indices.shape, K]
 *   GatherLut   (indices: I, B: uint8, lut: S)                         -> Y: float[*indices.shape, K]
 *       Y[..., :] = V[indices[...], :]: rows of the view, i.e. an embedding table (N rows of K) stored
 *       exactly as a MatMul weight's view, so one packed table serves a Gather and (tied) the output
 *       head's MatMul* (x @ table^T: W = table^T, V = table).  I = int64 or int32; indices in [-N, N),
 *       negative ones count from the end (ONNX Gather), others are an error.  Rows decode bit-exactly.
 *   Attributes (all ops): K, N, bits (1..8), block_size (0 or >= 1); Dequantize*: shape, axis.
 *
 * ---- Sparse: N:M structured sparsity (bayesq_onnx/formats/bayesq_sparse.py) ---------------------
 * Along K, every run of `of` consecutive weights (K % of == 0) keeps `keep` of them (1 <= keep < of <= 8);
 * the others are exactly 0.  Which ones: the run's pattern p, the p-th keep-subset of 0..of-1 in
 * lexicographic order ((0,1), (0,2), (0,3), (1,2), ... for 2:4), stored as a plain LSB-first bit stream
 * per row of pbits = ceil(log2 C(of, keep)) bits per run (at least 1):
 *   mask: uint8 (N, ceil(K / of * pbits / 8)).
 * An index >= C(of, keep) (a corrupt mask; packers never write one) keeps none of its run, whose keep
 * codes below are skipped all the same.
 * The survivors of a row, in order, are a dense affine row of Kc = K * keep / of codes stored exactly as
 * above (B: (N, ceil(Kc * b / 8)), scales (N, G), zero_points), whose groups are the survivors of each
 * group of block_size original weights (block_size % of == 0; block_size * keep / of, a multiple of 16,
 * survivors each; G = ceil(K / block_size)).
 *   MatMulSparseAffine(A: T[..., K], B, scales: S, zero_points, mask, bias?: T[N]) -> Y: T[..., N]
 *   DequantizeSparseAffine(B, scales: S, zero_points, mask) -> W: float (shape, axis as above)
 *   Attributes: K, N, bits, block_size (in original weights), keep, of; Dequantize: shape, axis.
 */
#ifndef BAYESQ_LAYOUT_H
#define BAYESQ_LAYOUT_H

#include <stdint.h>

#if defined(__CUDACC__)
#define BQ_FN static __forceinline__ __host__ __device__   /* inlined: a device call spills registers */
#else
#define BQ_FN static inline
#endif

#define BQ_LANES 16
#define BQ_STEPS 8
#define BQ_CHUNK (BQ_LANES * BQ_STEPS)
#define BQ_MAX_BITS 8

BQ_FN int64_t bq_col_bytes(int64_t K, int bits) { return (K * bits + 7) / 8; }
BQ_FN int64_t bq_n_groups(int64_t K, int64_t block) { return block > 0 ? (K + block - 1) / block : 1; }
BQ_FN int64_t bq_zp_bytes(int64_t G, int bits) { return (G * bits + 7) / 8; }
BQ_FN int64_t bq_group_of(int64_t k, int64_t block) { return block > 0 ? k / block : 0; }

/* One chunk of a row: codes k0 .. k0 + lanes*steps - 1, bytes byte0 .. byte0 + lanes*lane_bytes - 1. */
typedef struct {
    int64_t k0, byte0;
    int lanes, steps, lane_bytes;
} bq_chunk;

BQ_FN int64_t bq_n_chunks(int64_t K) { return K / BQ_CHUNK + ((K % BQ_CHUNK) >= BQ_STEPS) + ((K % BQ_STEPS) != 0); }

BQ_FN bq_chunk bq_chunk_at(int64_t K, int bits, int64_t c) {
    bq_chunk ch;
    int64_t full = K / BQ_CHUNK, r = K % BQ_CHUNK;
    if (c < full) {
        ch.lanes = BQ_LANES; ch.steps = BQ_STEPS; ch.k0 = c * BQ_CHUNK;
    } else if (c == full && r >= BQ_STEPS) {
        ch.lanes = (int)(r / BQ_STEPS); ch.steps = BQ_STEPS; ch.k0 = full * BQ_CHUNK;
    } else {
        ch.lanes = 1; ch.steps = (int)(K % BQ_STEPS); ch.k0 = K - K % BQ_STEPS;
    }
    ch.byte0 = ch.k0 * bits / 8;            /* every earlier chunk holds a multiple of 8 codes */
    ch.lane_bytes = (ch.steps * bits + 7) / 8;
    return ch;
}

/* Offset, inside its chunk, of byte j of lane l's word (the plane rule above). */
BQ_FN int64_t bq_lane_byte(int lanes, int lane_bytes, int j, int l) {
    int64_t off = 0;
    int start = 0, rem = lane_bytes;
    while (rem > 0) {
        int w = rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
        if (j < start + w) return off + (int64_t)l * w + (j - start);
        off += (int64_t)lanes * w;
        start += w;
        rem -= w;
    }
    return -1; /* j >= lane_bytes */
}

/* Lane l's word of the chunk whose bytes start at `chunk` (the plane rule above), little-endian:
 * step i's code is bq_word_code(word, bits, i).  The CPU and CUDA kernels' one decode of a lane. */
BQ_FN uint64_t bq_lane_word(const uint8_t* chunk, int lanes, int lane_bytes, int l) {
    uint64_t v = 0;
    int64_t off = 0;
    int start = 0, rem = lane_bytes;
    while (rem > 0) {
        int w = rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
        for (int j = 0; j < w; ++j) v |= (uint64_t)chunk[off + (int64_t)l * w + j] << (8 * (start + j));
        off += (int64_t)lanes * w;
        start += w;
        rem -= w;
    }
    return v;
}

BQ_FN int bq_word_code(uint64_t word, int bits, int i) {
    return (int)((word >> (bits * i)) & ((1u << bits) - 1u));
}

/* An affine weight's value: the reference's fp32 arithmetic, (q - zp) then times the scale. */
BQ_FN float bq_affine(int q, int zp, float scale) { return ((float)q - (float)zp) * scale; }

/* Plain LSB-first bit stream: element i of width `bits` (zero points; the 1-lane chunk). */
BQ_FN int bq_stream_at(const uint8_t* buf, int bits, int64_t i) {
    int64_t bit = i * bits;
    unsigned v = buf[bit >> 3] >> (bit & 7);
    if ((bit & 7) + bits > 8) v |= (unsigned)buf[(bit >> 3) + 1] << (8 - (bit & 7));
    return (int)(v & ((1u << bits) - 1u));
}

/* The patterns of `keep` of `of` (1 <= keep < of <= 8; "Sparse" above): the keep-subsets of 0 .. of-1 in
 * lexicographic order, as bit masks (bit t: position t survives) into out[0 .. C(of, keep)), 70 at most.
 * Returns their count. */
BQ_FN int bq_sparse_patterns(int keep, int of, uint8_t* out) {
    int pos[8], count = 0;
    for (int i = 0; i < keep; ++i) pos[i] = i;   /* the first subset; then the next, lexicographically */
    for (;;) {
        unsigned m = 0;
        for (int i = 0; i < keep; ++i) m |= 1u << pos[i];
        out[count++] = (uint8_t)m;
        int i = keep - 1;
        while (i >= 0 && pos[i] == of - keep + i) --i;
        if (i < 0) return count;
        ++pos[i];
        for (int j = i + 1; j < keep; ++j) pos[j] = pos[j - 1] + 1;
    }
}

/* A run's pattern index in the mask stream: ceil(log2 count) bits, at least 1. */
BQ_FN int bq_pattern_bits(int count) {
    int b = 1;
    while ((1 << b) < count) ++b;
    return b;
}

/* Code of weight k of a row (`row` points at the row's col_bytes bytes).  Slow, for references. */
BQ_FN int bq_code_at(const uint8_t* row, int64_t K, int bits, int64_t k) {
    int64_t c = k / BQ_CHUNK;               /* chunk index, or the first chunk after the full ones */
    bq_chunk ch = bq_chunk_at(K, bits, c);
    if (k >= ch.k0 + (int64_t)ch.lanes * ch.steps) ch = bq_chunk_at(K, bits, c + 1);
    int64_t d = k - ch.k0;
    int l = (int)(d % ch.lanes), i = (int)(d / ch.lanes);
    unsigned v = 0;
    for (int t = 0; t < bits; ++t) {
        int bit = i * bits + t;
        const uint8_t byte = row[ch.byte0 + bq_lane_byte(ch.lanes, ch.lane_bytes, bit >> 3, l)];
        v |= (unsigned)((byte >> (bit & 7)) & 1u) << t;
    }
    return (int)v;
}

#endif /* BAYESQ_LAYOUT_H */
