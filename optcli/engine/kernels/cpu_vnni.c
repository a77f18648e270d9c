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
 * sums a row over successive weight rows, so few rows still keep enough dpbusd chains in flight.
 *
 * Scales (and zero points) block-major, [N/16, K/G, 16] (`cpu_amx.vnni_block_scales`), not AMX's [K/G, N]: a
 * block then reads its K/G scale rows from one contiguous run instead of K/G lines N floats apart. On a 2-core
 * Zen 5, one pass at M=1 over a 1B model's 64 layers (cold weights, the two orders built side by side, interleaved):
 * +14% weight-read rate at 2 threads, +1% at 1 (benchmarks/cpu_paths.py times the kernels as they are). */
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
        __m512 s = _mm512_loadu_ps(sw + (blk * ng + g) * 16);
        __m512 z = zw ? _mm512_loadu_ps(zw + (blk * ng + g) * 16) : _mm512_setzero_ps();
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

/* One row (a batch-1 decode step): vnni_q4_tile(1, ...)'s sums in half the instructions. A 64-byte load holds
 * two packed weight rows; masking and shifting it gives [row r | row r+1] for columns 0-7 and for columns 8-15,
 * so one activation vector ([r's 4 bytes x 8 | r+1's x 8], from one 8-byte load and a vpermd) serves both
 * dpbusd's, where the tile form splits each row across lanes (vinserti64x4) and broadcasts per row. The lane
 * halves are summed per group, so the int32 group sums, and every float step after them, are the tile form's:
 * the same result, bit for bit. Two row pairs a step keep four dpbusd chains in flight. Measured as above:
 * 1.03x the tile form at 1 thread, 1.05x at 2 (the read, not the instructions, bounds a decode step). */
INLINE void vnni_q4_row(const int8_t *qa, const float *sa, const int32_t *asum, int64_t K, int64_t G,
                        const uint8_t *wb, const float *sw, const float *zw, int64_t N, int64_t blk, uint16_t *out16) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8);
    const int64_t ng = K / G, rows_per_group = G / 4;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i lo0 = _mm512_setzero_si512(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r += 4) {
            _mm_prefetch((const char *)(wb + r * 32) + 2048, _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + r * 32) + 2112, _MM_HINT_T0);
            const __m512i v0 = _mm512_loadu_si512((const void *)(wb + r * 32));
            const __m512i v1 = _mm512_loadu_si512((const void *)(wb + r * 32 + 64));
            const __m512i a0 = _mm512_permutexvar_epi32(pair, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(qa + 4 * r))));
            const __m512i a1 = _mm512_permutexvar_epi32(pair, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(qa + 4 * r + 8))));
            lo0 = _mm512_dpbusd_epi32(lo0, _mm512_and_si512(v0, low), a0);
            hi0 = _mm512_dpbusd_epi32(hi0, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low), a0);
            lo1 = _mm512_dpbusd_epi32(lo1, _mm512_and_si512(v1, low), a1);
            hi1 = _mm512_dpbusd_epi32(hi1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low), a1);
        }
        const __m512i lo = _mm512_add_epi32(lo0, lo1), hi = _mm512_add_epi32(hi0, hi1);
        __m512i d = _mm512_add_epi32(_mm512_permutex2var_epi32(lo, first, hi), _mm512_permutex2var_epi32(lo, second, hi));
        d = _mm512_sub_epi32(d, _mm512_set1_epi32(8 * asum[g]));
        __m512 s = _mm512_loadu_ps(sw + (blk * ng + g) * 16);
        __m512 z = zw ? _mm512_loadu_ps(zw + (blk * ng + g) * 16) : _mm512_setzero_ps();
        __m512 t = _mm512_fmadd_ps(z, _mm512_set1_ps((float)asum[g]), _mm512_mul_ps(s, _mm512_cvtepi32_ps(d)));
        acc = _mm512_fmadd_ps(t, _mm512_set1_ps(sa[g]), acc);
    }
    _mm256_storeu_si256((__m256i *)(out16 + blk * 16), (__m256i)_mm512_cvtneps_pbh(acc));
}

/* Batched rows: R <= 4 rows against four blocks of 16 columns at once (vnni_q8_tile4's register tile), the
 * float sums of a row-block pair parked in `acc` between groups. The same int32 group sums and float steps as
 * vnni_q4_tile: the same result, bit for bit. Less gained than for int8 (measured as vnni_q8_tile4: 1.18x at
 * M=16, 1.09x at 64, 1.05x at 256): unpacking the nibbles, not the loads, bounds it. */
INLINE void vnni_q4_tile4(const int R, const int8_t *qa, const float *sa, const int32_t *asum, int64_t K, int64_t G,
                          const uint8_t *wb, const float *sw, const float *zw, int64_t N, int64_t blk,
                          uint16_t *out16) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const int64_t ng = K / G, rows_per_group = G / 4, stride = K * 8; /* bytes from block to block */
    __m512 acc[4][4];
    for (int m = 0; m < R; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i dot[4][4];
        for (int m = 0; m < R; m++)
            for (int c = 0; c < 4; c++) dot[m][c] = _mm512_setzero_si512();
        for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r++) {
            __m512i w[4];
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + c * stride + r * 32));
                w[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                                          _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
            }
            for (int m = 0; m < R; m++) {
                int32_t a4;
                memcpy(&a4, qa + m * K + 4 * r, 4);
                const __m512i a = _mm512_set1_epi32(a4);
                for (int c = 0; c < 4; c++) dot[m][c] = _mm512_dpbusd_epi32(dot[m][c], w[c], a);
            }
        }
        for (int c = 0; c < 4; c++) {
            const __m512 s = _mm512_loadu_ps(sw + ((blk + c) * ng + g) * 16);
            const __m512 z = zw ? _mm512_loadu_ps(zw + ((blk + c) * ng + g) * 16) : _mm512_setzero_ps();
            for (int m = 0; m < R; m++) {
                const __m512i d = _mm512_sub_epi32(dot[m][c], _mm512_set1_epi32(8 * asum[m * ng + g]));
                const __m512 t = _mm512_fmadd_ps(z, _mm512_set1_ps((float)asum[m * ng + g]),
                                                 _mm512_mul_ps(s, _mm512_cvtepi32_ps(d)));
                acc[m][c] = _mm512_fmadd_ps(t, _mm512_set1_ps(sa[m * ng + g]), acc[m][c]);
            }
        }
    }
    for (int m = 0; m < R; m++)
        for (int c = 0; c < 4; c++)
            _mm256_storeu_si256((__m256i *)(out16 + m * N + (blk + c) * 16), (__m256i)_mm512_cvtneps_pbh(acc[m][c]));
}

void vnni_q4_gemm(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K, int64_t G,
                  const uint8_t *packed, const float *sw, const float *zw, int64_t N, uint16_t *out16) {
    const int64_t chunks = K / 64, ng = K / G;
    if (M == 1 && G % 16 == 0) {
#pragma omp parallel for schedule(dynamic, chunk_of(N / 16, 4))
        for (int64_t blk = 0; blk < N / 16; blk++)
            vnni_q4_row(qa, sa, asum, K, G, packed + blk * chunks * 512, sw, zw, N, blk, out16);
        return;
    }
    const int64_t quads = M >= 4 ? N / 64 : 0; /* blocks taken four at a time by vnni_q4_tile4 */
#pragma omp parallel for schedule(dynamic, chunk_of(quads, 1))
    for (int64_t quad = 0; quad < quads; quad++) {
        const uint8_t *wb = packed + quad * 4 * chunks * 512;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t R = M - m0 < 4 ? M - m0 : 4;
            const int8_t *q = qa + m0 * K;
            const float *s = sa + m0 * ng;
            const int32_t *t = asum + m0 * ng;
            uint16_t *o = out16 + m0 * N;
            switch (R) {
            case 1: vnni_q4_tile4(1, q, s, t, K, G, wb, sw, zw, N, 4 * quad, o); break;
            case 2: vnni_q4_tile4(2, q, s, t, K, G, wb, sw, zw, N, 4 * quad, o); break;
            case 3: vnni_q4_tile4(3, q, s, t, K, G, wb, sw, zw, N, 4 * quad, o); break;
            default: vnni_q4_tile4(4, q, s, t, K, G, wb, sw, zw, N, 4 * quad, o); break;
            }
        }
    }
#pragma omp parallel for schedule(dynamic, chunk_of(N / 16 - 4 * quads, 4))
    for (int64_t blk = 4 * quads; blk < N / 16; blk++) {
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

/* Batched rows: R <= 4 rows against four blocks of 16 columns at once, the register tile of a GEMM micro-kernel.
 * Each activation broadcast feeds four dpbusd's and each weight load R, where vnni_q8_tile(8, 1) loads nine
 * vectors for its eight dpbusd's, so loads, not dot products, bounded it. The sums are exact int32 either way:
 * the same result, bit for bit. One 1B layer's four GEMMs, 1 thread, 2-core Zen 5, interleaved against the
 * 8-row tile: 1.6x at M=16, 1.5x at 64 and 256 (now 1.7x oneDNN's bf16 GEMM at 64); six rows spill: 0.97x. */
INLINE void vnni_q8_tile4(const int R, const int8_t *qa, const float *sa, int64_t K, const int8_t *wb,
                          const int32_t *colsum, const float *sw, int64_t N, int64_t blk, uint16_t *out16) {
    __m512i dot[4][4];
    for (int m = 0; m < R; m++)
        for (int c = 0; c < 4; c++) dot[m][c] = _mm512_setzero_si512();
    const int64_t stride = K * 16; /* bytes from one block's packed rows to the next block's */
    for (int64_t r = 0; r < K / 4; r++) {
        __m512i w[4];
        for (int c = 0; c < 4; c++) w[c] = _mm512_loadu_si512((const void *)(wb + c * stride + r * 64));
        for (int m = 0; m < R; m++) {
            int32_t a4;
            memcpy(&a4, qa + m * K + 4 * r, 4);
            const __m512i a = _mm512_set1_epi32(a4 ^ (int32_t)0x80808080);
            for (int c = 0; c < 4; c++) dot[m][c] = _mm512_dpbusd_epi32(dot[m][c], a, w[c]);
        }
    }
    for (int c = 0; c < 4; c++) {
        const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + (blk + c) * 16)), 7);
        const __m512 s = _mm512_loadu_ps(sw + (blk + c) * 16);
        for (int m = 0; m < R; m++) {
            const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[m][c], shift)),
                                                         _mm512_set1_ps(sa[m])), s);
            _mm256_storeu_si256((__m256i *)(out16 + m * N + (blk + c) * 16), (__m256i)_mm512_cvtneps_pbh(y));
        }
    }
}

/* y [M, N] bf16 = W8A8 of x bf16 [M, K] (quantized per token) against pack_q8's int8 rows; K % 64, N % 16. */
void vnni_q8_linear(const uint16_t *x, int64_t M, int64_t K, const int8_t *packed, const int32_t *colsum,
                    const float *sw, int64_t N, uint16_t *out16) {
    int8_t *qa = malloc((size_t)(M * K));
    float *sa = malloc((size_t)M * sizeof(float));
    int32_t *asum = malloc((size_t)M * sizeof(int32_t));
    amx_quant_groups(x, M, K, K, qa, sa, asum);
    const int64_t quads = M >= 4 ? N / 64 : 0; /* blocks taken four at a time by vnni_q8_tile4 */
#pragma omp parallel for schedule(dynamic, chunk_of(quads, 1))
    for (int64_t quad = 0; quad < quads; quad++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t R = M - m0 < 4 ? M - m0 : 4;
            const int8_t *q = qa + m0 * K;
            const int8_t *wb = packed + quad * 4 * K * 16;
            uint16_t *o = out16 + m0 * N;
            switch (R) {
            case 1: vnni_q8_tile4(1, q, sa + m0, K, wb, colsum, sw, N, 4 * quad, o); break;
            case 2: vnni_q8_tile4(2, q, sa + m0, K, wb, colsum, sw, N, 4 * quad, o); break;
            case 3: vnni_q8_tile4(3, q, sa + m0, K, wb, colsum, sw, N, 4 * quad, o); break;
            default: vnni_q8_tile4(4, q, sa + m0, K, wb, colsum, sw, N, 4 * quad, o); break;
            }
        }
    }
#pragma omp parallel for schedule(dynamic, chunk_of(N / 16 - 4 * quads, 4))
    for (int64_t blk = 4 * quads; blk < N / 16; blk++) {
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
