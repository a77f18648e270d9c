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
 * The q4 kernel keeps every integer sum exact (as the q8 one, cpu_lowbit_q8.c): 4-bit weights u in 0..15
 * (the signed value + 8), activations int8 in -127..127 with one scale per row and block of B inputs
 * (llama.cpp's q4_0 x q8_0 idea). _mm256_maddubs_epi16 takes u as its unsigned operand: a pair sums to at
 * most 15 * 127 * 2 = 3810, so 8 chunks of 32 (B <= 256) add up in int16 without overflow.
 * sum((u - 8) * a) = sum(u * a) - 8 * sum(a), the second term per block.
 *
 * Work split: blocks of weight columns across OpenMP threads (torch's own OpenMP runtime, which the
 * process has loaded already); rows in tiles (MT) so a tile's activations stay in L2 while the
 * weights stream. The q4 weights are pre-interleaved 8 columns per 64-input chunk (one stream per
 * thread).
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
