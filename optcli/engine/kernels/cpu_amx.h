/* What the AMX kernel files share (cpu_amx.c: int8 tiles for W4A16 / W8A8, cpu_amx_fp8.c: bf16 tiles for
 * FP8): the tile configuration and the panel grouping. */
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

#include <omp.h>

/* Work split: dynamic chunks, about 8 per thread and at least `min` items each. A thread the OS deschedules
 * for a moment (another process on its core) then holds up only its current chunk while the others take the
 * rest; a static split made every parallel region wait for its whole share (engine/kernels/cpu_threads.py). */
static inline int64_t chunk_of(int64_t n, int64_t min) {
    int64_t c = n / (8 * (int64_t)omp_get_max_threads());
    return c > min ? c : min;
}

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* C tiles 0..3 (rows r0 for 0/1, r1 for 2/3; 16 int32), A tiles 4, 5 (rows r0, r1; 64 int8), B tiles 6, 7. */
static inline void configure(int r0, int r1) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = (uint8_t)(rows[t] > 0 ? rows[t] : 1);
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Panels unpacked or widened per group (together within ~1 MiB of L2), so each 32-row block of the
 * activations, read once from memory, serves every panel of the group while it sits in L2. */
static inline int64_t panels_per_group(int64_t K, int64_t bytes_per_weight) {
    int64_t p = (1 << 20) / (K * 32 * bytes_per_weight);
    return p < 1 ? 1 : p > 8 ? 8 : p;
}
