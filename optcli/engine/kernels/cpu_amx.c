/* Low-bit GEMMs on Intel AMX (Sapphire Rapids and later): y[M, N] = x[M, K] @ W[N, K]^T with the
 * activations rounded to int8 per row and group of G inputs and the weights held in 4 bits (W4A16's
 * groups) or 8 bits (W8A8's channels), multiplied by AMX's int8 tile unit (_tile_dpbssd: 16 x 16 x 64
 * exact int32 products a step).
 *
 * Why: on an AMX CPU torch's bf16 GEMM runs on the tiles (oneDNN), so at 16 and more rows the AVX2
 * kernels of cpu_lowbit.c, and torch's int4 kernel, lose to the bf16 source by 3-5x; torch's own
 * int8 GEMM (_int_mm) uses the tiles but knows nothing of 4-bit weights or per-group scales. The
 * int4 -> int8 step is two ALU ops per 64 weights (no float conversion), so the weights stream at
 * 4 bits and the tiles do the arithmetic.
 *
 * Math, per output element, with qa/sa the int8 activations and their per-(row, group) scales:
 *     y[m, n] = sum_g sa[m, g] * (sw[g, n] * dot_g(qa, q) + zw[g, n] * asum[m, g])
 * where dot_g is the exact int32 dot product over group g, q the weight values (4-bit: the stored
 * nibble u - 8) and zw the group's additive offset (`Int4Weight.zeros`; 0 when symmetric). One group
 * spanning all of K with per-channel sw is W8A8.
 *
 * Weight layout (pack_*): blocks of 16 output columns; per block, per chunk of 64 inputs, 16 rows of
 * 64 bytes, row r holding inputs 4r..4r+3 of the 16 columns (AMX's "VNNI" B layout: byte 4n + i of row
 * r = W[n, 4r + i]). 4-bit rows are stored in 32 bytes: low nibbles are bytes 0..31 of the row, high
 * nibbles bytes 32..63, so one AND and one shift rebuild a row.
 *
 * Work split: panels of 32 columns across OpenMP threads; each thread unpacks its panel's weights once
 * into an L2-resident buffer, then runs every 32-row block of x over it (4 C tiles, 2 A, 2 B).
 *
 * The same library serves CPUs with AVX-512 VNNI and BF16 but no AMX (Zen 4/5): cpu_vnni.c runs these
 * layouts and this math on VNNI dot products at every M (`cpu_amx.vnni_library()`; the tile code never runs).
 */
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_amx.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* The kernel hands out AMX tile state only to processes that ask (Linux 5.16+). 1 when granted. */
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* x [M, K] bf16 (raw 16-bit patterns) -> qa int8 [M, K], sa [M, K/G], asum [M, K/G] = sum of qa: per row
 * and group, compressed-tensors' symmetric int8 rule (`ops.quantize_per_token` on each group, bit for bit):
 * sa = max(absmax / 127.5, 1e-12), qa = clamp(round_half_even(x / sa), -128, 127). */
void amx_quant_groups(const uint16_t *x, int64_t M, int64_t K, int64_t G, int8_t *qa, float *sa, int32_t *asum) {
    int64_t ng = K / G;
#pragma omp parallel for collapse(2) schedule(dynamic, chunk_of(M * (K / G), 4)) if (M * K >= (1 << 15))
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < ng; g++) {
            const uint16_t *xr = x + m * K + g * G;
            __m512 amax = _mm512_setzero_ps();
            for (int64_t k = 0; k < G; k += 16) {
                __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(xr + k))), 16));
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            }
            float mx = _mm512_reduce_max_ps(amax);
            float s = mx / 127.5f;
            s = s > 1e-12f ? s : 1e-12f;
            __m512 vs = _mm512_set1_ps(s);
            __m512i total = _mm512_setzero_si512();
            int8_t *qr = qa + m * K + g * G;
            for (int64_t k = 0; k < G; k += 16) {
                __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(xr + k))), 16));
                __m512i q = _mm512_cvt_roundps_epi32(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-128));
                total = _mm512_add_epi32(total, q);
                _mm_storeu_si128((__m128i *)(qr + k), _mm512_cvtepi32_epi8(q));
            }
            sa[m * ng + g] = s;
            asum[m * ng + g] = _mm512_reduce_add_epi32(total);
        }
    }
}

/* One panel of 32 columns (2 blocks of 16) unpacked to int8 VNNI rows: buf[2][K/64][16][64]. */
static void unpack_q4_panel(const uint8_t *packed, int64_t K, int64_t block0, int8_t *buf) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi8(8);
    int64_t chunks = K / 64;
    for (int64_t c = 0; c < chunks; c++) {
        for (int b = 0; b < 2; b++) {
            const uint8_t *src = packed + ((block0 + b) * chunks + c) * 16 * 32;
            int8_t *dst = buf + (b * chunks + c) * 1024;
            for (int r = 0; r < 16; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(src + r * 32));
                __m256i lo = _mm256_and_si256(v, low);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                __m512i row = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_storeu_si512(dst + r * 64, _mm512_sub_epi8(row, eight));
            }
        }
    }
}

/* The core: every 32-row block of qa against npan panels of 32 columns from n0, panel j's two blocks of
 * 16 at base + j * K * 32 and 16 * K further ([K/64][16][64] int8 VNNI rows each), per group. The panels
 * share each block of qa while it sits in L2. */
static void panel_gemm(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K, int64_t G,
                       const int8_t *base, int64_t npan, const float *sw, const float *zw, int64_t N, int64_t n_first,
                       float *out32, uint16_t *out16) {
    int64_t ng = K / G, per_group = G / 64;
    int32_t ibuf[32 * 32] __attribute__((aligned(64)));
    float acc[32 * 32] __attribute__((aligned(64)));
    int cfg_r0 = -1, cfg_r1 = -1;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
        int r0 = (int)(M - m0 < 16 ? M - m0 : 16);
        int r1 = (int)(M - m0 - 16 < 0 ? 0 : (M - m0 - 16 < 16 ? M - m0 - 16 : 16));
        if (r0 != cfg_r0 || r1 != cfg_r1) {
            configure(r0, r1);
            cfg_r0 = r0, cfg_r1 = r1;
        }
        for (int64_t j = 0; j < npan; j++) {
        const int8_t *b0 = base + j * K * 32, *b1 = b0 + K * 16;
        int64_t n0 = n_first + 32 * j;
        memset(acc, 0, sizeof acc);
        for (int64_t g = 0; g < ng; g++) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
                const int8_t *a = qa + m0 * K + c * 64;
                _tile_loadd(4, a, K);
                _tile_loadd(6, b0 + c * 1024, 64);
                _tile_loadd(7, b1 + c * 1024, 64);
                _tile_dpbssd(0, 4, 6);
                _tile_dpbssd(1, 4, 7);
                if (r1 > 0) {
                    _tile_loadd(5, a + 16 * K, K);
                    _tile_dpbssd(2, 5, 6);
                    _tile_dpbssd(3, 5, 7);
                }
            }
            _tile_stored(0, ibuf, 128);
            _tile_stored(1, ibuf + 16, 128);
            if (r1 > 0) {
                _tile_stored(2, ibuf + 16 * 32, 128);
                _tile_stored(3, ibuf + 16 * 32 + 16, 128);
            }
            __m512 s_lo = _mm512_loadu_ps(sw + g * N + n0), s_hi = _mm512_loadu_ps(sw + g * N + n0 + 16);
            __m512 z_lo = _mm512_setzero_ps(), z_hi = _mm512_setzero_ps();
            if (zw) z_lo = _mm512_loadu_ps(zw + g * N + n0), z_hi = _mm512_loadu_ps(zw + g * N + n0 + 16);
            for (int r = 0; r < r0 + r1; r++) {
                int64_t m = m0 + r;
                __m512 a_s = _mm512_set1_ps(sa[m * ng + g]);
                __m512 a_sum = _mm512_set1_ps((float)asum[m * ng + g]);
                __m512 d_lo = _mm512_cvtepi32_ps(_mm512_load_si512(ibuf + r * 32));
                __m512 d_hi = _mm512_cvtepi32_ps(_mm512_load_si512(ibuf + r * 32 + 16));
                __m512 t_lo = _mm512_fmadd_ps(z_lo, a_sum, _mm512_mul_ps(s_lo, d_lo));
                __m512 t_hi = _mm512_fmadd_ps(z_hi, a_sum, _mm512_mul_ps(s_hi, d_hi));
                _mm512_store_ps(acc + r * 32, _mm512_fmadd_ps(t_lo, a_s, _mm512_load_ps(acc + r * 32)));
                _mm512_store_ps(acc + r * 32 + 16, _mm512_fmadd_ps(t_hi, a_s, _mm512_load_ps(acc + r * 32 + 16)));
            }
        }
        for (int r = 0; r < r0 + r1; r++) {
            int64_t m = m0 + r;
            __m512 lo = _mm512_load_ps(acc + r * 32), hi = _mm512_load_ps(acc + r * 32 + 16);
            if (out32) {
                _mm512_storeu_ps(out32 + m * N + n0, lo);
                _mm512_storeu_ps(out32 + m * N + n0 + 16, hi);
            } else {
                _mm512_storeu_si512(out16 + m * N + n0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
        }
    }
}

/* y [M, N] = the 4-bit GEMM above; packed from pack_q4, sw/zw [K/G, N] fp32 (zw NULL when symmetric);
 * qa/sa/asum from amx_quant_groups; out32 (fp32) or out16 (bf16) receives y. K % 64 == G % 64 == 0,
 * N % 32 == 0. */
void amx_q4_gemm(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K, int64_t G,
                 const uint8_t *packed, const float *sw, const float *zw, int64_t N, float *out32, uint16_t *out16) {
    int64_t npanels = N / 32, per = panels_per_group(K, 1), groups = (npanels + per - 1) / per;
#pragma omp parallel
    {
        int8_t *buf = aligned_alloc(64, (size_t)K * 32 * per);
#pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < groups; grp++) {
            int64_t p0 = grp * per, p1 = p0 + per < npanels ? p0 + per : npanels;
            for (int64_t p = p0; p < p1; p++) unpack_q4_panel(packed, K, 2 * p, buf + (p - p0) * K * 32);
            panel_gemm(qa, sa, asum, M, K, G, buf, p1 - p0, sw, zw, N, 32 * p0, out32, out16);
        }
        _tile_release();
        free(buf);
    }
}

/* Few rows (M <= 4): the same product without the tiles, whose fixed cost per 16 x 64 step is wasted on
 * one row. AVX-512 VNNI (_mm512_dpbusd_epi32: unsigned weight bytes x signed activation bytes) reads each
 * packed row once, as the unsigned nibble u (0..15), and takes 8 * asum off per group (q = u - 8). */
void amx_q4_gemv(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K, int64_t G,
                 const uint8_t *packed, const float *sw, const float *zw, int64_t N, uint16_t *out16) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    int64_t chunks = K / 64, ng = K / G, rows_per_group = G / 4;
#pragma omp parallel for schedule(dynamic, chunk_of(N / 16, 4))
    for (int64_t blk = 0; blk < N / 16; blk++) {
        const uint8_t *wb = packed + blk * chunks * 512;
        __m512 acc[4];
        for (int m = 0; m < 4; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m512i dot[4];
            for (int m = 0; m < 4; m++) dot[m] = _mm512_setzero_si512();
            for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r++) {
                /* row r of the block: chunk r / 16, row r % 16 of that chunk (32 packed bytes a row) */
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + r * 32));
                __m256i lo = _mm256_and_si256(v, low);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                for (int m = 0; m < M; m++) {
                    int32_t a4;
                    memcpy(&a4, qa + m * K + 4 * r, 4);
                    dot[m] = _mm512_dpbusd_epi32(dot[m], w, _mm512_set1_epi32(a4));
                }
            }
            __m512 s = _mm512_loadu_ps(sw + g * N + blk * 16);
            __m512 z = zw ? _mm512_loadu_ps(zw + g * N + blk * 16) : _mm512_setzero_ps();
            for (int m = 0; m < M; m++) {
                float total = (float)asum[m * ng + g];
                __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[m], _mm512_set1_epi32(8 * asum[m * ng + g])));
                __m512 t = _mm512_fmadd_ps(z, _mm512_set1_ps(total), _mm512_mul_ps(s, d));
                acc[m] = _mm512_fmadd_ps(t, _mm512_set1_ps(sa[m * ng + g]), acc[m]);
            }
        }
        for (int m = 0; m < M; m++)
            _mm256_storeu_si256((__m256i *)(out16 + m * N + blk * 16), (__m256i)_mm512_cvtneps_pbh(acc[m]));
    }
}

/* W8A8: one group over all of K, per-channel sw [N]; packed from pack_q8 (int8 VNNI rows). */
void amx_q8_gemm(const int8_t *qa, const float *sa, const int32_t *asum, int64_t M, int64_t K,
                 const int8_t *packed, const float *sw, int64_t N, float *out32, uint16_t *out16) {
    int64_t npanels = N / 32, per = panels_per_group(K, 1), groups = (npanels + per - 1) / per;
#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < groups; grp++) {
            int64_t p0 = grp * per, p1 = p0 + per < npanels ? p0 + per : npanels;
            panel_gemm(qa, sa, asum, M, K, K, packed + p0 * K * 32, p1 - p0, sw, NULL, N, 32 * p0, out32, out16);
        }
        _tile_release();
    }
}

/* One foreign call per layer: the activations quantized per row and group into scratch, then the 4-bit
 * (or, with G == K and pack_q8's layout, the 8-bit) product. At the demo model's sizes a GEMM costs tens of
 * microseconds, so three tensors allocated in Python and a second call are a visible share of a step. */
void amx_q4_linear(const uint16_t *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, const float *sw,
                   const float *zw, int64_t N, int64_t gemv_rows, uint16_t *out16) {
    int64_t ng = K / G;
    int8_t *qa = malloc((size_t)(M * K));
    float *sa = malloc((size_t)(M * ng) * sizeof(float));
    int32_t *asum = malloc((size_t)(M * ng) * sizeof(int32_t));
    amx_quant_groups(x, M, K, G, qa, sa, asum);
    if (M <= gemv_rows)
        amx_q4_gemv(qa, sa, asum, M, K, G, packed, sw, zw, N, out16);
    else
        amx_q4_gemm(qa, sa, asum, M, K, G, packed, sw, zw, N, NULL, out16);
    free(qa);
    free(sa);
    free(asum);
}

void amx_q8_linear(const uint16_t *x, int64_t M, int64_t K, const int8_t *packed, const float *sw, int64_t N,
                   uint16_t *out16) {
    int8_t *qa = malloc((size_t)(M * K));
    float *sa = malloc((size_t)M * sizeof(float));
    int32_t *asum = malloc((size_t)M * sizeof(int32_t));
    amx_quant_groups(x, M, K, K, qa, sa, asum);
    amx_q8_gemm(qa, sa, asum, M, K, packed, sw, N, NULL, out16);
    free(qa);
    free(sa);
    free(asum);
}
