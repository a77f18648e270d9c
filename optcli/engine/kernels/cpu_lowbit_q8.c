/* W8A8 on x86 CPUs with AVX2 (no VNNI or AVX-512 needed): y [M, N] = (xq @ wq^T) * xs * ws with int8
 * weights [N, K] and int8 activations (W8A8's per-token quantization, `lowbit_quant_rows_int8`), every
 * integer sum exact: both widened to int16 and multiplied with _mm256_madd_epi16 (exact for every int8 value,
 * -128 too; a pair sums to at most 2 * 128 * 128, and K <= 2^17 keeps an int32 sum from overflowing).
 *
 * Two forms by the number of rows M:
 *  - few rows (q8_rows): each weight row streamed once and dotted with every row while it is in L1;
 *  - many rows (q8_panel_tile): the outer-product form of an SGEMM on int16 pairs. A panel of 16 weight
 *    columns x Q8_KC inputs is widened and transposed once into [Q8_KC / 2][16] int32 lanes, each lane one
 *    column's pair of int16 weights; a tile of Q8_MR rows broadcasts each row's pair of int16 activations
 *    against the panel's two vectors, and _mm256_madd_epi16 multiplies and adds the pair in one instruction:
 *    2 loads and Q8_MR broadcasts per 2 * Q8_MR madds covering two inputs, where fp32 FMAs cover one;
 * and the columns past the last full panel (N % 16) through the first.
 * Built with the other AVX2 kernels (cpu_lowbit.py). */
#include <string.h>

#include "cpu_lowbit.h"

/* Few activation rows: each weight row streamed once, start to end (one stream per thread, prefetched),
 * widened to int16 in registers and dotted with each of the R rows while it is in L1. Measured on a
 * 2048 -> 16384 GEMV: 1.13 ms against 1.83 for a tiled form whose 4 rows at stride K were 4 concurrent
 * streams per thread, which the memory system served at 18 GB/s. Also the columns past the panels'. */
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

/* ---------------------------------------------------------------- many rows: int16-pair panels ---- */

#define Q8_KC 512 /* inputs per panel: [256 pairs][16] int32 = 16 KiB, in L1 while a tile reads it */
#define Q8_MR 6   /* rows per tile: 12 accumulators + 2 weight vectors + 1 broadcast = 15 of AVX2's 16 registers */

/* 16 weight rows (stride K) x kc inputs (kc % 16 == 0) -> buf [kc / 2][16] int32: lane c of pair p holds
 * (w[c][2p], w[c][2p + 1]) as two int16. Per 8 rows x 16 inputs: widened to int16 (8 pairs of 32 bits a row),
 * then an 8 x 8 transpose of those 32-bit pairs in the float domain (`transpose8_store16`). */
INLINE void q8_pack_panel(const int8_t *w, int64_t K, int64_t kc, int32_t *buf) {
    for (int g = 0; g < 2; g++) {
        for (int64_t kk = 0; kk < kc; kk += 16) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = _mm256_castsi256_ps(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (8 * g + i) * K + kk))));
            transpose8_store16(r, (float *)buf + (kk / 2) * 16 + 8 * g);
        }
    }
}

/* R (<= Q8_MR) rows x 16 columns over one panel: acc [R][16] int32 (exact partial sums across panels of K)
 * += a16 [R][kc] (stride K) . buf. */
INLINE void q8_panel_tile(const int R, const int16_t *a16, int64_t K, const int32_t *buf, int64_t kc, int32_t *acc,
                          int first) {
    __m256i c0[Q8_MR], c1[Q8_MR];
    for (int r = 0; r < R; r++) {
        c0[r] = first ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i *)(acc + r * 16));
        c1[r] = first ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i *)(acc + r * 16 + 8));
    }
    for (int64_t p = 0; p < kc / 2; p++) {
        const __m256i b0 = _mm256_load_si256((const __m256i *)(buf + p * 16));
        const __m256i b1 = _mm256_load_si256((const __m256i *)(buf + p * 16 + 8));
        for (int r = 0; r < R; r++) {
            int32_t pair;
            memcpy(&pair, a16 + r * K + 2 * p, sizeof pair);
            const __m256i a = _mm256_set1_epi32(pair);
            c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(a, b0));
            c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(a, b1));
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_si256((__m256i *)(acc + r * 16), c0[r]);
        _mm256_storeu_si256((__m256i *)(acc + r * 16 + 8), c1[r]);
    }
}

#define Q8_PANEL_TILE(R) q8_panel_tile(R, a16 + m * K + k0, K, buf, kc, acc + m * 16, k0 == 0)

/* Full panels of 16 columns (n < 16 * (N / 16)); a16: the activations widened to int16 [M, K]. The result
 * as q8_rows': (float)(int32 sum) * xs[m], then * ws[n], as the reference (`ops.int8_scaled_mm`) rounds. */
static void q8_gemm_panels(const int16_t *a16, const float *xs, int64_t M, int64_t K, const int8_t *wq,
                           const float *ws, int64_t N, float *out) {
    const int64_t panels = N / 16;
#pragma omp parallel
    {
        int32_t *buf = (int32_t *)aligned_alloc(32, Q8_KC / 2 * 16 * sizeof(int32_t));
        int32_t *acc = (int32_t *)malloc((size_t)M * 16 * sizeof(int32_t));
#pragma omp for schedule(dynamic, chunk_of(panels, 1))
        for (int64_t pn = 0; pn < panels; pn++) {
            const int64_t n0 = pn * 16;
            for (int64_t k0 = 0; k0 < K; k0 += Q8_KC) {
                const int64_t kc = K - k0 < Q8_KC ? K - k0 : Q8_KC;
                q8_pack_panel(wq + n0 * K + k0, K, kc, buf);
                int64_t m = 0;
                for (; m + Q8_MR <= M; m += Q8_MR) Q8_PANEL_TILE(Q8_MR);
                switch (M - m) {
                case 5: Q8_PANEL_TILE(5); break;
                case 4: Q8_PANEL_TILE(4); break;
                case 3: Q8_PANEL_TILE(3); break;
                case 2: Q8_PANEL_TILE(2); break;
                case 1: Q8_PANEL_TILE(1); break;
                default: break;
                }
            }
            const __m256 w0 = _mm256_loadu_ps(ws + n0), w1 = _mm256_loadu_ps(ws + n0 + 8);
            for (int64_t r = 0; r < M; r++) {
                const __m256 s = _mm256_set1_ps(xs[r]);
                const __m256 y0 = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(acc + r * 16)));
                const __m256 y1 = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(acc + r * 16 + 8)));
                _mm256_storeu_ps(out + r * N + n0, _mm256_mul_ps(_mm256_mul_ps(y0, s), w0));
                _mm256_storeu_ps(out + r * N + n0 + 8, _mm256_mul_ps(_mm256_mul_ps(y1, s), w1));
            }
        }
        free(acc);
        free(buf);
    }
}

/* y [M, N] = (xq @ wq^T) * xs [M] * ws [N]; xq int8 [M, K], wq int8 [N, K], K % 16 == 0. Measured on the
 * Llama-3.2-1B layer's four GEMMs (AVX2 Zen 3, 2 threads, 7 interleaved rounds, 2026-12-07; the current form
 * against the others: benchmarks/cpu_paths.py --formats int8,bf16):
 * the panels 9.2 / 12.8 / 35.6 ms at M = 8 / 16 / 64 against 11.1 / 18.2 / 60.4 for the tiled dot-product
 * form they replaced (the bf16 source's fp32 panels: 17.4 / 23.8 / 60.2); at M <= 4 the row streams win. */
void lowbit_q8_gemm(const int8_t *xq, const float *xs, int64_t M, int64_t K, const int8_t *wq, const float *ws,
                    int64_t N, float *out) {
    int16_t *a16 = (int16_t *)malloc((size_t)(M * K * 2));
#pragma omp parallel for schedule(dynamic, chunk_of(M * K, 4096)) if (M * K >= (1 << 16))
    for (int64_t i = 0; i < M * K; i++) a16[i] = xq[i];
    int64_t n = 0;
    if (M > Q8_FEW_ROWS) {
        q8_gemm_panels(a16, xs, M, K, wq, ws, N, out);
        n = N / 16 * 16;
    }
#pragma omp parallel for schedule(dynamic, chunk_of(N - n, 32)) if (N - n > 1)
    for (int64_t c = n; c < N; c++) q8_rows(M, wq + c * K, a16, K, xs, ws[c], out + c, N);
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

