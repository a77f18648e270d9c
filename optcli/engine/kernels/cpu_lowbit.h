/* What the two AVX2 kernel files (cpu_lowbit.c: integer kernels, cpu_lowbit_float.c: float kernels on
 * bf16 / E4M3 / int8-held weights) share: tile sizes, prefetch distances, horizontal sums. */
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>

/* Work split: dynamic chunks, about 8 per thread and at least `min` items each. A thread the OS deschedules
 * for a moment (another process on its core) then holds up only its current chunk while the others take the
 * rest; a static split made every parallel region wait for its whole share (engine/kernels/cpu_threads.py). */
static inline int64_t chunk_of(int64_t n, int64_t min) {
    int64_t c = n / (8 * (int64_t)omp_get_max_threads());
    return c > min ? c : min;
}

#define MT 64  /* activation rows per tile */
/* Software prefetch distances (bytes ahead in a thread's weight stream). At one row every kernel here
 * is a weight read, and on the project's Zen 2 the hardware prefetcher alone left the q4 GEMV at 23
 * GB/s against 33 for a plain read; 768 bytes ahead measured 29-32 (512-1024 within noise), and the
 * one-row-at-a-time q8 GEMV 29.8 at 1024 against 24.8 at 2048 (lines arriving too early are evicted). */
#define Q4_PREFETCH 768
#define ROW_PREFETCH 1024

#define INLINE static inline __attribute__((always_inline))

/* e^x for x <= 0 (a softmax's scores after the max is taken off; SiLU's e^-|g|), 8 lanes: Cephes' expf
 * (x = n ln2 + r, a degree-6 polynomial in r, 2^n put into the exponent field), within 2 ulp of expf; below -87.3
 * it returns 0 (2^-126 and less, as a score 87 below the max is to a softmax). */
INLINE __m256 exp_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}

/* The 8 x 8 transpose of the panel GEMMs' packing (cpu_lowbit_float.c's fp32 weights, cpu_lowbit_q8.c's int16
 * pairs as 32-bit lanes): r[i] lane j -> o[j * 16 + i], 8 aligned stores at a stride of 16 floats, in registers
 * (unpack / shuffle / lane permute). */
INLINE void transpose8_store16(const __m256 r[8], float *o) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_store_ps(o + 0 * 16, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_store_ps(o + 1 * 16, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_store_ps(o + 2 * 16, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_store_ps(o + 3 * 16, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_store_ps(o + 4 * 16, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_store_ps(o + 5 * 16, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_store_ps(o + 6 * 16, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_store_ps(o + 7 * 16, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* One-byte values widened exactly to fp32, 8 at a time: the float GEMMs' weights (cpu_lowbit_float.c) and the 8-bit
 * KV cache's codes (cpu_lowbit_kv_decode.c). E4M3 reads as its value times 2^-8: the byte moved into fp16 bits as
 * s 0 eeee mmm 0000000 (exponent biases 7 and 15; E4M3 subnormals land on fp16 subnormals, which vcvtph2ps
 * converts exactly); callers multiply by 256 where it matters, exactly. E4M3's NaN (0x7F, 0xFF) reads as 480. */
INLINE __m256 fp8_load8(const uint8_t *p) {
    const __m128i b = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8);
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(b, 1), _mm_set1_epi16((short)0xBFFF)));
}

INLINE __m256 i8_load8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The 8-bit KV cache's code kinds (as cpu_lowbit_float.c's W_FP8 / W_INT8), shared by its store and gather
 * (cpu_lowbit_kv.c) and its decode attention (cpu_lowbit_kv_decode.c); and whether their AVX-512 forms run.
 * KV_BF16 / KV_F32: a cache in the activations' own dtype, which only the decode attention reads. */
enum { KV_FP8 = 1, KV_INT8 = 2, KV_BF16 = 3, KV_F32 = 4 };
int lowbit_kv_use_wide(void);
