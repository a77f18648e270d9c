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

#define NC 4   /* weight columns (output features) per block */
#define MT 64  /* activation rows per tile */
/* Software prefetch distances (bytes ahead in a thread's weight stream). At one row every kernel here
 * is a weight read, and on the project's Zen 2 the hardware prefetcher alone left the q4 GEMV at 23
 * GB/s against 33 for a plain read; 768 bytes ahead measured 29-32 (512-1024 within noise), and the
 * one-row-at-a-time q8 GEMV 29.8 at 1024 against 24.8 at 2048 (lines arriving too early are evicted). */
#define Q4_PREFETCH 768
#define ROW_PREFETCH 1024

#define INLINE static inline __attribute__((always_inline))

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

/* The 8-bit KV cache's code kinds (as cpu_lowbit_float.c's W_FP8 / W_INT8), shared by its store and gather
 * (cpu_lowbit_kv.c) and its decode attention (cpu_lowbit_kv_decode.c); and whether their AVX-512 forms run. */
enum { KV_FP8 = 1, KV_INT8 = 2 };
int lowbit_kv_use_wide(void);
