/* The float kernels of the AVX2 library (see cpu_lowbit.c's header for the build and the why): dense
 * layers whose weights stay bf16, E4M3 or int8 in memory and are widened exactly to fp32 in registers,
 * fp32 math; a dot-product form for few rows and SGEMM-style panels for many. */

#include "cpu_lowbit.h"

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


INLINE float fp8_scalar(uint8_t v) {
    const __m128i h = _mm_and_si128(_mm_srai_epi16(_mm_cvtsi32_si128((int)v << 8), 1), _mm_set1_epi16((short)0xBFFF));
    return _mm_cvtss_f32(_mm_cvtph_ps(h));
}

/* The weight element types the float kernels below widen in registers (exactly: every bf16, E4M3 and
 * int8 value is an fp32 value; E4M3 read times 2^-8, see fp8_load8 in cpu_lowbit.h). */
enum { W_BF16 = 0, W_FP8 = 1, W_INT8 = 2 };


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
    __m256 s0[4], s1[4], s2[2], s3[2];
    for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm256_setzero_ps();
    for (int r = 0; r < 2; r++) s2[r] = s3[r] = _mm256_setzero_ps();
    int64_t j = 0;
    if (R <= 2) /* 32 weights a step into four sums a row: two would be one FMA latency chain per 16 bytes */
        for (; j + 32 <= K; j += 32) {
            if ((j & 63) == 0) _mm_prefetch((const char *)(w + j + ROW_PREFETCH), _MM_HINT_T0);
            __m256 lo, hi, lo2, hi2;
            widen16(w + j, kind, &lo, &hi);
            widen16(w + j + 16, kind, &lo2, &hi2);
            for (int r = 0; r < R; r++) {
                s0[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * K + j), s0[r]);
                s1[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * K + j + 8), s1[r]);
                s2[r] = _mm256_fmadd_ps(lo2, _mm256_loadu_ps(x + r * K + j + 16), s2[r]);
                s3[r] = _mm256_fmadd_ps(hi2, _mm256_loadu_ps(x + r * K + j + 24), s3[r]);
            }
        }
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
        __m256 s = _mm256_add_ps(s0[r], s1[r]);
        if (R <= 2) s = _mm256_add_ps(s, _mm256_add_ps(s2[r], s3[r]));
        float acc = hsum_ps(s);
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
        /* four independent sums: with two, the FMA latency chain capped one row at ~8 bytes a cycle (28 GB/s
         * on a Zen 5 core that reads 38) */
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int64_t j = 0;
        for (; j + 32 <= K; j += 32) {
            if (r == 0) _mm_prefetch((const char *)(w + j) + ROW_PREFETCH, _MM_HINT_T0);
            s0 = _mm256_fmadd_ps(bf16_load8(w + j), _mm256_loadu_ps(xr + j), s0);
            s1 = _mm256_fmadd_ps(bf16_load8(w + j + 8), _mm256_loadu_ps(xr + j + 8), s1);
            s2 = _mm256_fmadd_ps(bf16_load8(w + j + 16), _mm256_loadu_ps(xr + j + 16), s2);
            s3 = _mm256_fmadd_ps(bf16_load8(w + j + 24), _mm256_loadu_ps(xr + j + 24), s3);
        }
        for (; j + 8 <= K; j += 8) s0 = _mm256_fmadd_ps(bf16_load8(w + j), _mm256_loadu_ps(xr + j), s0);
        float acc = hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        for (; j < K; j++) acc += bf16_scalar(w[j]) * xr[j];
        out[r * ldo] = acc;
    }
}


/* y [M, N] = x [M, K] @ W^T, W bf16 [N, K] (its raw 16-bit patterns), fp32 accumulation. */
void lowbit_bf16_gemm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *out) {
    if (M == 1) {
#pragma omp parallel for schedule(dynamic, chunk_of(N, 32))
        for (int64_t n = 0; n < N; n++) bf16_rows(M, x, K, w + n * K, out + n, N);
        return;
    }
    const int64_t nblocks = (N + 3) / 4;
#pragma omp parallel
    for (int64_t t0 = 0; t0 < M; t0 += BF16_ROWS) {
        const int64_t t1 = t0 + BF16_ROWS < M ? t0 + BF16_ROWS : M;
#pragma omp for schedule(dynamic, chunk_of(nblocks, 4))
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
 * registers (`transpose8_store16`), a scalar loop for the last kc % 8 inputs; `kind`: the
 * weight's element type (W_BF16, W_FP8, W_INT8). */
INLINE void pack_panel(const void *w, const int kind, int64_t K, int64_t kc, float *buf) {
    const int64_t kc8 = kc & ~(int64_t)7;
    for (int g = 0; g < 2; g++) {
        for (int64_t kk = 0; kk < kc8; kk += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = widen8(w, kind, (8 * g + i) * K + kk);
            transpose8_store16(r, buf + kk * 16 + 8 * g);
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
#pragma omp for schedule(dynamic, chunk_of(panels, 1))
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
#pragma omp parallel for schedule(dynamic, chunk_of(N, 32))
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
#pragma omp parallel for schedule(dynamic, chunk_of(N, 32))
    for (int64_t n = 0; n < N; n++) byte_column(W_INT8, M, x, K, (const uint8_t *)(w + n * K), 1.f, out + n, N);
}

/* The whole weight widened to fp32 (times post), for a dense GEMM at prompt-chunk sizes, where the
 * GEMM's arithmetic, not the weight read, is the cost (torch's own fp8 -> fp32 cast is scalar code). */
void lowbit_fp8_widen(const uint8_t *w, int64_t count, float post, float *out) {
    const __m256 p = _mm256_set1_ps(post);
    const int64_t n16 = count & ~(int64_t)15;
#pragma omp parallel for schedule(dynamic, chunk_of(n16 / 16, 1024))
    for (int64_t i = 0; i < n16; i += 16) {
        __m256 lo, hi;
        widen16(w + i, W_FP8, &lo, &hi);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(lo, p));
        _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(hi, p));
    }
    for (int64_t i = n16; i < count; i++) out[i] = fp8_scalar(w[i]) * post;
}

/* ---------------------------------------------------------------- memory read probe --------------- */

/* The machine's read bandwidth as a GEMV sees it (roi/hardware.measure_host_bandwidth, the batch-1 decode
 * roofline): every byte of buf [n], n % 128 == 0, loaded once with four independent 32-byte streams per
 * thread, split in dynamic chunks of 1 MiB. Returns a checksum so the loads cannot be optimized away. */
int64_t lowbit_read_probe(const uint8_t *buf, int64_t n) {
    const int64_t chunk = 1 << 20, chunks = (n + chunk - 1) / chunk;
    int64_t total = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : total)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = c * chunk; i < end; i += 128) {
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(buf + i)));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(buf + i + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(buf + i + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(buf + i + 96)));
        }
        const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
        total += _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
                 _mm256_extract_epi64(s, 3);
    }
    return total;
}
