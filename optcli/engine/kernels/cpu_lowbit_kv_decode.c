/* Decode attention over the paged KV cache on CPU (engine/attention/cpu.py, called by cpu_kv8.decode_attention):
 * each (sequence, KV head) task reads its keys and values where they lie in the paged cache, with no widened copy
 * of the context, and computes its query heads' scores, softmax and weighted values in fp32. The cache holds 8-bit
 * codes (KV_FP8, KV_INT8) or rows in the activations' dtype (KV_BF16, KV_F32: there the kernel replaces a block
 * gather, a mask and torch's SDPA, ~200 us a layer at batch 1 on the 1B shape, for one call). The cache's store and
 * its gather for prefill chunks are in cpu_lowbit_kv.c; this file is built into the same library. */

#include <math.h>

#include "cpu_lowbit.h"

/* Eight 8-lane sums at once: lane j of the result is the sum of v[j]'s lanes. */
INLINE __m256 hsum8x8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d); /* [0 1 2 3 | 0 1 2 3], [4..7 | 4..7] */
    const __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
    return _mm256_add_ps(lo, hi);
}

INLINE __m256 round_bf16x8(__m256 v) { /* to the nearest bf16, ties to even, kept in fp32 (as f32x8_bf16) */
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* One cached row of `dim` codes (a key or a value of one KV head) widened to fp32 in "read units": an int8 code as
 * itself, an E4M3 code as its value times 2^-8 (fp8_load8, cpu_lowbit.h), a bf16 or fp32 value as itself. A
 * centred key (cs non-NULL) gets a * cos_p + b * sin_p added (coefficients in read units) in fp32, then rounded to
 * bf16 where `round`. E4M3's NaN codes read as 480 * 2^-8: the store saturates, so the cache never holds them from
 * finite keys. */
INLINE void widen_row(const uint8_t *src, int kind, int64_t dim, float *dst, const float *cs, int64_t p,
                      const float *a, const float *b, int round) {
    for (int64_t d = 0; d < dim; d += 8) {
        __m256 k;
        if (kind == KV_FP8)
            k = fp8_load8(src + d);
        else if (kind == KV_INT8)
            k = i8_load8((const int8_t *)src + d);
        else if (kind == KV_BF16) /* exact: a 16-bit shift */
            k = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 2 * d))), 16));
        else
            k = _mm256_loadu_ps((const float *)src + d);
        if (cs) {
            const float *cos = cs + p * 2 * dim, *sin = cos + dim;
            k = _mm256_fmadd_ps(_mm256_loadu_ps(b + d), _mm256_loadu_ps(sin + d), k);
            k = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(cos + d), k);
            if (round) k = round_bf16x8(k);
        }
        _mm256_storeu_ps(dst + d, k);
    }
}

#define DECODE_MAX_DIM 256
#define DECODE_MAX_GROUP 16

/* What one (sequence, KV head) task reads: its G query heads (fp32, times the read unit's inverse), its keys
 * lo..hi-1 through the block table (k and v point at its KV head's first row), the centre coefficients in read
 * units, and where its G output rows go. */
typedef struct {
    const float *q;     /* [G, dim] */
    const int64_t *tab; /* the sequence's block table */
    const uint8_t *k, *v;
    int64_t bs, row_stride, lo, hi, G, dim;
    int kind;
    const float *cs, *a, *b; /* centre: cos|sin rows, coefficients (NULL: not centred) */
    float unit;              /* a V code read in read units times this is the code */
    int round_bf16;          /* round the centred keys and the softmax weights to bf16, as the SDPA path does */
    float scale;             /* the softmax scale, applied to the dot products */
    float *sc;               /* [G, stride] scores, then weights */
    int64_t stride;
    float *out; /* [G, dim] */
} DecodeTask;

/* Walks a sequence's positions block by block (a division per row cost more than its dot products), handing out
 * each position's row of one KV head, and prefetches the row DECODE_AHEAD positions on: a KV head's rows are one
 * 64-byte line in every kv * dim bytes, a stride the hardware prefetcher follows poorly. */
#define DECODE_AHEAD 32
typedef struct {
    int64_t blk, off, ahead_blk, ahead_off, ahead_left;
} RowWalk;

INLINE RowWalk row_walk(const DecodeTask *t) {
    const int64_t ahead = t->lo + DECODE_AHEAD;
    return (RowWalk){t->lo / t->bs, t->lo % t->bs, ahead / t->bs, ahead % t->bs, t->hi - ahead};
}

INLINE void next_rows(const DecodeTask *t, const uint8_t *cache, RowWalk *w, int64_t m, const uint8_t **rows) {
    for (int64_t j = 0; j < m; j++) {
        rows[j] = cache + (t->tab[w->blk] * t->bs + w->off) * t->row_stride;
        if (++w->off == t->bs) w->off = 0, ++w->blk;
        if (w->ahead_left-- > 0) {
            _mm_prefetch((const char *)cache + (t->tab[w->ahead_blk] * t->bs + w->ahead_off) * t->row_stride,
                         _MM_HINT_T0);
            if (++w->ahead_off == t->bs) w->ahead_off = 0, ++w->ahead_blk;
        }
    }
}

/* Softmax of each head's n dot products in place, scaled first (as SDPA scales q.k, not q: the same roundings),
 * the padding to `stride` given weight 0; writes 1 / sum of each head into inv. */
static void softmax_rows(float *sc, int64_t G, int64_t n, int64_t stride, float scale, float *inv, int round) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (int64_t g = 0; g < G; g++) {
        float *s = sc + g * stride;
        for (int64_t i = 0; i + 8 <= stride; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), sv));
        float mx = s[0];
        for (int64_t i = 1; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        for (int64_t i = n; i < stride; i++) s[i] = -INFINITY;
        const __m256 mv = _mm256_set1_ps(mx);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t i = 0; i < stride; i += 8) {
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
            _mm256_storeu_ps(s + i, round ? round_bf16x8(e) : e); /* the sum stays unrounded, as SDPA's */
            sum = _mm256_add_ps(sum, e);
        }
        inv[g] = 1.f / hsum_ps(sum);
    }
}

/* AVX2 form: keys eight at a time, widened into an L1 buffer, each head's eight dot products summed across lanes
 * together (hsum8x8); values eight at a time into per-head accumulators. */
static void decode_task8(const DecodeTask *t) {
    const int64_t G = t->G, dim = t->dim, n = t->hi - t->lo;
    float rows[8 * DECODE_MAX_DIM] __attribute__((aligned(32)));
    const uint8_t *src[8];
    RowWalk walk = row_walk(t);
    for (int64_t t0 = t->lo; t0 < t->hi; t0 += 8) {
        const int64_t m = t->hi - t0 < 8 ? t->hi - t0 : 8;
        next_rows(t, t->k, &walk, m, src);
        for (int64_t j = 0; j < 8; j++) {
            if (j < m)
                widen_row(src[j], t->kind, dim, rows + j * dim, t->cs, t0 + j, t->a, t->b, t->round_bf16);
            else
                for (int64_t d = 0; d < dim; d++) rows[j * dim + d] = 0.f;
        }
        for (int64_t g = 0; g < G; g++) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 qv = _mm256_loadu_ps(t->q + g * dim + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_load_ps(rows + j * dim + d), acc[j]);
            }
            _mm256_storeu_ps(t->sc + g * t->stride + (t0 - t->lo), hsum8x8(acc));
        }
    }
    float inv[DECODE_MAX_GROUP];
    softmax_rows(t->sc, G, n, t->stride, t->scale, inv, t->round_bf16);
    float acc_o[DECODE_MAX_GROUP * DECODE_MAX_DIM] __attribute__((aligned(32)));
    for (int64_t i = 0; i < G * dim; i++) acc_o[i] = 0.f;
    walk = row_walk(t);
    for (int64_t t0 = t->lo; t0 < t->hi; t0 += 8) {
        const int64_t m = t->hi - t0 < 8 ? t->hi - t0 : 8;
        next_rows(t, t->v, &walk, m, src);
        for (int64_t j = 0; j < m; j++) widen_row(src[j], t->kind, dim, rows + j * dim, NULL, 0, NULL, NULL, 0);
        for (int64_t g = 0; g < G; g++) {
            const float *p = t->sc + g * t->stride + (t0 - t->lo);
            for (int64_t d = 0; d < dim; d += 8) {
                __m256 a = _mm256_load_ps(acc_o + g * dim + d);
                for (int64_t j = 0; j < m; j++)
                    a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_load_ps(rows + j * dim + d), a);
                _mm256_store_ps(acc_o + g * dim + d, a);
            }
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < dim; d++) t->out[g * dim + d] = acc_o[g * dim + d] * inv[g] * t->unit;
}

/* AVX-512 form (dim % 16 == 0, 8-bit codes): each key's row widened in registers (16 codes a vector), centred, and
 * multiplied into each head's accumulator; sixteen keys' accumulators are then summed across lanes together (sum16x16), so a
 * key costs about three lane-sum operations a head rather than a full reduction. Values: every head's output kept
 * in registers across the keys. Instantiated with constant G and dim for the common shapes (always_inline), so the
 * compiler keeps q, the centre and the accumulators in registers. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl")))

AVX512_INLINE __m512 widen16_codes(const uint8_t *p, int kind) {
    if (kind == KV_FP8) {
        const __m256i b = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8);
        return _mm512_cvtph_ps(_mm256_and_si256(_mm256_srai_epi16(b, 1), _mm256_set1_epi16((short)0xBFFF)));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* lane j of the result: the sum of v[j]'s 16 lanes. */
AVX512_INLINE __m512 sum16x16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

AVX512_INLINE void decode_task16_body(const DecodeTask *t, const int64_t G, const int64_t dim, const int kind) {
    const int64_t C = dim / 16, n = t->hi - t->lo;
    __m512 qv[DECODE_MAX_GROUP * DECODE_MAX_DIM / 16], ca[DECODE_MAX_DIM / 16], cb[DECODE_MAX_DIM / 16];
    for (int64_t i = 0; i < G * C; i++) qv[i] = _mm512_loadu_ps(t->q + 16 * i);
    if (t->cs)
        for (int64_t c = 0; c < C; c++) ca[c] = _mm512_loadu_ps(t->a + 16 * c), cb[c] = _mm512_loadu_ps(t->b + 16 * c);
    __m512 part[DECODE_MAX_GROUP][16];
    const uint8_t *src[16];
    RowWalk walk = row_walk(t);
    for (int64_t t0 = t->lo; t0 < t->hi; t0 += 16) {
        const int64_t m = t->hi - t0 < 16 ? t->hi - t0 : 16;
        next_rows(t, t->k, &walk, m, src);
        for (int64_t j = 0; j < m; j++) {
            __m512 s[DECODE_MAX_GROUP];
#pragma GCC unroll 16
            for (int64_t g = 0; g < G; g++) s[g] = _mm512_setzero_ps();
            const float *cosr = t->cs ? t->cs + (t0 + j) * 2 * dim : NULL;
#pragma GCC unroll 16
            for (int64_t c = 0; c < C; c++) {
                __m512 k = widen16_codes(src[j] + 16 * c, kind);
                if (cosr) {
                    k = _mm512_fmadd_ps(cb[c], _mm512_loadu_ps(cosr + dim + 16 * c), k);
                    k = _mm512_fmadd_ps(ca[c], _mm512_loadu_ps(cosr + 16 * c), k);
                    if (t->round_bf16) { /* as round_bf16x8 */
                        const __m512i bits = _mm512_castps_si512(k);
                        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
                        const __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
                        k = _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u)));
                    }
                }
#pragma GCC unroll 16
                for (int64_t g = 0; g < G; g++) s[g] = _mm512_fmadd_ps(qv[g * C + c], k, s[g]);
            }
#pragma GCC unroll 16
            for (int64_t g = 0; g < G; g++) part[g][j] = s[g];
        }
        for (int64_t j = m; j < 16; j++)
            for (int64_t g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++) _mm512_storeu_ps(t->sc + g * t->stride + (t0 - t->lo), sum16x16(part[g]));
    }
    float inv[DECODE_MAX_GROUP];
    softmax_rows(t->sc, G, n, t->stride, t->scale, inv, t->round_bf16);
    __m512 acc[DECODE_MAX_GROUP * DECODE_MAX_DIM / 16];
    for (int64_t i = 0; i < G * C; i++) acc[i] = _mm512_setzero_ps();
    walk = row_walk(t);
    for (int64_t t0 = t->lo; t0 < t->hi; t0 += 16) {
        const int64_t m = t->hi - t0 < 16 ? t->hi - t0 : 16;
        next_rows(t, t->v, &walk, m, src);
        const float *p = t->sc + (t0 - t->lo);
        for (int64_t j = 0; j < m; j++) {
            __m512 w[DECODE_MAX_GROUP];
#pragma GCC unroll 16
            for (int64_t g = 0; g < G; g++) w[g] = _mm512_set1_ps(p[g * t->stride + j]);
#pragma GCC unroll 16
            for (int64_t c = 0; c < C; c++) {
                const __m512 v = widen16_codes(src[j] + 16 * c, kind);
#pragma GCC unroll 16
                for (int64_t g = 0; g < G; g++) acc[g * C + c] = _mm512_fmadd_ps(w[g], v, acc[g * C + c]);
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const __m512 w = _mm512_set1_ps(inv[g] * t->unit);
        for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(t->out + g * dim + 16 * c, _mm512_mul_ps(acc[g * C + c], w));
    }
}

/* The shapes of the families people run (G = 4 or 8 query heads a KV head, head dim 64 or 128) and each code
 * kind as constants, so every inner loop unrolls and nothing is decided per element; anything else takes the
 * generic body. */
#define DECODE16_SHAPES(kind)                                                                                     \
    if (t->G == 4 && t->dim == 64)                                                                                \
        decode_task16_body(t, 4, 64, kind);                                                                       \
    else if (t->G == 8 && t->dim == 64)                                                                           \
        decode_task16_body(t, 8, 64, kind);                                                                       \
    else if (t->G == 4 && t->dim == 128)                                                                          \
        decode_task16_body(t, 4, 128, kind);                                                                      \
    else                                                                                                          \
        decode_task16_body(t, t->G, t->dim, kind);

AVX512 static void decode_task16(const DecodeTask *t) {
    if (t->kind == KV_FP8) {
        DECODE16_SHAPES(KV_FP8)
    } else {
        DECODE16_SHAPES(KV_INT8)
    }
}
#undef DECODE16_SHAPES

/* Decode attention (one query a sequence) read straight from a paged cache of 8-bit codes or of bf16 / fp32 values
 * (`kind`), with no widened copy of the context: for sequence b and KV head h, its G = H / kv query heads' scores
 * against keys lo..hi-1 (lo = qpos + 1 - window where a sliding window applies, hi = min(qpos + 1, ctx_len)),
 * softmax, and the values' weighted sum, all in fp32.
 * q [B, H, dim] fp32 is in code units (K's scale folded in by the caller); `scale` is the softmax scale; out
 * [B, H, dim] fp32 is in V's code units (the caller applies V's scale). table [B, N] block indices, a key at
 * position t in slot table[t / bs] * bs + t % bs of [slots, kv, dim] caches. cs / coef: a centred K, as in
 * lowbit_kv_gather. Returns -1, writing nothing, if a block index it would read is outside the cache; -2 if the
 * shape or kind is not one it takes (dim % 8, dim <= 256, H % kv, G <= 16); -3 if memory for the scores ran out. */
int64_t lowbit_kv_decode(const float *q, int64_t B, int64_t H, int64_t kv, int64_t dim, const uint8_t *k_cache,
                         const uint8_t *v_cache, int64_t cache_blocks, int64_t bs, int kind, const int64_t *table,
                         int64_t N, const int64_t *qpos, const int64_t *ctx_len, int64_t window, float scale,
                         const float *cs, const float *coef, int round_bf16, float *out) {
    if (dim % 8 || dim > DECODE_MAX_DIM || kv <= 0 || H % kv || H / kv > DECODE_MAX_GROUP || kind < KV_FP8 ||
        kind > KV_F32)
        return -2;
    for (int64_t b = 0; b < B; b++) {
        const int64_t hi = qpos[b] + 1 < ctx_len[b] ? qpos[b] + 1 : ctx_len[b];
        if (hi > N * bs) return -1;
        for (int64_t j = 0; j < (hi + bs - 1) / bs; j++)
            if (table[b * N + j] < 0 || table[b * N + j] >= cache_blocks) return -1;
    }
    const int64_t G = H / kv;
    const int64_t width = kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1; /* bytes a value */
    const int wide = dim % 16 == 0 && width == 1 && lowbit_kv_use_wide();
    const float unit = kind == KV_FP8 ? 256.f : 1.f; /* an E4M3 code reads as its value times 2^-8 */
    int64_t failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if (B * kv > 1)
    for (int64_t task = 0; task < B * kv; task++) {
        const int64_t b = task / kv, h = task % kv;
        int64_t hi = qpos[b] + 1 < ctx_len[b] ? qpos[b] + 1 : ctx_len[b];
        const int64_t lo = window > 0 && qpos[b] + 1 - window > 0 ? qpos[b] + 1 - window : 0; /* as the SDPA mask */
        if (hi < lo) hi = lo;
        float *o = out + (b * H + h * G) * dim;
        if (hi == lo) {
            for (int64_t i = 0; i < G * dim; i++) o[i] = 0.f;
            continue;
        }
        const int64_t stride = (hi - lo + 15) & ~(int64_t)15;
        float *sc = malloc(sizeof(float) * G * stride);
        if (!sc) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float qs[DECODE_MAX_GROUP * DECODE_MAX_DIM] __attribute__((aligned(64)));
        float ca[DECODE_MAX_DIM], cb[DECODE_MAX_DIM];
        for (int64_t i = 0; i < G * dim; i++) qs[i] = q[(b * H + h * G) * dim + i] * unit; /* exact: a power of 2 */
        if (cs)
            for (int64_t d = 0; d < dim; d++)
                ca[d] = coef[h * dim + d] / unit, cb[d] = coef[(kv + h) * dim + d] / unit;
        const DecodeTask t = {.q = qs, .tab = table + b * N, .k = k_cache + h * dim * width,
                              .v = v_cache + h * dim * width, .bs = bs, .row_stride = kv * dim * width, .lo = lo,
                              .hi = hi, .G = G, .dim = dim, .kind = kind, .cs = cs, .a = cs ? ca : NULL, .b = cs ? cb : NULL, .unit = unit,
                              .round_bf16 = round_bf16, .scale = scale, .sc = sc, .stride = stride, .out = o};
        if (wide)
            decode_task16(&t);
        else
            decode_task8(&t);
        free(sc);
    }
    return failed ? -3 : 0;
}
