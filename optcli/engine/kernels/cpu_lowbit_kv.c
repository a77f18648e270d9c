/* The 8-bit KV cache's read and store on CPU (engine/attention/cpu.py, kv_quant.py; called by cpu_kv8.py): a
 * sequence group's cache blocks gathered and widened to the attention's dtype (bf16 or fp32) in one pass, bit for
 * bit what torch's cast gives; and a step's K/V rows quantized into their slots, code for code kv_rounding.py.
 *
 * Why: torch widens float8_e4m3fn with scalar code, ~4.5x the time of its int8 widening (1 thread, 16.7M
 * elements: 64 ms against 14), which made an FP8 cache's batch-1 decode slower than a bf16 cache's. Here the
 * gather (torch's index_select) and the widening are one read of the 8-bit blocks and one write, so an 8-bit
 * cache moves fewer bytes than a bf16 one's gather alone.
 *
 * E4M3 -> bf16 in 16-bit integer lanes: a normal code (exponent field e > 0) is the same sign, exponent
 * rebiased by 127 - 7 = 120 and the 3 mantissa bits moved up 4: ((code & 0x7F) << 4) + (120 << 7). The seven
 * subnormals m * 2^-9 are bf16 normals: a 16-entry byte table (pshufb). 0x7F / 0xFF are NaN: torch gives bf16
 * 0x7FC0 for both (the sign dropped) and fp32 sign | 0x7FF00000, reproduced here. int8 widens through fp32 (every
 * int8 value is exact in bf16). */

#include <math.h>

#include "cpu_lowbit.h"


/* bf16 bits of the 7 E4M3 subnormals m * 2^-9 (m = 0..7), split in low and high bytes for pshufb. */
static const uint16_t FP8_SUB[8] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};

INLINE uint16_t fp8_bf16_scalar(uint8_t c, uint16_t nan_bits, int nan_signed) {
    const uint16_t mag = c & 0x7F, sign = (uint16_t)(c & 0x80) << 8;
    if (mag == 0x7F) return nan_signed ? (uint16_t)(sign | nan_bits) : nan_bits;
    return sign | (mag < 8 ? FP8_SUB[mag] : (uint16_t)((mag << 4) + 0x3C00));
}

/* 32 E4M3 codes -> their bf16 bit patterns as high and low bytes, in 8-bit lanes (NaN as nan_hi:nan_lo; the
 * code's sign ORed into nan_hi where `nan_signed`). A normal code's high byte is 0x3C + (mag >> 4) and its low
 * byte (mag << 4) & 0xF0 (the 16-bit form above, split); subnormals from the byte tables by pshufb. */
INLINE void fp8_bf16x32(const uint8_t *p, __m256i nan_hi, __m256i nan_lo, int nan_signed, __m256i *hi, __m256i *lo) {
    const __m256i lo_t = _mm256_setr_epi8(0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x20, 0x40, 0x60, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x20, 0x40, 0x60, 0, 0, 0,
                                          0, 0, 0, 0, 0);
    const __m256i hi_t = _mm256_setr_epi8(0x00, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0, 0, 0, 0, 0, 0x00,
                                          0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i c = _mm256_loadu_si256((const __m256i *)p);
    const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi8(0x7F));
    const __m256i sign = _mm256_and_si256(c, _mm256_set1_epi8((char)0x80));
    const __m256i h_norm = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(mag, 4), _mm256_set1_epi8(0x0F)),
                                           _mm256_set1_epi8(0x3C));
    const __m256i l_norm = _mm256_and_si256(_mm256_slli_epi16(mag, 4), _mm256_set1_epi8((char)0xF0));
    const __m256i is_sub = _mm256_cmpgt_epi8(_mm256_set1_epi8(8), mag); /* mag <= 127: a signed compare is right */
    const __m256i is_nan = _mm256_cmpeq_epi8(mag, _mm256_set1_epi8(0x7F));
    const __m256i h = _mm256_or_si256(_mm256_blendv_epi8(h_norm, _mm256_shuffle_epi8(hi_t, mag), is_sub), sign);
    const __m256i l = _mm256_blendv_epi8(l_norm, _mm256_shuffle_epi8(lo_t, mag), is_sub);
    *hi = _mm256_blendv_epi8(h, nan_signed ? _mm256_or_si256(nan_hi, sign) : nan_hi, is_nan);
    *lo = _mm256_blendv_epi8(l, nan_lo, is_nan);
}

/* 16 int8 -> 16 bf16 bit patterns (through fp32: exact, then the top halves packed in order). */
INLINE __m256i i8_bf16x16(const int8_t *p) {
    const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                            _mm_loadl_epi64((const __m128i *)p)))), 16);
    const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                            _mm_loadl_epi64((const __m128i *)(p + 8))))), 16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

INLINE void fp8_scalar_tail(const uint8_t *src, int64_t i, int64_t n, uint16_t *out16, float *out32) {
    for (; i < n; i++) {
        const uint16_t h = fp8_bf16_scalar(src[i], out16 ? 0x7FC0 : 0x7FF0, out16 == NULL);
        if (out16) {
            out16[i] = h;
        } else {
            const uint32_t bits = (uint32_t)h << 16;
            __builtin_memcpy(out32 + i, &bits, 4);
        }
    }
}

/* n E4M3 codes -> bf16 (out16) or fp32 (out32, when out16 is NULL; fp32 NaN: sign | 0x7FF00000). */
static void fp8_block(const uint8_t *src, int64_t n, uint16_t *out16, float *out32) {
    const __m256i nan_hi = _mm256_set1_epi8(0x7F), nan_lo = _mm256_set1_epi8(out16 ? (char)0xC0 : (char)0xF0);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i hi, lo;
        fp8_bf16x32(src + i, nan_hi, nan_lo, out16 == NULL, &hi, &lo);
        const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi); /* codes 0-7|16-23, 8-15|24-31 */
        const __m256i w0 = _mm256_permute2x128_si256(a, b, 0x20), w1 = _mm256_permute2x128_si256(a, b, 0x31);
        if (out16) {
            _mm256_storeu_si256((__m256i *)(out16 + i), w0);
            _mm256_storeu_si256((__m256i *)(out16 + i + 16), w1);
        } else {
            const __m256i *w[2] = {&w0, &w1};
            for (int k = 0; k < 2; k++) {
                float *o = out32 + i + 16 * k;
                _mm256_storeu_si256((__m256i *)o, _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(*w[k])), 16));
                _mm256_storeu_si256((__m256i *)(o + 8),
                                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(*w[k], 1)), 16));
            }
        }
    }
    fp8_scalar_tail(src, i, n, out16, out32);
}

/* n int8 codes -> bf16 (out16) or fp32 (out32, when out16 is NULL). */
static void int8_block(const int8_t *src, int64_t n, uint16_t *out16, float *out32) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        if (out16) {
            _mm256_storeu_si256((__m256i *)(out16 + i), i8_bf16x16(src + i));
        } else {
            const __m128i b = _mm_loadu_si128((const __m128i *)(src + i));
            _mm256_storeu_ps(out32 + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
            _mm256_storeu_ps(out32 + i + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
        }
    }
    for (; i < n; i++) {
        const float f = (float)src[i];
        if (out16) {
            uint32_t bits;
            __builtin_memcpy(&bits, &f, 4);
            out16[i] = (uint16_t)(bits >> 16);
        } else {
            out32[i] = f;
        }
    }
}

/* A centred K (engine/attention/kv_centre.py): rope_p(c) / scale added back to the widened codes of each key,
 * computed here from the layer's coefficients (a, b) [KV, D] and the shared cos|sin rows [positions, 2D] (fp32)
 * rather than read from a per-layer table (as many bytes as one sequence's bf16 K: at batch 1 it ate the memory
 * the 8-bit cache saves). out = fma(a, cos, fma(b, sin, code)) in fp32, rounded to nearest even to bf16; an int8
 * code is widened in the same step. Not bit for bit the torch fallback (two roundings fewer): within an ulp. */
INLINE __m128i f32x8_bf16(__m256 v) { /* NaN stays NaN: a quiet NaN's payload is above the rounding bits */
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

INLINE uint16_t f32_bf16(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* One block (bs rows of kv x dim) whose first row is key position p0: int8 codes `i8` (or, when NULL, the block
 * already widened in place in o16 / o32), written back widened with the centre added. */
static void add_centre(const int8_t *i8, uint16_t *o16, float *o32, int64_t bs, int64_t kv, int64_t dim, int64_t p0,
                       const float *cs, const float *a, const float *b) {
    for (int64_t r = 0; r < bs; r++) {
        const float *cos = cs + (p0 + r) * 2 * dim, *sin = cos + dim;
        for (int64_t h = 0; h < kv; h++) {
            const int64_t at = (r * kv + h) * dim;
            const float *ah = a + h * dim, *bh = b + h * dim;
            int64_t d = 0;
            for (; d + 8 <= dim; d += 8) {
                __m256 k;
                if (i8)
                    k = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(i8 + at + d))));
                else if (o16)
                    k = _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(o16 + at + d))), 16));
                else
                    k = _mm256_loadu_ps(o32 + at + d);
                k = _mm256_fmadd_ps(_mm256_loadu_ps(bh + d), _mm256_loadu_ps(sin + d), k);
                k = _mm256_fmadd_ps(_mm256_loadu_ps(ah + d), _mm256_loadu_ps(cos + d), k);
                if (o16)
                    _mm_storeu_si128((__m128i *)(o16 + at + d), f32x8_bf16(k));
                else
                    _mm256_storeu_ps(o32 + at + d, k);
            }
            for (; d < dim; d++) {
                float k;
                if (i8) {
                    k = (float)i8[at + d];
                } else if (o16) {
                    const uint32_t bits = (uint32_t)o16[at + d] << 16;
                    __builtin_memcpy(&k, &bits, 4);
                } else {
                    k = o32[at + d];
                }
                k = fmaf(ah[d], cos[d], fmaf(bh[d], sin[d], k));
                if (o16)
                    o16[at + d] = f32_bf16(k);
                else
                    o32[at + d] = k;
            }
        }
    }
}

/* add_centre for bf16 output on AVX-512 (16 lanes), where the CPU has it (this file is built for AVX2): the same
 * two fused multiply-adds in the same order and the same rounding to bf16, so bit for bit add_centre's result, in
 * half the instructions. The correction costs two FMAs and four loads per cached K element, which at 2k context
 * made a centred cache's batch-1 decode 1-3% slower than the uncentred one (kv_centre.py). dim % 16 == 0. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
AVX512 static void add_centre16(const int8_t *i8, uint16_t *o16, int64_t bs, int64_t kv, int64_t dim, int64_t p0,
                                const float *cs, const float *a, const float *b) {
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    for (int64_t r = 0; r < bs; r++) {
        const float *cos = cs + (p0 + r) * 2 * dim, *sin = cos + dim;
        for (int64_t h = 0; h < kv; h++) {
            const int64_t at = (r * kv + h) * dim;
            const float *ah = a + h * dim, *bh = b + h * dim;
            for (int64_t d = 0; d < dim; d += 16) {
                __m512 k = i8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(i8 + at + d))))
                              : _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(o16 + at + d))), 16));
                k = _mm512_fmadd_ps(_mm512_loadu_ps(bh + d), _mm512_loadu_ps(sin + d), k);
                k = _mm512_fmadd_ps(_mm512_loadu_ps(ah + d), _mm512_loadu_ps(cos + d), k);
                const __m512i bits = _mm512_castps_si512(k);
                const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
                const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, half), odd), 16);
                _mm256_storeu_si256((__m256i *)(o16 + at + d), _mm512_cvtepi32_epi16(rounded));
            }
        }
    }
}

/* Whether the AVX-512 forms run (add_centre16 here, the decode kernel's in cpu_lowbit_kv_decode.c): the CPU's
 * flags, unless a test turned them off (lowbit_kv_wide). */
static int kv_wide = -1;

void lowbit_kv_wide(int on) { kv_wide = on; }

int lowbit_kv_use_wide(void) {
    if (kv_wide < 0) {
        __builtin_cpu_init();
        kv_wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl");
    }
    return kv_wide;
}

/* out[j] = widened cache[blocks[j]] for j < nblocks; a block is block_elems one-byte codes and the cache holds
 * cache_blocks of them. out_fp32: float output, else bf16. `cs` (or NULL): a centred K's read (add_centre above),
 * with coef = (a, b) [2, kv, dim] and the blocks [sequences, per_seq] in order, so block j's first key position
 * is (j % per_seq) * (block_elems / (kv * dim)). Returns -1, writing nothing, if a block index is outside the
 * cache (checked here: a Python-side min/max cost more than this whole call on a small model). */
int64_t lowbit_kv_gather(const uint8_t *cache, int64_t block_elems, int64_t cache_blocks, const int64_t *blocks,
                         int64_t nblocks, int kind, int out_fp32, void *out, const float *cs, const float *coef,
                         int64_t per_seq, int64_t kv, int64_t dim) {
    for (int64_t j = 0; j < nblocks; j++)
        if (blocks[j] < 0 || blocks[j] >= cache_blocks) return -1;
    const int64_t bs = cs ? block_elems / (kv * dim) : 0;
    const int wide = cs && !out_fp32 && dim % 16 == 0 && lowbit_kv_use_wide();
#pragma omp parallel for schedule(dynamic, chunk_of(nblocks, 4)) if (nblocks * block_elems >= (1 << 16))
    for (int64_t j = 0; j < nblocks; j++) {
        const uint8_t *src = cache + blocks[j] * block_elems;
        uint16_t *o16 = out_fp32 ? NULL : (uint16_t *)out + j * block_elems;
        float *o32 = out_fp32 ? (float *)out + j * block_elems : NULL;
        const int8_t *codes = cs && kind != KV_FP8 ? (const int8_t *)src : NULL; /* int8: widened and corrected at once */
        if (!codes) {
            if (kind == KV_FP8)
                fp8_block(src, block_elems, o16, o32);
            else
                int8_block((const int8_t *)src, block_elems, o16, o32);
        }
        if (cs && wide)
            add_centre16(codes, o16, bs, kv, dim, (j % per_seq) * bs, cs, coef, coef + kv * dim);
        else if (cs)
            add_centre(codes, o16, o32, bs, kv, dim, (j % per_seq) * bs, cs, coef, coef + kv * dim);
    }
    return 0;
}

/* ---------------------------------------------------------------- the store ------------------------------------ */

/* fp32 -> E4M3 (saturating, round to nearest even): torch's own scalar conversion (c10's
 * fp8e4m3fn_from_fp32_value, torch 2.13), step for step, so the codes are the ones `.to(float8_e4m3fn)` gives. */
INLINE uint8_t fp8_from_f32(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    const uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    uint8_t result;
    if (bits >= (1087u << 20)) {
        result = bits > 0x7F800000u ? 0x7F : 0x7E;
    } else if (bits < (121u << 23)) { /* below 2^-6: a subnormal, rounded by an fp32 add at the 2^-9 grid */
        const uint32_t denorm = 141u << 23;
        float a, d;
        __builtin_memcpy(&a, &bits, 4);
        __builtin_memcpy(&d, &denorm, 4);
        a += d;
        __builtin_memcpy(&bits, &a, 4);
        result = (uint8_t)(bits - denorm);
    } else {
        const uint32_t odd = (bits >> 20) & 1;
        bits += ((uint32_t)(7 - 127) << 23) + 0x7FFFF + odd;
        result = (uint8_t)(bits >> 20);
        if (result == 0x7F) result = 0x7E;
    }
    return result | (uint8_t)(sign >> 24);
}

/* x [T, row] (bf16 where x_bf16, else fp32) quantized with scale [row] into cache rows slots[t] (of row codes;
 * the cache holds cache_slots rows): kv_rounding.quantize step for step (x / scale, a 0 scale read as 1, clamped
 * to +-qmax; int8 rounded half away from zero). Returns -1, writing nothing, if a slot is outside the cache. */
int64_t lowbit_kv_store(const void *x, int x_bf16, int64_t T, int64_t row, const float *scale, const int64_t *slots,
                        int64_t cache_slots, int kind, uint8_t *cache) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= cache_slots) return -1;
    const float qmax = kind == KV_FP8 ? 448.f : 127.f;
#pragma omp parallel for schedule(dynamic, chunk_of(T, 16)) if (T * row >= (1 << 16))
    for (int64_t t = 0; t < T; t++) {
        uint8_t *dst = cache + slots[t] * row;
        for (int64_t i = 0; i < row; i++) {
            float v;
            if (x_bf16) {
                const uint32_t bits = (uint32_t)((const uint16_t *)x)[t * row + i] << 16;
                __builtin_memcpy(&v, &bits, 4);
            } else {
                v = ((const float *)x)[t * row + i];
            }
            float y = v / (scale[i] > 0.f ? scale[i] : 1.f);
            y = y < -qmax ? -qmax : (y > qmax ? qmax : y); /* NaN stays NaN, as torch's clamp */
            if (kind == KV_FP8) {
                dst[i] = fp8_from_f32(y);
            } else {
                const float sg = (float)((y > 0.f) - (y < 0.f));
                dst[i] = (uint8_t)(int8_t)truncf(y + 0.5f * sg);
            }
        }
    }
    return 0;
}
