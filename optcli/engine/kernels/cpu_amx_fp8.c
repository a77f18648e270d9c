/* FP8 on AMX (see cpu_amx.c's header for the build and the why). */
#include "cpu_amx.h"

/* ------------------------------------------------------------ FP8 (E4M3) weights on the bf16 tiles --- */

/* Every E4M3 value is exact in bf16 (at most 4 significant bits, exponents 2^-9..2^8), so the weight is
 * widened exactly, a 32-column panel at a time, and multiplied on AMX's bf16 tiles (_tile_dpbf16ps: fp32
 * sums of exact bf16 products); activations arrive as bf16 (FP8-rounded per token by the caller when the
 * scheme quantizes them: those values are exact in bf16 too). y[m, n] = post_m[m] * post_n[n] * sum.
 * Layout (pack_fp8): per block of 16 columns and chunk of 32 inputs, 16 rows of 32 bytes, row r holding
 * inputs 2r, 2r+1 of the 16 columns (byte 2n + i = W[n, 2r + i]): widened, a row is a bf16 B-tile row. */

static uint16_t fp8_lut[128];

static void fp8_lut_init(void) {
    for (int c = 0; c < 128; c++) {
        int e = c >> 3, m = c & 7;
        float v = e == 0 ? m / 512.0f : (1.0f + m / 8.0f) * (float)(1 << e) / 128.0f;
        uint32_t bits;
        memcpy(&bits, &v, 4);
        fp8_lut[c] = c == 127 ? 0x7FC0 : (uint16_t)(bits >> 16);
    }
}

static void ensure_lut(void) {
    static int lut_ready = 0;
    if (!lut_ready) {
        fp8_lut_init();
        lut_ready = 1;
    }
}

/* 32 E4M3 bytes -> their 32 exact bf16 values: the 128-entry table of magnitudes (two 64-entry permutes and a
 * blend on bit 6), the sign moved up from bit 7. */
INLINE __m512i widen_fp8_row(const uint8_t *src) {
    const __m512i t0 = _mm512_loadu_si512(fp8_lut), t1 = _mm512_loadu_si512(fp8_lut + 32);
    const __m512i t2 = _mm512_loadu_si512(fp8_lut + 64), t3 = _mm512_loadu_si512(fp8_lut + 96);
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7F));
    const __m512i lo = _mm512_permutex2var_epi16(t0, mag, t1), hi = _mm512_permutex2var_epi16(t2, mag, t3);
    const __m512i w = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, _mm512_set1_epi16(0x40)), lo, hi);
    return _mm512_or_si512(w, _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8));
}

/* One block of 16 columns (K/32 chunks of 16 rows of 32 bytes) widened to bf16 into buf [K/2][32]. */
static void widen_fp8_block(const uint8_t *packed, int64_t K, int64_t block, uint16_t *buf) {
    const uint8_t *src = packed + block * K * 16;
    for (int64_t r = 0; r < K / 2; r++) _mm512_storeu_si512(buf + r * 32, widen_fp8_row(src + r * 32));
}

static void widen_fp8_panel(const uint8_t *packed, int64_t K, int64_t block0, uint16_t *buf) {
    widen_fp8_block(packed, K, block0, buf);
    widen_fp8_block(packed, K, block0 + 1, buf + K * 16);
}

/* One 32-row block (rows r0 + r1 from m0) of a against one widened panel (b0, b1: [K/32][16][32] bf16). */
static void fp8_block(const uint16_t *a, int64_t K, int64_t m0, int r0, int r1, const uint16_t *b0,
                      const uint16_t *b1, int64_t N, int64_t n0, const float *post_n, const float *post_m,
                      uint16_t *out16, float *cbuf) {
    int64_t chunks = K / 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; c++) {
        const uint16_t *ar = a + m0 * K + c * 32;
        _tile_loadd(4, ar, K * 2);
        _tile_loadd(6, b0 + c * 512, 64);
        _tile_loadd(7, b1 + c * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (r1 > 0) {
            _tile_loadd(5, ar + 16 * K, K * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, cbuf, 128);
    _tile_stored(1, cbuf + 16, 128);
    if (r1 > 0) {
        _tile_stored(2, cbuf + 16 * 32, 128);
        _tile_stored(3, cbuf + 16 * 32 + 16, 128);
    }
    __m512 s_lo = _mm512_loadu_ps(post_n + n0), s_hi = _mm512_loadu_ps(post_n + n0 + 16);
    for (int r = 0; r < r0 + r1; r++) {
        int64_t m = m0 + r;
        __m512 pm = _mm512_set1_ps(post_m ? post_m[m] : 1.0f);
        __m512 lo = _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(cbuf + r * 32), pm), s_lo);
        __m512 hi = _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(cbuf + r * 32 + 16), pm), s_hi);
        _mm512_storeu_si512(out16 + m * N + n0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* y [M, N] bf16 = post_m[m] (1 when NULL) * post_n[n] * (a [M, K] bf16 @ W^T), W from pack_fp8.
 * K % 32 == 0, N % 32 == 0. */
void amx_fp8_gemm(const uint16_t *a, int64_t M, int64_t K, const uint8_t *packed, int64_t N, const float *post_n,
                  const float *post_m, uint16_t *out16) {
    ensure_lut();
    int64_t chunks = K / 32, npanels = N / 32, per = panels_per_group(K, 2);
    int64_t groups = (npanels + per - 1) / per;
#pragma omp parallel
    {
        uint16_t *buf = aligned_alloc(64, (size_t)(K * 32 * 2) * per);
        float cbuf[32 * 32] __attribute__((aligned(64)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < groups; grp++) {
            int64_t p0 = grp * per, p1 = p0 + per < npanels ? p0 + per : npanels;
            for (int64_t p = p0; p < p1; p++) widen_fp8_panel(packed, K, 2 * p, buf + (p - p0) * K * 32);
            int cfg_r0 = -1, cfg_r1 = -1;
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                int r0 = (int)(M - m0 < 16 ? M - m0 : 16);
                int r1 = (int)(M - m0 - 16 < 0 ? 0 : (M - m0 - 16 < 16 ? M - m0 - 16 : 16));
                if (r0 != cfg_r0 || r1 != cfg_r1) {
                    configure(r0, r1);
                    cfg_r0 = r0, cfg_r1 = r1;
                }
                for (int64_t p = p0; p < p1; p++) {
                    const uint16_t *b0 = buf + (p - p0) * K * 32;
                    fp8_block(a, K, m0, r0, r1, b0, b0 + chunks * 512, N, 32 * p, post_n, post_m, out16, cbuf);
                }
            }
        }
        _tile_release();
        free(buf);
    }
}

/* FP8 on AVX-512 BF16 alone (Zen 4/5: no tiles): vdpbf16ps on the weights widened exactly to bf16 (fp32 sums
 * of exact bf16 products, as on the tiles). Up to 8 rows: each 32-byte row widened in registers as it streams
 * (one byte a weight read); more: each block of 16 columns widened once into a per-thread buffer (2 bytes a
 * weight, in L2) that every tile of 8 rows reads. U sums a row over successive weight rows (enough chains). */
INLINE void bf16_dot_tile(const int R, const int U, const uint16_t *a, int64_t K, const uint16_t *wbuf,
                          const uint8_t *src, __m512 *acc) {
    __m512 s[4][8];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < R; m++) s[u][m] = _mm512_setzero_ps();
    for (int64_t r = 0; r < K / 2; r += U) {
        for (int u = 0; u < U; u++) { /* src: widen as we go (one row tile); else read the widened buffer */
            const __m512bh w = (__m512bh)(src ? widen_fp8_row(src + (r + u) * 32)
                                              : _mm512_loadu_si512((const void *)(wbuf + (r + u) * 32)));
            for (int m = 0; m < R; m++) {
                int32_t pair;
                memcpy(&pair, a + m * K + 2 * (r + u), 4);
                s[u][m] = _mm512_dpbf16_ps(s[u][m], (__m512bh)_mm512_set1_epi32(pair), w);
            }
        }
    }
    for (int m = 0; m < R; m++) {
        acc[m] = s[0][m];
        for (int u = 1; u < U; u++) acc[m] = _mm512_add_ps(acc[m], s[u][m]);
    }
}

/* bf16_dot_tile on two widened blocks at once (wbuf, then the next block's K * 16 values): each activation
 * broadcast feeds two vdpbf16ps, so a tile of 8 rows loads ten vectors for sixteen dot products where one
 * block loads nine for eight (loads bounded it at 64 rows). Same R, U and order of sums per column as
 * bf16_dot_tile: the same result, bit for bit. One 1B layer's four GEMMs, 1 thread, 2-core Zen 5, interleaved:
 * 1.2x at M=16, 1.35x at 64, 1.45x at 256 (at 64, 20.0 ms against oneDNN's bf16 GEMM's 20.3). */
INLINE void bf16_dot_tile2(const int R, const int U, const uint16_t *a, int64_t K, const uint16_t *wbuf,
                           __m512 *acc0, __m512 *acc1) {
    __m512 s[4][8][2];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < R; m++) s[u][m][0] = s[u][m][1] = _mm512_setzero_ps();
    for (int64_t r = 0; r < K / 2; r += U) {
        for (int u = 0; u < U; u++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wbuf + (r + u) * 32));
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(wbuf + K * 16 + (r + u) * 32));
            for (int m = 0; m < R; m++) {
                int32_t pair;
                memcpy(&pair, a + m * K + 2 * (r + u), 4);
                const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
                s[u][m][0] = _mm512_dpbf16_ps(s[u][m][0], x, w0);
                s[u][m][1] = _mm512_dpbf16_ps(s[u][m][1], x, w1);
            }
        }
    }
    for (int m = 0; m < R; m++) {
        acc0[m] = s[0][m][0];
        acc1[m] = s[0][m][1];
        for (int u = 1; u < U; u++) {
            acc0[m] = _mm512_add_ps(acc0[m], s[u][m][0]);
            acc1[m] = _mm512_add_ps(acc1[m], s[u][m][1]);
        }
    }
}

/* The row tiles' R (1-8, a compile-time constant in each arm, so every sum stays in a register) and the U that
 * goes with it, for bf16_dot_tile and bf16_dot_tile2 alike: the two give the same bits only with the same U.
 * TILE(R, U) is the call, written at the call site. */
#define FP8_BY_ROWS(R, TILE)                                                                                       \
    switch (R) {                                                                                                   \
    case 1: TILE(1, 4); break;                                                                                     \
    case 2: TILE(2, 4); break;                                                                                     \
    case 3: TILE(3, 2); break;                                                                                     \
    case 4: TILE(4, 2); break;                                                                                     \
    case 5: TILE(5, 1); break;                                                                                     \
    case 6: TILE(6, 1); break;                                                                                     \
    case 7: TILE(7, 1); break;                                                                                     \
    default: TILE(8, 1); break;                                                                                    \
    }

static inline void fp8_store_rows(const __m512 *acc, int64_t R, int64_t m0, const float *post_m, __m512 pn,
                                  int64_t N, int64_t blk, uint16_t *out16) {
    for (int64_t m = 0; m < R; m++) {
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(acc[m], _mm512_set1_ps(post_m ? post_m[m0 + m] : 1.f)), pn);
        _mm256_storeu_si256((__m256i *)(out16 + (m0 + m) * N + blk * 16), (__m256i)_mm512_cvtneps_pbh(y));
    }
}

/* y [M, N] bf16 = post_m[m] (1 when NULL) * post_n[n] * (a [M, K] bf16 @ W^T), W from pack_fp8; K % 32, N % 16. */
void vnni_fp8_gemm(const uint16_t *a, int64_t M, int64_t K, const uint8_t *packed, int64_t N, const float *post_n,
                   const float *post_m, uint16_t *out16) {
    ensure_lut();
    const int64_t pairs = M > 8 ? N / 32 : 0; /* more than one row tile: blocks two at a time (bf16_dot_tile2) */
#pragma omp parallel
    {
        uint16_t *buf = aligned_alloc(64, (size_t)K * 64);
#pragma omp for schedule(dynamic, chunk_of(pairs, 1))
        for (int64_t pair = 0; pair < pairs; pair++) {
            const int64_t blk = 2 * pair;
            widen_fp8_panel(packed, K, blk, buf);
            const __m512 pn0 = _mm512_loadu_ps(post_n + blk * 16), pn1 = _mm512_loadu_ps(post_n + blk * 16 + 16);
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                const int64_t R = M - m0 < 8 ? M - m0 : 8;
                const uint16_t *am = a + m0 * K;
                __m512 acc0[8], acc1[8];
#define TILE2(r, u) bf16_dot_tile2(r, u, am, K, buf, acc0, acc1)
                FP8_BY_ROWS(R, TILE2)
#undef TILE2
                fp8_store_rows(acc0, R, m0, post_m, pn0, N, blk, out16);
                fp8_store_rows(acc1, R, m0, post_m, pn1, N, blk + 1, out16);
            }
        }
#pragma omp for schedule(dynamic, chunk_of(N / 16 - 2 * pairs, 2))
        for (int64_t blk = 2 * pairs; blk < N / 16; blk++) {
            const uint8_t *src = M <= 8 ? packed + blk * K * 16 : NULL; /* one row tile: no buffer round trip */
            if (!src) widen_fp8_block(packed, K, blk, buf);
            const __m512 pn = _mm512_loadu_ps(post_n + blk * 16);
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                const int64_t R = M - m0 < 8 ? M - m0 : 8;
                const uint16_t *am = a + m0 * K;
                __m512 acc[8];
#define TILE1(r, u) bf16_dot_tile(r, u, am, K, buf, src, acc)
                FP8_BY_ROWS(R, TILE1)
#undef TILE1
                fp8_store_rows(acc, R, m0, post_m, pn, N, blk, out16);
            }
        }
        free(buf);
    }
}

/* Per-token FP8 (E4M3) rounding of bf16 activations, as bf16 (every E4M3 value is exact in bf16): bit for bit
 * `ops.quantize_per_token(x, torch.float8_e4m3fn)` on x widened to fp32 (scale = max(absmax / 448, 1e-12),
 * x / scale clamped to +-448, rounded to nearest even on E4M3's grid, subnormals at steps of 2^-9). */
void amx_fp8_round_rows(const uint16_t *x, int64_t M, int64_t K, uint16_t *out, float *scales) {
#pragma omp parallel for schedule(dynamic, chunk_of(M, 1)) if (M * K >= (1 << 15))
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * K;
        __m512 amax = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const __m256i *)(xr + k))), 16));
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        float mx = _mm512_reduce_max_ps(amax);
        for (; k < K; k++) {
            uint32_t bits = (uint32_t)xr[k] << 16;
            float v;
            memcpy(&v, &bits, 4);
            v = v < 0 ? -v : v;
            mx = v > mx ? v : mx;
        }
        float s = mx / 448.f;
        s = s > 1e-12f ? s : 1e-12f;
        const __m512 vs = _mm512_set1_ps(s), top = _mm512_set1_ps(448.f), bottom = _mm512_set1_ps(-448.f);
        const __m512 tiny = _mm512_set1_ps(0.015625f);
        for (k = 0; k < K; k += 16) {
            __mmask16 live = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16(live, xr + k)), 16));
            __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, vs), bottom), top);
            __m512 sub = _mm512_mul_ps(_mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(512.f)),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                       _mm512_set1_ps(1.f / 512.f));
            __m512i b = _mm512_castps_si512(y);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 20), _mm512_set1_epi32(1));
            b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF), odd));
            __m512 nrm = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(~0xFFFFF)));
            __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(y), tiny, _CMP_LT_OQ), nrm, sub);
            __m256i r16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(r), 16));
            _mm256_mask_storeu_epi16(out + m * K + k, live, r16);
        }
        scales[m] = s;
    }
}
