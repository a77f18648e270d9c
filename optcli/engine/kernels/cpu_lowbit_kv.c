/* The 8-bit KV cache's read on CPU (engine/attention/cpu.py): a sequence group's cache blocks gathered and
 * widened to the attention's dtype (bf16 or fp32) in one pass, bit for bit what torch's cast gives.
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

#include "cpu_lowbit.h"

enum { KV_FP8 = 1, KV_INT8 = 2 }; /* as cpu_lowbit_float.c's W_FP8 / W_INT8 */

/* bf16 bits of the 7 E4M3 subnormals m * 2^-9 (m = 0..7), split in low and high bytes for pshufb. */
static const uint16_t FP8_SUB[8] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};

INLINE uint16_t fp8_bf16_scalar(uint8_t c, uint16_t nan_bits, int nan_signed) {
    const uint16_t mag = c & 0x7F, sign = (uint16_t)(c & 0x80) << 8;
    if (mag == 0x7F) return nan_signed ? (uint16_t)(sign | nan_bits) : nan_bits;
    return sign | (mag < 8 ? FP8_SUB[mag] : (uint16_t)((mag << 4) + 0x3C00));
}

/* 16 E4M3 codes -> 16 bf16 bit patterns (NaN as `nan`, with the code's sign where `nan_signed`). */
INLINE __m256i fp8_bf16x16(const uint8_t *p, __m256i nan, int nan_signed) {
    const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi16(0x7F));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8);
    const __m256i normal = _mm256_add_epi16(_mm256_slli_epi16(mag, 4), _mm256_set1_epi16(0x3C00));
    /* pshufb: each lane's low byte indexes the table (mag & 15; only mag < 8 is kept), its high byte 0x80 -> 0 */
    const __m256i lo_t = _mm256_setr_epi8(0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x20, 0x40, 0x60, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x20, 0x40, 0x60, 0, 0, 0,
                                          0, 0, 0, 0, 0);
    const __m256i hi_t = _mm256_setr_epi8(0x00, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0, 0, 0, 0, 0, 0x00,
                                          0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i ctrl = _mm256_or_si256(mag, _mm256_set1_epi16((short)0x8000));
    const __m256i sub = _mm256_or_si256(_mm256_shuffle_epi8(lo_t, ctrl), _mm256_slli_epi16(_mm256_shuffle_epi8(hi_t, ctrl), 8));
    const __m256i is_sub = _mm256_cmpgt_epi16(_mm256_set1_epi16(8), mag);
    __m256i bits = _mm256_or_si256(_mm256_blendv_epi8(normal, sub, is_sub), sign);
    const __m256i is_nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));
    return _mm256_blendv_epi8(bits, nan_signed ? _mm256_or_si256(nan, sign) : nan, is_nan);
}

/* 16 int8 -> 16 bf16 bit patterns (through fp32: exact, then the top halves packed in order). */
INLINE __m256i i8_bf16x16(const int8_t *p) {
    const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                            _mm_loadl_epi64((const __m128i *)p)))), 16);
    const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                            _mm_loadl_epi64((const __m128i *)(p + 8))))), 16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

/* n codes of one block -> bf16 (out16) or fp32 (out32, when out16 is NULL). */
INLINE void widen_block(const uint8_t *src, int64_t n, int kind, uint16_t *out16, float *out32) {
    /* fp32 NaN: sign | 0x7FF00000, i.e. the 16-bit pattern sign | 0x7FF0 shifted up */
    const __m256i nan = _mm256_set1_epi16(out16 ? 0x7FC0 : 0x7FF0);
    const int nan_signed = out16 == NULL;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        if (kind == KV_INT8 && out32) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(src + i));
            _mm256_storeu_ps(out32 + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
            _mm256_storeu_ps(out32 + i + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
            continue;
        }
        const __m256i h = kind == KV_FP8 ? fp8_bf16x16(src + i, nan, nan_signed) : i8_bf16x16((const int8_t *)src + i);
        if (out16) {
            _mm256_storeu_si256((__m256i *)(out16 + i), h);
        } else {
            _mm256_storeu_si256((__m256i *)(out32 + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
            _mm256_storeu_si256((__m256i *)(out32 + i + 8),
                                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
        }
    }
    for (; i < n; i++) {
        if (kind == KV_INT8) {
            const float f = (float)((const int8_t *)src)[i];
            if (out16) {
                uint32_t bits;
                __builtin_memcpy(&bits, &f, 4);
                out16[i] = (uint16_t)(bits >> 16);
            } else {
                out32[i] = f;
            }
            continue;
        }
        const uint16_t h = fp8_bf16_scalar(src[i], out16 ? 0x7FC0 : 0x7FF0, nan_signed);
        if (out16) {
            out16[i] = h;
        } else {
            const uint32_t bits = (uint32_t)h << 16;
            __builtin_memcpy(out32 + i, &bits, 4);
        }
    }
}

/* out[j] = widened cache[blocks[j]] for j < nblocks; a block is block_elems one-byte codes. out_fp32: float
 * output, else bf16. */
void lowbit_kv_gather(const uint8_t *cache, int64_t block_elems, const int64_t *blocks, int64_t nblocks, int kind,
                      int out_fp32, void *out) {
#pragma omp parallel for schedule(dynamic, chunk_of(nblocks, 4)) if (nblocks * block_elems >= (1 << 16))
    for (int64_t j = 0; j < nblocks; j++) {
        const uint8_t *src = cache + blocks[j] * block_elems;
        if (out_fp32)
            widen_block(src, block_elems, kind, NULL, (float *)out + j * block_elems);
        else
            widen_block(src, block_elems, kind, (uint16_t *)out + j * block_elems, NULL);
    }
}
