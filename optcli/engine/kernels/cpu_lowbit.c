/* GEMMs for x86 CPUs with AVX2 (no VNNI or AVX-512 needed): y[M, N] = x[M, K] @ W[N, K]^T with W held
 * in a low-bit format or in bf16, plus FP8 activation rounding.
 *
 * Built and loaded by cpu_lowbit.py (gcc -O3 -mavx2 -mfma -fopenmp, called through ctypes on torch
 * tensors' memory). Why hand-written: on an AVX2 CPU torch's low-bit kernels read the weights at a
 * fraction of the memory bandwidth at one row and lose to a dense fp32 GEMM at 64 rows, oneDNN's
 * u8s8 path saturates int16 (wrong results), FBGEMM's int8 GEMM quantizes activations per tensor
 * (one request's output would depend on the others in the batch), and nothing runs fp32 math on
 * bf16-held weights without first widening the whole matrix.
 *
 * The two integer kernels keep every integer sum exact:
 *  - q4: 4-bit weights u in 0..15 (the signed value + 8), activations int8 in -127..127 with one scale
 *    per row and block of B inputs (llama.cpp's q4_0 x q8_0 idea). _mm256_maddubs_epi16 takes u as its
 *    unsigned operand: a pair sums to at most 15 * 127 * 2 = 3810, so 8 chunks of 32 (B <= 256) add up
 *    in int16 without overflow. sum((u - 8) * a) = sum(u * a) - 8 * sum(a), the second term per block.
 *  - q8: int8 weights and int8 activations (W8A8's own per-token quantization, done by the caller)
 *    widened to int16 and multiplied with _mm256_madd_epi16 (exact for every int8 value, -128 too).
 *
 * Work split: blocks of weight columns across OpenMP threads (torch's own OpenMP runtime, which the
 * process has loaded already); rows in tiles (MT) so a tile's activations stay in L2 while the
 * weights stream. The q4 weights are pre-interleaved 8 columns per 64-input chunk (one stream per
 * thread); the q8 kernel widens a block of NC columns to int16 once per row tile.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NC 4   /* weight columns (output features) per block */
#define MT 64  /* activation rows per tile */
/* Software prefetch distances (bytes ahead in a thread's weight stream). At one row every kernel here
 * is a weight read, and on the project's Zen 2 the hardware prefetcher alone left the q4 GEMV at 23
 * GB/s against 33 for a plain read; 768 bytes ahead measured 29-32 (512-1024 within noise), and the
 * one-row-at-a-time q8 GEMV 29.8 at 1024 against 24.8 at 2048 (lines arriving too early are evicted). */
#define Q4_PREFETCH 768
#define ROW_PREFETCH 1024

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}

/* ---------------------------------------------------------------- q4 x q8 ------------------------- */

/* x [M, K] fp32 -> qa int8 [M, K] (-127..127), sa [M, K/B] = absmax / 127 (1 where all zero),
 * asum [M, K/B] = the block's sum of qa. */
void lowbit_quant_blocks(const float *x, int64_t M, int64_t K, int64_t B, int8_t *qa, float *sa, int32_t *asum) {
    const int64_t nb = K / B;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xr = x + m * K + b * B;
            float amax = 0.f;
            for (int64_t j = 0; j < B; j++) {
                float v = xr[j] < 0 ? -xr[j] : xr[j];
                amax = v > amax ? v : amax;
            }
            const float s = amax > 0.f ? amax / 127.f : 1.f;
            const float inv = 1.f / s;
            int8_t *qr = qa + m * K + b * B;
            int32_t sum = 0;
            for (int64_t j = 0; j < B; j++) {
                int q = (int)__builtin_nearbyintf(xr[j] * inv);
                q = q > 127 ? 127 : q < -127 ? -127 : q;
                qr[j] = (int8_t)q;
                sum += q;
            }
            sa[m * nb + b] = s;
            asum[m * nb + b] = sum;
        }
    }
}

/* Packed weights: for each block of 8 output columns, for each chunk of 64 inputs, 8 x 32 bytes (one
 * per column), byte i = u[64j + i] | u[64j + 32 + i] << 4. One stream per thread, and one 32-byte load
 * unpacks with two ANDs and a shift into two chunks of 32 inputs. N is padded to a multiple of 8. */

/* The int32 vectors d[0..7], each summing to one column's dot product, reduced to one vector whose
 * lane c is column c. */
INLINE __m256i reduce8(const __m256i d[8]) {
    const __m256i h01 = _mm256_hadd_epi32(d[0], d[1]), h23 = _mm256_hadd_epi32(d[2], d[3]);
    const __m256i h45 = _mm256_hadd_epi32(d[4], d[5]), h67 = _mm256_hadd_epi32(d[6], d[7]);
    const __m256i h0123 = _mm256_hadd_epi32(h01, h23), h4567 = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                            _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

/* One activation row x one block of 8 columns. packed: the column block; qa/sa/asum: the row;
 * swt/zzt: the block's own scales/zeros [nb][8]; out: the row at the block's first column. */
INLINE void q4_row(const uint8_t *packed, int64_t K, int64_t B, const int8_t *qa, const float *sa,
                   const int32_t *asum, const float *swt, const float *zzt, float *out) {
    const int64_t nb = K / B;
    const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0F);
    __m256 facc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_si256();
        for (int64_t j = b * B; j < (b + 1) * B; j += 64) {
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(qa + j));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(qa + j + 32));
            const uint8_t *pj = packed + (j / 64) * 256;
            for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)(pj + Q4_PREFETCH + l), _MM_HINT_T0);
            for (int c = 0; c < 8; c++) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(pj + 32 * c));
                const __m256i lo = _mm256_and_si256(p, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
                acc[c] = _mm256_add_epi16(acc[c], _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0),
                                                                   _mm256_maddubs_epi16(hi, a1)));
            }
        }
        __m256i d[8];
        for (int c = 0; c < 8; c++) d[c] = _mm256_madd_epi16(acc[c], ones);
        const __m256i dots = _mm256_sub_epi32(reduce8(d), _mm256_set1_epi32(8 * asum[b]));
        const __m256 s_a = _mm256_set1_ps(sa[b]);
        facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(s_a, _mm256_loadu_ps(swt + b * 8)), facc);
        if (zzt)
            facc = _mm256_fmadd_ps(_mm256_set1_ps(sa[b] * (float)asum[b]), _mm256_loadu_ps(zzt + b * 8), facc);
    }
    _mm256_storeu_ps(out, facc);
}

/* y [M, N] = sum over blocks of sa * sw * (sum(u * qa) - 8 * asum) (+ sa * asum * zz: asymmetric zeros);
 * scales and zeros per block of 8 columns, [N/8][K/B][8]: next to each other in memory, so they are one
 * short stream per column block (a [K/B][N] layout made them K/B strided reads per block, which the
 * prefetcher did not follow: 9% of a 2048 -> 16384 GEMV's time). K and B multiples of 64, N of 8. */
void lowbit_q4_gemm(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K, int64_t B,
                    const uint8_t *packed, const float *swt, const float *zzt, int64_t N, float *out) {
    const int64_t nb = K / B;
#pragma omp parallel
    for (int64_t t0 = 0; t0 < M; t0 += MT) {
        const int64_t t1 = t0 + MT < M ? t0 + MT : M;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < N / 8; blk++) {
            const int64_t c0 = blk * 8;
            for (int64_t m = t0; m < t1; m++)
                q4_row(packed + c0 * (K / 2), K, B, qa + m * K, sa + m * nb, asum + m * nb, swt + c0 * nb,
                       zzt ? zzt + c0 * nb : 0, out + m * N + c0);
        }
    }
}

/* ---------------------------------------------------------------- q8 x q8 ------------------------- */

/* One R x C tile over the whole K: exact int32 dot products, then (acc * xs) * ws as the reference
 * (`ops.int8_scaled_mm`) computes them. w16, a16: int16 copies (stride K). */
INLINE void q8_tile(const int R, const int C, const int16_t *w16, const int16_t *a16, int64_t K, const float *xs,
                    const float *ws, float *out, int64_t ldo) {
    __m256i acc[4][NC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();
    for (int64_t j = 0; j < K; j += 16) {
        __m256i w[NC];
        for (int c = 0; c < C; c++) w[c] = _mm256_loadu_si256((const __m256i *)(w16 + c * K + j));
        for (int r = 0; r < R; r++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(a16 + r * K + j));
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(w[c], a));
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[r * ldo + c] = ((float)hsum_epi32(acc[r][c]) * xs[r]) * ws[c];
}

/* Few activation rows: each weight row streamed once, start to end (one stream per thread, prefetched),
 * widened to int16 in registers and dotted with each of the R rows while it is in L1. Measured on a
 * 2048 -> 16384 GEMV: 1.13 ms against 1.83 for the tiled form, whose NC rows at stride K are NC
 * concurrent streams per thread that the memory system served at 18 GB/s. */
INLINE void q8_rows(const int64_t R, const int8_t *w, const int16_t *a16, int64_t K, const float *xs, float ws,
                    float *out, int64_t ldo) {
    for (int64_t r = 0; r < R; r++) {
        const int16_t *a = a16 + r * K;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 32 <= K; j += 32) {
            if (r == 0 && (j & 63) == 0) _mm_prefetch((const char *)(w + j + ROW_PREFETCH), _MM_HINT_T0);
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j + 16)));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(a + j))));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(a + j + 16))));
        }
        if (j < K) /* K % 16 == 0: one last 16 */
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j))),
                                                        _mm256_loadu_si256((const __m256i *)(a + j))));
        out[r * ldo] = ((float)hsum_epi32(_mm256_add_epi32(s0, s1)) * xs[r]) * ws;
    }
}

#define Q8_FEW_ROWS 4 /* at most this many rows take q8_rows */

#define Q8_TILE(R, C) q8_tile(R, C, w16, a16 + (m0 - t0) * K, K, xs + m0, ws + c0, out + m0 * N + c0, N)

/* y [M, N] = (xq @ wq^T) * xs [M] * ws [N]; xq int8 [M, K], wq int8 [N, K], K % 16 == 0. */
void lowbit_q8_gemm(const int8_t *xq, const float *xs, int64_t M, int64_t K, const int8_t *wq, const float *ws,
                    int64_t N, float *out) {
    const int64_t nblocks = (N + NC - 1) / NC;
    int16_t *a16 = (int16_t *)malloc((size_t)(MT * K * 2));
    if (M <= Q8_FEW_ROWS) {
        for (int64_t i = 0; i < M * K; i++) a16[i] = xq[i];
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) q8_rows(M, wq + n * K, a16, K, xs, ws[n], out + n, N);
        free(a16);
        return;
    }
#pragma omp parallel
    {
        int16_t *w16 = (int16_t *)malloc((size_t)(NC * K * 2));
        for (int64_t t0 = 0; t0 < M; t0 += MT) {
            const int64_t t1 = t0 + MT < M ? t0 + MT : M;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < (t1 - t0) * K; i++) a16[i] = xq[t0 * K + i];
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nblocks; blk++) {
                const int64_t c0 = blk * NC;
                const int C = N - c0 < NC ? (int)(N - c0) : NC;
                for (int c = 0; c < C; c++)
                    for (int64_t j = 0; j < K; j += 16)
                        _mm256_storeu_si256((__m256i *)(w16 + c * K + j),
                                            _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + (c0 + c) * K + j))));
                int64_t m0 = t0;
                if (C == NC) {
                    for (; m0 + 4 <= t1; m0 += 4) Q8_TILE(4, NC);
                    for (; m0 + 2 <= t1; m0 += 2) Q8_TILE(2, NC);
                    for (; m0 < t1; m0++) Q8_TILE(1, NC);
                } else {
                    for (; m0 < t1; m0++)
                        for (int c = 0; c < C; c++)
                            q8_tile(1, 1, w16 + c * K, a16 + (m0 - t0) * K, K, xs + m0, ws + c0 + c,
                                    out + m0 * N + c0 + c, N);
                }
            }
        }
        free(w16);
    }
    free(a16);
}

/* W8A8's per-token activation quantization, bit for bit `ops.quantize_per_token(x, torch.int8)`
 * (compressed-tensors' rule): scale = max(absmax / 127.5, 1e-12), q = clamp(round_half_even(x / scale),
 * -128, 127). A true division, as torch's, not a multiply by the reciprocal. */
void lowbit_quant_rows_int8(const float *x, int64_t M, int64_t K, int8_t *q, float *scales) {
    const __m256 sign = _mm256_set1_ps(-0.f), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        __m256 vmax = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= K; j += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + j)));
        float lanes[8], amax = 0.f;
        _mm256_storeu_ps(lanes, vmax);
        for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
        for (; j < K; j++) amax = __builtin_fabsf(xr[j]) > amax ? __builtin_fabsf(xr[j]) : amax;
        float s = amax / 127.5f;
        s = s < 1e-12f ? 1e-12f : s;
        scales[m] = s;
        const __m256 vs = _mm256_set1_ps(s);
        int8_t *qr = q + m * K;
        for (j = 0; j + 8 <= K; j += 8) {
            __m256 y = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + j), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, lo), hi));
            const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(qr + j), _mm_packs_epi16(w16, w16));
        }
        for (; j < K; j++) {
            float y = __builtin_nearbyintf(xr[j] / s);
            y = y < -128.f ? -128.f : y > 127.f ? 127.f : y;
            qr[j] = (int8_t)y;
        }
    }
}

/* One call per W8A8 layer: the activations quantized per token, then the exact int8 GEMM. */
void lowbit_q8_linear(const float *x, int64_t M, int64_t K, const int8_t *wq, const float *ws, int64_t N, float *out) {
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xs = (float *)malloc((size_t)M * sizeof(float));
    lowbit_quant_rows_int8(x, M, K, xq, xs);
    lowbit_q8_gemm(xq, xs, M, K, wq, ws, N, out);
    free(xq);
    free(xs);
}

/* ---------------------------------------------------------------- nf4 (bitsandbytes) ------------- */

/* bitsandbytes' 4-bit layout: the row-major [N, K] weight flattened, two codes a byte (the first in
 * the high nibble), one absmax per `bs` consecutive values, a 16-entry code book (NF4 or FP4 levels).
 * These are float GEMMs: the levels are not integers. 8 codes are looked up at once from two 8-lane
 * tables (_mm256_permutevar8x32_ps) and a blend on the code's top bit. */

INLINE __m256 nf4_decode8(uint32_t word, __m256 lo_tab, __m256 hi_tab) {
    /* byte b holds values 2b (high nibble) and 2b + 1 (low nibble) */
    const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)word), shifts),
                                         _mm256_set1_epi32(0xF));
    const __m256 lo = _mm256_permutevar8x32_ps(lo_tab, idx), hi = _mm256_permutevar8x32_ps(hi_tab, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* The code book entries of 8 indices (only their low 4 bits count). */
INLINE __m256 nf4_lookup(__m256i idx, __m256 lo_tab, __m256 hi_tab) {
    const __m256 lo = _mm256_permutevar8x32_ps(lo_tab, idx), hi = _mm256_permutevar8x32_ps(hi_tab, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* R (<= 4) rows of x against one weight row: out[r * ldo] = sum_k x[r, k] * w[k]. xs holds x with each
 * chunk of 16 inputs reordered as its 8 even then its 8 odd inputs, so 8 bytes widened to 8 lanes give
 * the 8 even weights (high nibbles) and the 8 odd ones (low nibbles) without a variable shift. */
INLINE void nf4_dot(const int R, const float *xs, int64_t K, const uint8_t *packed, const float *absmax, int64_t bs,
                    __m256 lo_tab, __m256 hi_tab, float *out, int64_t ldo) {
    __m256 tot[4];
    for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / bs; b++) {
        __m256 acc[4];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t j = b * bs; j < (b + 1) * bs; j += 16) {
            const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + j / 2)));
            const __m256 even = nf4_lookup(_mm256_srli_epi32(e, 4), lo_tab, hi_tab);
            const __m256 odd = nf4_lookup(e, lo_tab, hi_tab);
            for (int r = 0; r < R; r++) {
                acc[r] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs + r * K + j), acc[r]);
                acc[r] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + r * K + j + 8), acc[r]);
            }
        }
        const __m256 s = _mm256_set1_ps(absmax[b]);
        for (int r = 0; r < R; r++) tot[r] = _mm256_fmadd_ps(acc[r], s, tot[r]);
    }
    for (int r = 0; r < R; r++) out[r * ldo] = hsum_ps(tot[r]);
}

/* y [M, N] = x [M, K] @ W^T, W in bitsandbytes' 4-bit layout; K % bs == 0, bs % 16 == 0. */
void lowbit_nf4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                     const float *code, int64_t bs, int64_t N, float *out) {
    const __m256 lo_tab = _mm256_loadu_ps(code), hi_tab = _mm256_loadu_ps(code + 8);
    float *xs = (float *)malloc((size_t)(M * K) * sizeof(float));
    for (int64_t i = 0; i < M * K; i += 16)
        for (int t = 0; t < 8; t++) xs[i + t] = x[i + 2 * t], xs[i + 8 + t] = x[i + 2 * t + 1];
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = packed + n * (K / 2);
        const float *a = absmax + n * (K / bs);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) nf4_dot(4, xs + m * K, K, p, a, bs, lo_tab, hi_tab, out + m * N + n, N);
        for (; m < M; m++) nf4_dot(1, xs + m * K, K, p, a, bs, lo_tab, hi_tab, out + m * N + n, N);
    }
    free(xs);
}

/* The same weight dequantized to fp32 [N, K] (for large M, before a dense GEMM). */
void lowbit_nf4_dequant(const uint8_t *packed, const float *absmax, const float *code, int64_t bs, int64_t N,
                        int64_t K, float *w) {
    const __m256 lo_tab = _mm256_loadu_ps(code), hi_tab = _mm256_loadu_ps(code + 8);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N * K / bs; i++) {
        const __m256 s = _mm256_set1_ps(absmax[i]);
        for (int64_t j = i * bs; j < (i + 1) * bs; j += 8) {
            uint32_t word;
            __builtin_memcpy(&word, packed + j / 2, 4);
            _mm256_storeu_ps(w + j, _mm256_mul_ps(nf4_decode8(word, lo_tab, hi_tab), s));
        }
    }
}

/* ---------------------------------------------------------------- fp8 activations ---------------- */

/* Per-token FP8 (E4M3) rounding of activations, returned as fp32 values: scale = max(absmax / 448,
 * 1e-12), y = clamp(x / scale, -448, 448) rounded to E4M3 to nearest even, as torch's
 * `(x / scale).clamp(...).to(torch.float8_e4m3fn).float()` does (there in scalar code). Normal
 * values keep 3 mantissa bits; below 2^-6 the grid is 2^-9. */
void lowbit_fp8_round_rows(const float *x, int64_t M, int64_t K, float *out, float *scales) {
#pragma omp parallel for schedule(static) if (M * K >= (1 << 15))
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float amax = 0.f;
        for (int64_t j = 0; j < K; j++) {
            const float v = xr[j] < 0 ? -xr[j] : xr[j];
            amax = v > amax ? v : amax;
        }
        float s = amax / 448.f;
        s = s > 1e-12f ? s : 1e-12f;
        float *o = out + m * K;
        for (int64_t j = 0; j < K; j++) {
            float y = xr[j] / s;
            y = y > 448.f ? 448.f : y < -448.f ? -448.f : y;
            const float a = y < 0 ? -y : y;
            if (a < 0.015625f) {
                y = __builtin_nearbyintf(y * 512.f) * (1.f / 512.f);
            } else {
                uint32_t bits;
                __builtin_memcpy(&bits, &y, 4);
                bits = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) & ~0xFFFFFu;
                __builtin_memcpy(&y, &bits, 4);
            }
            o[j] = y;
        }
        scales[m] = s;
    }
}

/* ---------------------------------------------------------------- bf16 weights, fp32 math --------- */

/* Dense layers of a bf16 checkpoint on a CPU without bf16 arithmetic: the weights stay bf16 (half the
 * bytes of fp32) and each is widened exactly to fp32 in registers (a 16-bit shift) before an fp32 FMA,
 * so the result is the fp32 GEMM on the checkpoint's own values. R rows x C columns a tile. */
INLINE __m256 bf16_load8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

INLINE float bf16_scalar(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

INLINE __m256 fp8_load8(const uint8_t *p) { /* 8 E4M3 bytes -> their values times 2^-8 (see below) */
    const __m128i b = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8);
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(b, 1), _mm_set1_epi16((short)0xBFFF)));
}

INLINE float fp8_scalar(uint8_t v) {
    const __m128i h = _mm_and_si128(_mm_srai_epi16(_mm_cvtsi32_si128((int)v << 8), 1), _mm_set1_epi16((short)0xBFFF));
    return _mm_cvtss_f32(_mm_cvtph_ps(h));
}

/* The weight element types the float kernels below widen in registers (exactly: every bf16, E4M3 and
 * int8 value is an fp32 value; E4M3 read times 2^-8, see fp8_load8). */
enum { W_BF16 = 0, W_FP8 = 1, W_INT8 = 2 };

INLINE __m256 i8_load8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

INLINE __m256 widen8(const void *w, const int kind, int64_t i) {
    return kind == W_FP8    ? fp8_load8((const uint8_t *)w + i)
           : kind == W_INT8 ? i8_load8((const int8_t *)w + i)
                            : bf16_load8((const uint16_t *)w + i);
}

INLINE float widen1(const void *w, const int kind, int64_t i) {
    return kind == W_FP8    ? fp8_scalar(((const uint8_t *)w)[i])
           : kind == W_INT8 ? (float)((const int8_t *)w)[i]
                            : bf16_scalar(((const uint16_t *)w)[i]);
}

/* 16 one-byte weights (fp8 or int8) widened to two fp32 vectors. */
INLINE void widen16(const uint8_t *w, const int kind, __m256 *lo, __m256 *hi) {
    if (kind == W_INT8) {
        *lo = i8_load8((const int8_t *)w);
        *hi = i8_load8((const int8_t *)w + 8);
        return;
    }
    const __m256i b = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)w)), 8);
    const __m256i h = _mm256_and_si256(_mm256_srai_epi16(b, 1), _mm256_set1_epi16((short)0xBFFF));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

/* One one-byte (fp8 or int8) weight row against R <= 4 activation rows (one prefetched stream, as
 * q8_rows): 16 weights widened at a time, then used by every row. out[r * ldo] = post * dot. */
INLINE void byte_rows(const int kind, const int R, const float *x, int64_t K, const uint8_t *w, float post,
                      float *out, int64_t ldo) {
    __m256 s0[4], s1[4];
    for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= K; j += 16) {
        if ((j & 63) == 0) _mm_prefetch((const char *)(w + j + ROW_PREFETCH), _MM_HINT_T0);
        __m256 lo, hi;
        widen16(w + j, kind, &lo, &hi);
        for (int r = 0; r < R; r++) {
            s0[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * K + j), s0[r]);
            s1[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * K + j + 8), s1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float acc = hsum_ps(_mm256_add_ps(s0[r], s1[r]));
        for (int64_t jj = j; jj < K; jj++) acc += widen1(w, kind, jj) * x[r * K + jj];
        out[r * ldo] = acc * post;
    }
}

/* Every row of x against one byte weight row, 4 rows at a time (the row stays in L1 after the first). */
INLINE void byte_column(const int kind, int64_t M, const float *x, int64_t K, const uint8_t *w, float post,
                        float *out, int64_t ldo) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) byte_rows(kind, 4, x + m * K, K, w, post, out + m * ldo, ldo);
    switch (M - m) {
    case 3: byte_rows(kind, 3, x + m * K, K, w, post, out + m * ldo, ldo); break;
    case 2: byte_rows(kind, 2, x + m * K, K, w, post, out + m * ldo, ldo); break;
    case 1: byte_rows(kind, 1, x + m * K, K, w, post, out + m * ldo, ldo); break;
    default: break;
    }
}

INLINE void bf16_tile(const int R, const int C, const float *x, int64_t K, const uint16_t *w, float *out, int64_t ldo) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t j = 0; j < K8; j += 8) {
        __m256 wv[4];
        for (int c = 0; c < C; c++) wv[c] = bf16_load8(w + c * K + j);
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_loadu_ps(x + r * K + j);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = hsum_ps(acc[r][c]);
            for (int64_t j = K8; j < K; j++) s += bf16_scalar(w[c * K + j]) * x[r * K + j];
            out[r * ldo + c] = s;
        }
}

#define BF16_ROWS 16 /* activation rows per tile: 16 x K fp32 stays in L2 while the weights stream */

/* Few activation rows: one weight row at a time, start to end (one prefetched stream per thread, as
 * q8_rows), against each of the R rows while it is in L1. */
INLINE void bf16_rows(const int64_t R, const float *x, int64_t K, const uint16_t *w, float *out, int64_t ldo) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * K;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= K; j += 16) {
            if (r == 0 && (j & 31) == 0) _mm_prefetch((const char *)(w + j) + ROW_PREFETCH, _MM_HINT_T0);
            s0 = _mm256_fmadd_ps(bf16_load8(w + j), _mm256_loadu_ps(xr + j), s0);
            s1 = _mm256_fmadd_ps(bf16_load8(w + j + 8), _mm256_loadu_ps(xr + j + 8), s1);
        }
        for (; j + 8 <= K; j += 8) s0 = _mm256_fmadd_ps(bf16_load8(w + j), _mm256_loadu_ps(xr + j), s0);
        float acc = hsum_ps(_mm256_add_ps(s0, s1));
        for (; j < K; j++) acc += bf16_scalar(w[j]) * xr[j];
        out[r * ldo] = acc;
    }
}


/* y [M, N] = x [M, K] @ W^T, W bf16 [N, K] (its raw 16-bit patterns), fp32 accumulation. */
void lowbit_bf16_gemm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *out) {
    if (M == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) bf16_rows(M, x, K, w + n * K, out + n, N);
        return;
    }
    const int64_t nblocks = (N + 3) / 4;
#pragma omp parallel
    for (int64_t t0 = 0; t0 < M; t0 += BF16_ROWS) {
        const int64_t t1 = t0 + BF16_ROWS < M ? t0 + BF16_ROWS : M;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int64_t c0 = blk * 4;
            const int C = N - c0 < 4 ? (int)(N - c0) : 4;
            int64_t m = t0;
            if (C == 4) {
                for (; m + 2 <= t1; m += 2) bf16_tile(2, 4, x + m * K, K, w + c0 * K, out + m * N + c0, N);
                for (; m < t1; m++) bf16_tile(1, 4, x + m * K, K, w + c0 * K, out + m * N + c0, N);
            } else {
                for (; m < t1; m++)
                    for (int c = 0; c < C; c++) bf16_tile(1, 1, x + m * K, K, w + (c0 + c) * K, out + m * N + c0 + c, N);
            }
        }
    }
}

/* The same product for many rows, in the outer-product form of an SGEMM: a panel of 16 weight columns
 * x KC inputs is widened and transposed once into a per-thread buffer ([KC][16] fp32, in L1), then
 * each tile of MR rows broadcasts one activation per input against the panel's two 8-lane vectors:
 * 2 loads and MR broadcasts per 2 * MR FMAs, where the dot-product form above needs a load per FMA. */
#define KC 256
#define MR 6

INLINE void panel_tile(const int R, const float *x, int64_t K, const float *buf, int64_t kc, float *out,
                       int64_t ldo, int first, float post) {
    __m256 c0[MR], c1[MR];
    for (int r = 0; r < R; r++) {
        c0[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + r * ldo);
        c1[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + r * ldo + 8);
    }
    for (int64_t kk = 0; kk < kc; kk++) {
        const __m256 b0 = _mm256_load_ps(buf + kk * 16), b1 = _mm256_load_ps(buf + kk * 16 + 8);
        for (int r = 0; r < R; r++) {
            const __m256 a = _mm256_broadcast_ss(x + r * K + kk);
            c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
        }
    }
    const __m256 p = _mm256_set1_ps(post);
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + r * ldo, _mm256_mul_ps(c0[r], p));
        _mm256_storeu_ps(out + r * ldo + 8, _mm256_mul_ps(c1[r], p));
    }
}

/* 16 weight rows (stride K) x kc inputs -> buf [kc][16] fp32: 8 x 8 blocks widened and transposed in
 * registers (unpack / shuffle / lane permute), a scalar loop for the last kc % 8 inputs; `kind`: the
 * weight's element type (W_BF16, W_FP8, W_INT8). */
INLINE void pack_panel(const void *w, const int kind, int64_t K, int64_t kc, float *buf) {
    const int64_t kc8 = kc & ~(int64_t)7;
    for (int g = 0; g < 2; g++) {
        for (int64_t kk = 0; kk < kc8; kk += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = widen8(w, kind, (8 * g + i) * K + kk);
            const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = buf + kk * 16 + 8 * g;
            _mm256_store_ps(o + 0 * 16, _mm256_permute2f128_ps(s0, s4, 0x20));
            _mm256_store_ps(o + 1 * 16, _mm256_permute2f128_ps(s1, s5, 0x20));
            _mm256_store_ps(o + 2 * 16, _mm256_permute2f128_ps(s2, s6, 0x20));
            _mm256_store_ps(o + 3 * 16, _mm256_permute2f128_ps(s3, s7, 0x20));
            _mm256_store_ps(o + 4 * 16, _mm256_permute2f128_ps(s0, s4, 0x31));
            _mm256_store_ps(o + 5 * 16, _mm256_permute2f128_ps(s1, s5, 0x31));
            _mm256_store_ps(o + 6 * 16, _mm256_permute2f128_ps(s2, s6, 0x31));
            _mm256_store_ps(o + 7 * 16, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
    }
    for (int c = 0; c < 16; c++)
        for (int64_t kk = kc8; kk < kc; kk++) buf[kk * 16 + c] = widen1(w, kind, c * K + kk);
}

/* y [M, N] = post * (x [M, K] @ W^T) with W [N, K] of any `kind` (pack_panel), panels of 16 columns;
 * the columns past the last full panel through `tail` (one column, all rows). */
INLINE void gemm_panels(const float *x, int64_t M, int64_t K, const void *w, const int kind, int64_t N, float post,
                        float *out) {
    const int64_t panels = N / 16;
    const int64_t esize = kind == W_BF16 ? 2 : 1;
#pragma omp parallel
    {
        float *buf = (float *)aligned_alloc(32, KC * 16 * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t n0 = p * 16;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t kc = K - k0 < KC ? K - k0 : KC;
                const int first = k0 == 0;
                const float scale = k0 + kc == K ? post : 1.f;
                pack_panel((const char *)w + (n0 * K + k0) * esize, kind, K, kc, buf);
                int64_t m = 0;
                for (; m + MR <= M; m += MR)
                    panel_tile(MR, x + m * K + k0, K, buf, kc, out + m * N + n0, N, first, scale);
                const int rest = (int)(M - m);
                if (rest == 5) panel_tile(5, x + m * K + k0, K, buf, kc, out + m * N + n0, N, first, scale);
                else if (rest == 4) panel_tile(4, x + m * K + k0, K, buf, kc, out + m * N + n0, N, first, scale);
                else if (rest == 3) panel_tile(3, x + m * K + k0, K, buf, kc, out + m * N + n0, N, first, scale);
                else if (rest == 2) panel_tile(2, x + m * K + k0, K, buf, kc, out + m * N + n0, N, first, scale);
                else if (rest == 1) panel_tile(1, x + m * K + k0, K, buf, kc, out + m * N + n0, N, first, scale);
            }
        }
        free(buf);
    }
    /* columns past the last full panel: the dot-product kernels */
    const int64_t n0 = panels * 16;
    for (int64_t n = n0; n < N; n++) {
        if (kind != W_BF16)
            byte_column(kind, M, x, K, (const uint8_t *)w + n * K, post, out + n, N);
        else
            for (int64_t m = 0; m < M; m++) bf16_tile(1, 1, x + m * K, K, (const uint16_t *)w + n * K, out + m * N + n, N);
    }
}

void lowbit_bf16_gemm_panels(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *out) {
    gemm_panels(x, M, K, w, W_BF16, N, 1.f, out);
}

/* ---------------------------------------------------------------- fp8 (E4M3) weights, fp32 math --- */

/* FP8 checkpoints on a CPU without FP8 units: the weight stays one E4M3 byte and is widened exactly in
 * registers. An E4M3 byte s eeee mmm moved into 16 bits as s 0 eeee mmm 0000000 is the fp16 of its
 * value times 2^-8 (exponent biases 7 and 15; E4M3 subnormals land on fp16 subnormals, which F16C's
 * vcvtph2ps converts exactly), so: widen to 16 bits, shift left 8, arithmetic shift right 1 (the sign
 * is copied into bit 14), clear bit 14, vcvtph2ps. Callers pass post = 256 (times their scales) to undo
 * the 2^-8. E4M3's NaN (0x7F, 0xFF) reads as 480: quantized weights never hold it. */
/* y [M, N] = post * (x [M, K] @ W^T), W [N, K] E4M3 bytes; post = 256 gives the plain product.
 * `panels`: the SGEMM-style form (many rows), else the dot-product one (few rows). */
void lowbit_fp8_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float post, int panels,
                     float *out) {
    if (panels) {
        gemm_panels(x, M, K, w, W_FP8, N, post, out);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) byte_column(W_FP8, M, x, K, w + n * K, post, out + n, N);
}

/* ---------------------------------------------------------------- int8 weights, fp32 math ---------- */

/* Weight-only int8 (W8A16, an int8 LM head): y [M, N] = x [M, K] @ W^T with W int8 [N, K], fp32
 * activations and math, each weight widened exactly in registers; the caller scales the columns.
 * `panels` as lowbit_fp8_gemm. */
void lowbit_i8w_gemm(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t N, int panels, float *out) {
    if (panels) {
        gemm_panels(x, M, K, w, W_INT8, N, 1.f, out);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) byte_column(W_INT8, M, x, K, (const uint8_t *)(w + n * K), 1.f, out + n, N);
}

/* The whole weight widened to fp32 (times post), for a dense GEMM at prompt-chunk sizes, where the
 * GEMM's arithmetic, not the weight read, is the cost (torch's own fp8 -> fp32 cast is scalar code). */
void lowbit_fp8_widen(const uint8_t *w, int64_t count, float post, float *out) {
    const __m256 p = _mm256_set1_ps(post);
    const int64_t n16 = count & ~(int64_t)15;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n16; i += 16) {
        __m256 lo, hi;
        widen16(w + i, W_FP8, &lo, &hi);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(lo, p));
        _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(hi, p));
    }
    for (int64_t i = n16; i < count; i++) out[i] = fp8_scalar(w[i]) * post;
}

/* ---------------------------------------------------------------- one call per q4 layer ----------- */

/* Quantize x and run the q4 GEMM in one foreign call (one call, no tensors allocated for the int8
 * activations: at the demo model's sizes the per-call overhead is what a decode step costs). */
void lowbit_q4_linear(const float *x, int64_t M, int64_t K, int64_t B, const uint8_t *packed, const float *swt,
                      const float *zzt, int64_t N, float *out) {
    int8_t *qa = (int8_t *)malloc((size_t)(M * K));
    float *sa = (float *)malloc((size_t)(M * (K / B)) * sizeof(float));
    int32_t *asum = (int32_t *)malloc((size_t)(M * (K / B)) * sizeof(int32_t));
    lowbit_quant_blocks(x, M, K, B, qa, sa, asum);
    lowbit_q4_gemm(qa, sa, asum, M, K, B, packed, swt, zzt, N, out);
    free(qa);
    free(sa);
    free(asum);
}
