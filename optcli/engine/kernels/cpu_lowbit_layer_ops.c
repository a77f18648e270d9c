/* The decoder layer's non-GEMM ops for fp32 activations on CPU (engine/models/layer_ops.py `CpuOps`, called by
 * cpu_layer_ops.py): the residual add with RMSNorm, RoPE on q and k in place, SiLU(gate) * up. Each is one foreign
 * call where torch runs 4-9 ops of a few microseconds each: at batch 1 on the 1B shape the three took ~2 ms of a
 * 41 ms decode step as torch ops (28, 55 and 16 us a call), ~0.2 ms here. The math is TorchOps', op for op, in fp32;
 * only the order of RMSNorm's sum of squares differs (eight lanes, then across them). Rows are split across
 * threads only where a step has enough of them for a parallel region to pay. */

#include <math.h>

#include "cpu_lowbit.h"

#define PARALLEL_FROM (1 << 16) /* elements: below this one thread does the whole op */

/* out[t] = x[t] + res[t] (kept in sum[t] when res is given), then out = (h * rsqrt(mean(h^2) + eps)) * w. */
void lowbit_rms_norm(const float *x, const float *res, int64_t T, int64_t H, const float *w, float eps, float *sum,
                     float *out) {
#pragma omp parallel for schedule(dynamic, chunk_of(T, 1)) if (T * H >= PARALLEL_FROM)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        float *hr = (float *)xr;
        if (res) {
            hr = sum + t * H;
            const float *rr = res + t * H;
            int64_t d = 0;
            for (; d + 8 <= H; d += 8)
                _mm256_storeu_ps(hr + d, _mm256_add_ps(_mm256_loadu_ps(xr + d), _mm256_loadu_ps(rr + d)));
            for (; d < H; d++) hr[d] = xr[d] + rr[d];
        }
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= H; d += 8) {
            const __m256 v = _mm256_loadu_ps(hr + d);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum_ps(acc);
        for (; d < H; d++) ss += hr[d] * hr[d];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        const __m256 rv = _mm256_set1_ps(r);
        float *o = out + t * H;
        for (d = 0; d + 8 <= H; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(hr + d), rv), _mm256_loadu_ps(w + d)));
        for (; d < H; d++) o[d] = (hr[d] * r) * w[d];
    }
}

/* RoPE in the half-split layout, in place on `heads` rows of `dim` at x + t * stride + h * dim (q's, then k's):
 * (x1, x2) -> (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), cos / sin [T, dim]. Products rounded before the sum, as
 * torch's x * cos + rotate_half(x) * sin (no fused multiply-add: an FMA rounds once and moves results by an ulp). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
static void rope_rows(float *x, int64_t stride, int64_t heads, int64_t t, int64_t dim, const float *cos,
                      const float *sin) {
    const int64_t half = dim / 2;
    const float *c = cos + t * dim, *s = sin + t * dim;
    for (int64_t h = 0; h < heads; h++) {
        float *a = x + t * stride + h * dim, *b = a + half;
        int64_t d = 0;
        for (; d + 8 <= half; d += 8) {
            const __m256 x1 = _mm256_loadu_ps(a + d), x2 = _mm256_loadu_ps(b + d);
            const __m256 p1 = _mm256_mul_ps(x1, _mm256_loadu_ps(c + d)), q1 = _mm256_mul_ps(x2, _mm256_loadu_ps(s + d));
            const __m256 p2 = _mm256_mul_ps(x2, _mm256_loadu_ps(c + half + d));
            const __m256 q2 = _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + d));
            _mm256_storeu_ps(a + d, _mm256_sub_ps(p1, q1));
            _mm256_storeu_ps(b + d, _mm256_add_ps(p2, q2));
        }
        for (; d < half; d++) {
            const float x1 = a[d], x2 = b[d];
            const float p1 = x1 * c[d], q1 = x2 * s[d], p2 = x2 * c[half + d], q2 = x1 * s[half + d];
            a[d] = p1 - q1;
            b[d] = p2 + q2;
        }
    }
}
#pragma GCC pop_options

void lowbit_rope(float *q, int64_t q_stride, int64_t q_heads, float *k, int64_t k_stride, int64_t k_heads, int64_t T,
                 int64_t dim, const float *cos, const float *sin) {
#pragma omp parallel for schedule(dynamic, chunk_of(T, 1)) if (T * (q_heads + k_heads) * dim >= PARALLEL_FROM)
    for (int64_t t = 0; t < T; t++) {
        rope_rows(q, q_stride, q_heads, t, dim, cos, sin);
        rope_rows(k, k_stride, k_heads, t, dim, cos, sin);
    }
}

/* out[t] = silu(gate) * up, gate_up[t] = (gate | up), each I wide: silu(g) = g / (1 + e^-g), written with e = e^-|g|
 * (never overflows) as g / (1 + e) for g >= 0 and g * e / (1 + e) below. */
void lowbit_silu_mul(const float *gate_up, int64_t T, int64_t I, float *out) {
#pragma omp parallel for schedule(dynamic, chunk_of(T, 1)) if (T * I >= PARALLEL_FROM)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
        int64_t d = 0;
        for (; d + 8 <= I; d += 8) {
            const __m256 gv = _mm256_loadu_ps(g + d);
            const __m256 e = exp_ps(_mm256_or_ps(gv, sign)); /* e^-|g| */
            const __m256 num = _mm256_blendv_ps(gv, _mm256_mul_ps(gv, e), gv); /* sign bit set: g * e */
            const __m256 silu = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + d, _mm256_mul_ps(silu, _mm256_loadu_ps(u + d)));
        }
        for (; d < I; d++) {
            const float e = expf(-fabsf(g[d]));
            o[d] = (g[d] >= 0 ? g[d] / (1.f + e) : g[d] * e / (1.f + e)) * u[d];
        }
    }
}
