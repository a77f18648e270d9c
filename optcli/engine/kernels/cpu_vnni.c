/* W4A16 and W8A8 on AVX-512 VNNI alone, for CPUs with AVX-512 VNNI and BF16 but no AMX (Zen 4/5): AMX's
 * weight layouts (pack_q4, pack_q8) and its math (see cpu_amx.c's header: activations rounded to int8 per row
 * and group, exact int32 group sums), on _mm512_dpbusd_epi32 at every batch size. Built into the AMX library;
 * `cpu_amx.vnni_library()` hands it out where the CPU has the flags, AMX or not.
 *
 * Measured on a 2-core Zen 5 (benchmarks/cpu_paths.py, one Llama-3.2-1B layer's four GEMMs, 1 thread):
 * int4 1.1x our AVX2 q4 x q8 kernel at M=1, 1.9x at 4-16, 2.4x at 64, 2.7x at 256; int8 1.0x our AVX2 int8
 * kernel at M=1, 1.6x at 4, 3.7x at 16, 3.9x at 64. */
#include "cpu_amx.h"

void amx_quant_groups(const uint16_t *x, int64_t M, int64_t K, int64_t G, int8_t *qa, float *sa, int32_t *asum);

/* Any M on AVX-512 VNNI alone (Zen 4/5: no tiles): amx_q4_gemv's dot products, R rows at a time against each
 * block of 16 columns, whose packed weights (16 KB at K = 2048) stay in L1 across the row tiles; U dot
 * sums a row over successive weight rows, so few rows still keep enough dpbusd chains in flight. */
INLINE void vnni_q4_tile(const int R, const int U, const int8_t *qa, const float *sa, const int32_t *asum,
                         int64_t K, int64_t G, const uint8_t *wb, const float *sw, const float *zw, int64_t N,
                         int64_t blk, uint16_t *out16) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const int64_t ng = K / G, rows_per_group = G / 4;
    __m512 acc[8];
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i dot[4][8];
        for (int u = 0; u < U; u++)
            for (int m = 0; m < R; m++) dot[u][m] = _mm512_setzero_si512();
        for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r += U) {
            for (int u = 0; u < U; u++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + (r + u) * 32));
                __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                                               _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
                for (int m = 0; m < R; m++) {
                    int32_t a4;
                    memcpy(&a4, qa + m * K + 4 * (r + u), 4);
                    dot[u][m] = _mm512_dpbusd_epi32(dot[u][m], w, _mm512_set1_epi32(a4));
                }
            }
        }
        __m512 s = _mm512_loadu_ps(sw + g * N + blk * 16);
        __m512 z = zw ? _mm512_loadu_ps(zw + g * N + blk * 16) : _mm512_setzero_ps();
        for (int m = 0; m < R; m++) {
            __m512i d = dot[0][m];
            for (int u = 1; u < U; u++) d = _mm512_add_epi32(d, dot[u][m]);
            d = _mm512_sub_epi32(d, _mm512_set1_epi32(8 * asum[m * ng + g]));
            __m512 t = _mm512_fmadd_ps(z, _mm512_set1_ps((float)asum[m * ng + g]), _mm512_mul_ps(s, _mm512_cvtepi32_ps(d)));
            acc[m] = _mm512_fmadd_ps(t, _mm512_set1_ps(sa[m * ng + g]), acc[m]);
        }
    }
    for (int m = 0; m < R; m++)
        _mm256_storeu_si256((__m256i *)(out16 + m * N + blk * 16), (__m256i)_mm512_cvtneps_pbh(acc[m]));
}

void vnni_q4_gemm(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K, int64_t G,
                  const uint8_t *packed, const float *sw, const float *zw, int64_t N, uint16_t *out16) {
    const int64_t chunks = K / 64, ng = K / G;
#pragma omp parallel for schedule(dynamic, chunk_of(N / 16, 4))
    for (int64_t blk = 0; blk < N / 16; blk++) {
        const uint8_t *wb = packed + blk * chunks * 512;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t R = M - m0 < 8 ? M - m0 : 8;
            const int8_t *q = qa + m0 * K;
            const float *s = sa + m0 * ng;
            const int32_t *t = asum + m0 * ng;
            uint16_t *o = out16 + m0 * N;
            switch (R) { /* constant R and U: the compiler keeps every sum in a register */
            case 1: vnni_q4_tile(1, 4, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            case 2: vnni_q4_tile(2, 4, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            case 3: vnni_q4_tile(3, 2, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            case 4: vnni_q4_tile(4, 2, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            case 5: vnni_q4_tile(5, 1, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            case 6: vnni_q4_tile(6, 1, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            case 7: vnni_q4_tile(7, 1, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            default: vnni_q4_tile(8, 1, q, s, t, K, G, wb, sw, zw, N, blk, o); break;
            }
        }
    }
}

/* W8A8 on VNNI alone: pack_q8's rows are dpbusd's signed operand as they are; the activations become its
 * unsigned one shifted by 128 (a ^ 0x80 = a + 128), and 128 * the column's weight sum (colsum) comes off. */
INLINE void vnni_q8_tile(const int R, const int U, const int8_t *qa, const float *sa, int64_t K, const int8_t *wb,
                         const int32_t *colsum, const float *sw, int64_t N, int64_t blk, uint16_t *out16) {
    __m512i dot[4][8];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < R; m++) dot[u][m] = _mm512_setzero_si512();
    for (int64_t r = 0; r < K / 4; r += U) {
        for (int u = 0; u < U; u++) {
            const __m512i w = _mm512_loadu_si512((const void *)(wb + (r + u) * 64));
            for (int m = 0; m < R; m++) {
                int32_t a4;
                memcpy(&a4, qa + m * K + 4 * (r + u), 4);
                dot[u][m] = _mm512_dpbusd_epi32(dot[u][m], _mm512_set1_epi32(a4 ^ (int32_t)0x80808080), w);
            }
        }
    }
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + blk * 16)), 7);
    const __m512 s = _mm512_loadu_ps(sw + blk * 16);
    for (int m = 0; m < R; m++) {
        __m512i d = dot[0][m];
        for (int u = 1; u < U; u++) d = _mm512_add_epi32(d, dot[u][m]);
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, shift)),
                                                     _mm512_set1_ps(sa[m])), s);
        _mm256_storeu_si256((__m256i *)(out16 + m * N + blk * 16), (__m256i)_mm512_cvtneps_pbh(y));
    }
}

/* y [M, N] bf16 = W8A8 of x bf16 [M, K] (quantized per token) against pack_q8's int8 rows; K % 64, N % 16. */
void vnni_q8_linear(const uint16_t *x, int64_t M, int64_t K, const int8_t *packed, const int32_t *colsum,
                    const float *sw, int64_t N, uint16_t *out16) {
    int8_t *qa = malloc((size_t)(M * K));
    float *sa = malloc((size_t)M * sizeof(float));
    int32_t *asum = malloc((size_t)M * sizeof(int32_t));
    amx_quant_groups(x, M, K, K, qa, sa, asum);
#pragma omp parallel for schedule(dynamic, chunk_of(N / 16, 4))
    for (int64_t blk = 0; blk < N / 16; blk++) {
        const int8_t *wb = packed + blk * K * 16;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t R = M - m0 < 8 ? M - m0 : 8;
            const int8_t *q = qa + m0 * K;
            uint16_t *o = out16 + m0 * N;
            switch (R) {
            case 1: vnni_q8_tile(1, 4, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            case 2: vnni_q8_tile(2, 4, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            case 3: vnni_q8_tile(3, 2, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            case 4: vnni_q8_tile(4, 2, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            case 5: vnni_q8_tile(5, 1, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            case 6: vnni_q8_tile(6, 1, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            case 7: vnni_q8_tile(7, 1, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            default: vnni_q8_tile(8, 1, q, sa + m0, K, wb, colsum, sw, N, blk, o); break;
            }
        }
    }
    free(qa);
    free(sa);
    free(asum);
}

/* The VNNI form of amx_q4_linear (no tiles at any M). */
void vnni_q4_linear(const uint16_t *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, const float *sw,
                    const float *zw, int64_t N, uint16_t *out16) {
    int64_t ng = K / G;
    int8_t *qa = malloc((size_t)(M * K));
    float *sa = malloc((size_t)(M * ng) * sizeof(float));
    int32_t *asum = malloc((size_t)(M * ng) * sizeof(int32_t));
    amx_quant_groups(x, M, K, G, qa, sa, asum);
    vnni_q4_gemm(qa, sa, asum, M, K, G, packed, sw, zw, N, out16);
    free(qa);
    free(sa);
    free(asum);
}


/* Dense bf16 layers on AVX-512 BF16 (a bf16 model's few-row steps): y [M, N] = x [M, K] @ W^T, both bf16, fp32
 * sums of the exact bf16 products (the numbers of `bf16w-dot`, which widens W to fp32 first, up to summation
 * order), one weight row streamed at a time against each of R <= 4 rows: 32 weights a vdpbf16ps, four sums a
 * row so the dot products' latency never caps the read. K % 32 == 0. */
INLINE void bf16_dot_rows(const int R, const uint16_t *x, int64_t K, const uint16_t *w, float *out, int64_t ldo) {
    __m512 s[4][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < 4; u++) s[r][u] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 128 <= K; j += 128) {
        _mm_prefetch((const char *)(w + j) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + j) + 1088, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + j) + 1152, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + j) + 1216, _MM_HINT_T0);
        for (int u = 0; u < 4; u++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + j + 32 * u));
            for (int r = 0; r < R; r++)
                s[r][u] = _mm512_dpbf16_ps(s[r][u], (__m512bh)_mm512_loadu_si512((const void *)(x + r * K + j + 32 * u)), wv);
        }
    }
    for (; j < K; j += 32) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + j));
        for (int r = 0; r < R; r++)
            s[r][0] = _mm512_dpbf16_ps(s[r][0], (__m512bh)_mm512_loadu_si512((const void *)(x + r * K + j)), wv);
    }
    for (int r = 0; r < R; r++)
        out[r * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), _mm512_add_ps(s[r][2], s[r][3])));
}

void vnni_bf16_gemm(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *out) {
#pragma omp parallel for schedule(dynamic, chunk_of(N, 32))
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t R = M - m0 < 4 ? M - m0 : 4;
            const uint16_t *xm = x + m0 * K;
            float *o = out + m0 * N + n;
            switch (R) {
            case 1: bf16_dot_rows(1, xm, K, w + n * K, o, N); break;
            case 2: bf16_dot_rows(2, xm, K, w + n * K, o, N); break;
            case 3: bf16_dot_rows(3, xm, K, w + n * K, o, N); break;
            default: bf16_dot_rows(4, xm, K, w + n * K, o, N); break;
            }
        }
    }
}
