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
#include "cpu_lowbit.h"

/* ---------------------------------------------------------------- q4 x q8 ------------------------- */

/* x [M, K] fp32 -> qa int8 [M, K] (-127..127), sa [M, K/B] = absmax / 127 (1 where all zero),
 * asum [M, K/B] = the block's sum of qa. */
void lowbit_quant_blocks(const float *x, int64_t M, int64_t K, int64_t B, int8_t *qa, float *sa, int32_t *asum) {
    const int64_t nb = K / B;
#pragma omp parallel for schedule(dynamic, chunk_of(M, 1)) if (M * K >= (1 << 16))
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
#pragma omp for schedule(dynamic, chunk_of(N / 8, 8))
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
#pragma omp parallel for schedule(dynamic, chunk_of(N, 32))
        for (int64_t n = 0; n < N; n++) q8_rows(M, wq + n * K, a16, K, xs, ws[n], out + n, N);
        free(a16);
        return;
    }
#pragma omp parallel
    {
        int16_t *w16 = (int16_t *)malloc((size_t)(NC * K * 2));
        for (int64_t t0 = 0; t0 < M; t0 += MT) {
            const int64_t t1 = t0 + MT < M ? t0 + MT : M;
#pragma omp for schedule(dynamic, chunk_of((t1 - t0) * K, 4096))
            for (int64_t i = 0; i < (t1 - t0) * K; i++) a16[i] = xq[t0 * K + i];
#pragma omp for schedule(dynamic, chunk_of(nblocks, 4))
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
#pragma omp parallel for schedule(dynamic, chunk_of(M, 1)) if (M * K >= (1 << 16))
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
#pragma omp parallel for schedule(dynamic, chunk_of(N, 32))
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
#pragma omp parallel for schedule(dynamic, chunk_of(N * K / bs, 256))
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
#pragma omp parallel for schedule(dynamic, chunk_of(M, 1)) if (M * K >= (1 << 15))
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
