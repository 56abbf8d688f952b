/*
 * CPU kernels that read GGML weight blocks as stored (no widened copy), and a fused decode step.
 *
 * Weights: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K rows exactly as the GGUF holds them
 * (a view of the memory-mapped file; layouts: ggml-common.h block_q4_0 ... block_q6_K, and the
 * reference kernels/dequant.py).  Activations are quantized per row in groups of 32 to int8 with a
 * float32 scale (ggml's Q8_0 idea, eg_q8 below, with the group's two half sums kept for the offset
 * terms), so every product is an integer dot product of 32 weight codes with 32 int8 activations:
 *
 *   y[m][r] = sum_g dx[m][g] * (a0 * D0 + a1 * D1 + b0 * S0 + b1 * S1)
 *
 * with, per 32-group g of row r, the unsigned weight codes c, D_h = sum of c * xq over half h
 * (16 elements), S_h = sum of xq over half h, and the group's half scales a_h / offsets b_h read
 * from the block (w = a_h * c + b_h; Q6_K has one scale per 16, so a0 != a1 only there).  Q8_0's
 * signed codes take the sign trick instead (|w| * sign(w) x) with b = 0.
 *
 * The oracle is kernels/ggml_cpu_ref.py: the same activation quantization in numpy, the
 * reference dequantization, a float64 matmul (tests/test_ggml_cpu.py prints the error).
 *
 * ISAs: an AVX-512 VNNI build (256-bit dpbusd), an AVX2 build (maddubs + madd) and portable C,
 * compiled side by side with target attributes and chosen at load time (eg_init, CPU features;
 * EDGEINFER_ISA=scalar|avx2|vnni narrows the choice for tests).  On ARM the portable C is used
 * (auto-vectorised by the compiler; no hand-written NEON here).
 *
 * Threads: a small pthread pool (spin, then sleep) splits each product over rows; every entry
 * point takes the thread count to use.  Calls are serialised by a mutex (ctypes releases the GIL).
 *
 * Built as a (method-less) Python extension so that setuptools compiles it with the package; the
 * functions are loaded with ctypes by kernels/ggml_cpu.py.  Define EG_NO_PYTHON to build a plain
 * shared library (the first-use build there).
 */
#ifndef EG_NO_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EG_X86 1
#else
#define EG_X86 0
#endif

#define EG_API __attribute__((visibility("default")))

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

/* One group of 32 quantized activations: x ~ d * q. */
typedef struct {
    float d, ds0, ds1;  /* scale; d * (sum of q[0..15]), d * (sum of q[16..31]) */
    int8_t q[32];
} eg_q8;

/* One super-block of 256 quantized activations for the K types (ggml's Q8_K idea): x ~ d * q,
 * bsums[i] = sum of q[16 i .. 16 i + 15] (for the K types' mins / Q6_K's -32 offset). */
typedef struct {
    float d;
    int16_t bsums[16];
    int8_t q[256];
} eg_q8k;

/* One weight matrix [n, k] of GGML blocks (row r at data + r * row_bytes). */
typedef struct {
    const uint8_t *data;
    int64_t row_bytes;
    int32_t type, n, k;
} eg_mat;

EG_API int eg_version(void) { return 3; }

/* ------------------------------------------------------------------------------ scalar helpers */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int e = -1;
            do { ++e; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* Q4_K/Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* float rows (F32 / F16: plain float dot products against float32 activations) have no blocks */
static inline int is_float(int type) { return type == T_F32 || type == T_F16; }
static inline int block_elems(int type) { return is_float(type) ? 1 : type >= T_Q4_K ? 256 : 32; }

static inline int type_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    }
    return 0;
}

/* Group g (32 weights) of a row: unsigned codes c[32] and w = a_h * c + b_h per half h.
 * Q8_0 returns signed codes in c (as uint8 bit patterns) with a = d, b = 0. */
static inline void group_scalar(int type, const uint8_t *row, int g, uint8_t *c, float *a0, float *a1,
                                float *b0, float *b1) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: {
        const uint8_t *b = row + (int64_t)g * (type == T_Q4_0 ? 18 : 20);
        float d = rd_f16(b);
        const uint8_t *qs = b + (type == T_Q4_0 ? 2 : 4);
        for (int i = 0; i < 16; ++i) { c[i] = qs[i] & 15; c[i + 16] = qs[i] >> 4; }
        *a0 = *a1 = d;
        *b0 = *b1 = type == T_Q4_0 ? -8.f * d : rd_f16(b + 2);
        return;
    }
    case T_Q5_0: case T_Q5_1: {
        const uint8_t *b = row + (int64_t)g * (type == T_Q5_0 ? 22 : 24);
        float d = rd_f16(b);
        const uint8_t *qhp = b + (type == T_Q5_0 ? 2 : 4), *qs = qhp + 4;
        uint32_t qh;
        memcpy(&qh, qhp, 4);
        for (int i = 0; i < 16; ++i) {
            c[i] = (qs[i] & 15) | (((qh >> i) & 1) << 4);
            c[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
        }
        *a0 = *a1 = d;
        *b0 = *b1 = type == T_Q5_0 ? -16.f * d : rd_f16(b + 2);
        return;
    }
    case T_Q8_0: {
        const uint8_t *b = row + (int64_t)g * 34;
        memcpy(c, b + 2, 32);
        *a0 = *a1 = rd_f16(b);
        *b0 = *b1 = 0.f;
        return;
    }
    case T_Q4_K: case T_Q5_K: {
        const uint8_t *b = row + (int64_t)(g >> 3) * (type == T_Q4_K ? 144 : 176);
        int j = g & 7, sc, m;
        scale_min_k4(j, b + 4, &sc, &m);
        const uint8_t *qs = b + (type == T_Q4_K ? 16 : 48) + 32 * (j >> 1);
        int sh = 4 * (j & 1);
        for (int i = 0; i < 32; ++i) c[i] = (qs[i] >> sh) & 15;
        if (type == T_Q5_K) {
            const uint8_t *qh = b + 16;
            for (int i = 0; i < 32; ++i) c[i] |= ((qh[i] >> j) & 1) << 4;
        }
        *a0 = *a1 = rd_f16(b) * (float)sc;
        *b0 = *b1 = -rd_f16(b + 2) * (float)m;
        return;
    }
    case T_Q6_K: {
        const uint8_t *b = row + (int64_t)(g >> 3) * 210;
        int j = g & 7, n = j >> 2, r = j & 3;
        const uint8_t *ql = b + 64 * n + 32 * (r & 1), *qh = b + 128 + 32 * n;
        const int8_t *sc = (const int8_t *)(b + 192) + 8 * n + 2 * r;
        int sl = 4 * (r >> 1), sh = 2 * r;
        for (int i = 0; i < 32; ++i) c[i] = ((ql[i] >> sl) & 15) | (((qh[i] >> sh) & 3) << 4);
        float d = rd_f16(b + 208);
        *a0 = d * (float)sc[0];
        *a1 = d * (float)sc[1];
        *b0 = -32.f * *a0;
        *b1 = -32.f * *a1;
        return;
    }
    }
}

/* ------------------------------------------------------------------------ activation quantization */

/* The activation buffers of a product (sized by xbuf_for, used under call_mu): the int8 groups, and
 * per group its scale d (xd_buf) and d * (sum of its codes) (xs_buf) side by side in group order, so
 * the kernels load 8 groups' scales as one vector. */
static eg_q8 *xq_buf;
static float *xd_buf, *xs_buf;

/* x [M][K] float -> xq [M][K/32]: d = max|x| / 127, q = nearest-even(x / d) (the reference's rounding). */
static void quantize_rows(const float *x, int64_t M, int K, int64_t ldx, eg_q8 *xq, float *xd, float *xs) {
    int ng = K / 32;
    for (int64_t m = 0; m < M; ++m) {
        const float *xr = x + m * ldx;
        for (int g = 0; g < ng; ++g) {
            const float *v = xr + 32 * g;
            float amax = 0.f;
            for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(v[i]));
            eg_q8 *o = xq + m * ng + g;
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int s0 = 0, s1 = 0;
            for (int i = 0; i < 32; ++i) {
                int q = (int)nearbyintf(v[i] * id);
                o->q[i] = (int8_t)q;
                if (i < 16) s0 += q; else s1 += q;
            }
            o->d = d;
            o->ds0 = d * (float)s0;
            o->ds1 = d * (float)s1;
            if (xd) {
                xd[m * ng + g] = d;
                xs[m * ng + g] = o->ds0 + o->ds1;
            }
        }
    }
}

/* x [M][K] float -> xk [M][K/256]: the same rounding per 256 values (one scale per super-block). */
static void quantize_rows_k(const float *x, int64_t M, int K, int64_t ldx, eg_q8k *xk) {
    int nb = K / 256;
    for (int64_t m = 0; m < M; ++m) {
        const float *xr = x + m * ldx;
        for (int b = 0; b < nb; ++b) {
            const float *v = xr + 256 * b;
            float amax = 0.f;
            for (int i = 0; i < 256; ++i) amax = fmaxf(amax, fabsf(v[i]));
            eg_q8k *o = xk + m * nb + b;
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            for (int i = 0; i < 16; ++i) {
                int s = 0;
                for (int l = 0; l < 16; ++l) {
                    int q = (int)nearbyintf(v[16 * i + l] * id);
                    o->q[16 * i + l] = (int8_t)q;
                    s += q;
                }
                o->bsums[i] = (int16_t)s;
            }
            o->d = d;
        }
    }
}

/* K-type super-block: codes c[256] (unsigned), integer scale per 16 values sc[16], integer offset
 * per 16 mn[16], and the float factors: w = d * sc * c - dm * mn (Q4_K/Q5_K: mn = the sub-block's
 * min, dm = dmin; Q6_K: mn = 32 * sc, dm = d). */
static inline void kblock_scalar(int type, const uint8_t *b, uint8_t *c, int *sc, int *mn, float *d, float *dm) {
    uint8_t g[32];
    float a0, a1, b0, b1;
    for (int j = 0; j < 8; ++j) {
        group_scalar(type, b, j, g, &a0, &a1, &b0, &b1); /* j < 8: within block b */
        memcpy(c + 32 * j, g, 32);
    }
    if (type == T_Q6_K) {
        const int8_t *s = (const int8_t *)(b + 192);
        *d = *dm = rd_f16(b + 208);
        for (int i = 0; i < 16; ++i) { sc[i] = s[i]; mn[i] = 32 * s[i]; }
    } else {
        *d = rd_f16(b);
        *dm = rd_f16(b + 2);
        for (int j = 0; j < 8; ++j) {
            int s, m;
            scale_min_k4(j, b + 4, &s, &m);
            sc[2 * j] = sc[2 * j + 1] = s;
            mn[2 * j] = mn[2 * j + 1] = m;
        }
    }
}

/* -------------------------------------------------------------------------------- the kernels */

#define MT 4 /* activation rows per pass over a weight row */

typedef void (*rows_fn)(const eg_mat *w, const eg_q8 *xq, int M, float *y, int64_t ldy, int r0, int r1);
typedef void (*rows_k_fn)(const eg_mat *w, const eg_q8k *xk, int M, float *y, int64_t ldy, int r0, int r1);

static void rows_scalar(const eg_mat *w, const eg_q8 *xq, int M, float *y, int64_t ldy, int r0, int r1) {
    int ng = w->k / 32;
    uint8_t c[32];
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        for (int m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? M - m0 : MT;
            float acc[MT] = {0};
            for (int g = 0; g < ng; ++g) {
                float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;
                group_scalar(w->type, row, g, c, &a0, &a1, &b0, &b1);
                for (int t = 0; t < mt; ++t) {
                    const eg_q8 *xb = xq + (int64_t)(m0 + t) * ng + g;
                    int32_t d0 = 0, d1 = 0;
                    if (w->type == T_Q8_0) {
                        for (int i = 0; i < 16; ++i) d0 += (int8_t)c[i] * xb->q[i];
                        for (int i = 16; i < 32; ++i) d1 += (int8_t)c[i] * xb->q[i];
                    } else {
                        for (int i = 0; i < 16; ++i) d0 += c[i] * xb->q[i];
                        for (int i = 16; i < 32; ++i) d1 += c[i] * xb->q[i];
                    }
                    acc[t] += xb->d * (a0 * (float)d0 + a1 * (float)d1) + b0 * xb->ds0 + b1 * xb->ds1;
                }
            }
            for (int t = 0; t < mt; ++t) y[(int64_t)(m0 + t) * ldy + r] = acc[t];
        }
    }
}

/* The K types against Q8_K-style activations: per super-block and activation row, two integer
 * sums (sum sc * c . q, sum mn * bsums) and one float step. */
static void rows_k_scalar(const eg_mat *w, const eg_q8k *xk, int M, float *y, int64_t ldy, int r0, int r1) {
    int nb = w->k / 256, bsz = type_bytes(w->type);
    uint8_t c[256];
    int sc[16], mn[16];
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        for (int m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? M - m0 : MT;
            float acc[MT] = {0};
            for (int ib = 0; ib < nb; ++ib) {
                float d, dm;
                kblock_scalar(w->type, row + (int64_t)ib * bsz, c, sc, mn, &d, &dm);
                for (int t = 0; t < mt; ++t) {
                    const eg_q8k *xb = xk + (int64_t)(m0 + t) * nb + ib;
                    int32_t is = 0, ms = 0;
                    for (int i = 0; i < 16; ++i) {
                        int32_t p = 0;
                        for (int l = 0; l < 16; ++l) p += c[16 * i + l] * xb->q[16 * i + l];
                        is += sc[i] * p;
                        ms += mn[i] * xb->bsums[i];
                    }
                    acc[t] += xb->d * (d * (float)is - dm * (float)ms);
                }
            }
            for (int t = 0; t < mt; ++t) y[(int64_t)(m0 + t) * ldy + r] = acc[t];
        }
    }
}

/* F32 / F16 weight rows against float32 activations x [M][ldx]: plain float dot products. */
typedef void (*rows_f_fn)(const eg_mat *w, const float *x, int M, int64_t ldx, float *y, int64_t ldy, int r0, int r1);

static inline float wf_at(const eg_mat *w, const uint8_t *row, int i) {
    if (w->type == T_F32) {
        float v;
        memcpy(&v, row + 4 * (int64_t)i, 4);
        return v;
    }
    return rd_f16(row + 2 * (int64_t)i);
}

static void rows_f_scalar(const eg_mat *w, const float *x, int M, int64_t ldx, float *y, int64_t ldy, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        for (int m = 0; m < M; ++m) {
            const float *xm = x + (int64_t)m * ldx;
            float acc[8] = {0};
            int i = 0;
            for (; i + 8 <= w->k; i += 8)
                for (int l = 0; l < 8; ++l) acc[l] += wf_at(w, row, i + l) * xm[i + l];
            float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; i < w->k; ++i) s += wf_at(w, row, i) * xm[i];
            y[(int64_t)m * ldy + r] = s;
        }
    }
}

static float dotf_scalar(const float *a, const float *b, int n) {
    float d = 0.f;
    for (int i = 0; i < n; ++i) d += a[i] * b[i];
    return d;
}

static void axpyf_scalar(float *o, const float *v, float p, int n) {
    for (int i = 0; i < n; ++i) o[i] += p * v[i];
}

static inline uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

static void dequant_scalar(const eg_mat *w, int r0, int r1, void *out, int bf16) {
    uint8_t c[32];
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        int64_t o = (int64_t)(r - r0) * w->k;
        for (int g = 0; g < w->k / 32; ++g) {
            float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;
            group_scalar(w->type, row, g, c, &a0, &a1, &b0, &b1);
            for (int i = 0; i < 32; ++i) {
                float v = w->type == T_Q8_0 ? (float)(int8_t)c[i] : (float)c[i];
                float y = i < 16 ? a0 * v + b0 : a1 * v + b1;
                if (bf16) ((uint16_t *)out)[o + 32 * g + i] = to_bf16(y);
                else ((float *)out)[o + 32 * g + i] = y;
            }
        }
    }
}

typedef void (*dequant_fn)(const eg_mat *w, int r0, int r1, void *out, int bf16);

#if EG_X86
/* u8 x s8 -> 8 x int32 sums of 4 products (the int16 pairs of maddubs cannot saturate: codes <= 63,
 * or |w| <= 128 against |x| <= 127 with the sign trick) */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define SFX avx2
#define DOT(c, x) _mm256_madd_epi16(_mm256_maddubs_epi16((c), (x)), _mm256_set1_epi16(1))
#define MADD16(acc, p, s) _mm256_add_epi32((acc), _mm256_madd_epi16((p), (s)))
#include "_ggmlcpu_simd.h"
#undef DOT
#undef MADD16
#undef SFX
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#endif
#define SFX vnni
#define DOT(c, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (c), (x))
#define MADD16(acc, p, s) _mm256_dpwssd_epi32((acc), (p), (s))
#include "_ggmlcpu_simd.h"
#undef DOT
#undef MADD16
#undef SFX
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

/* ------------------------------------------------------------------------------- thread pool */

#define EG_MAX_THREADS 256
/* pause iterations a worker spins for the next job before it sleeps (~50 us: the gaps between the
 * products of one decode step are shorter, those between torch ops of a forward often longer) */
#ifndef EG_SPIN
#define EG_SPIN 2000
#endif

typedef void (*task_fn)(void *ctx, int ith, int nth);

static struct {
    pthread_t th[EG_MAX_THREADS];
    int born[EG_MAX_THREADS + 1]; /* per worker: the generation current when it was started */
    int n;                       /* workers started (thread 0 is the caller) */
    atomic_int gen, pending, sleeping;
    task_fn fn;
    void *ctx;
    int nth;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#if EG_X86
    _mm_pause();
#else
    sched_yield();
#endif
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; /* 1 .. */
    int seen = P.born[id];       /* the generation before the first job it must run */
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&P.gen, memory_order_acquire) == seen && spins < EG_SPIN) {
            cpu_relax();
            ++spins;
        }
        if (atomic_load_explicit(&P.gen, memory_order_acquire) == seen) {
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleeping, 1);
            while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleeping, 1);
            pthread_mutex_unlock(&P.mu);
        }
        seen = atomic_load(&P.gen);
        if (id < P.nth) P.fn(P.ctx, id, P.nth);
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start afresh there. */
static void pool_after_fork(void) {
    P.n = 0;
    atomic_store(&P.sleeping, 0);
    atomic_store(&P.pending, 0);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    pthread_mutex_init(&call_mu, NULL);
}

/* fn(ctx, i, nth) for i in 0..nth-1, i = 0 on the calling thread. */
static void run(task_fn fn, void *ctx, int nth) {
    if (nth > EG_MAX_THREADS) nth = EG_MAX_THREADS;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    while (P.n < nth - 1) {
        P.born[P.n + 1] = atomic_load(&P.gen);
        if (pthread_create(&P.th[P.n], NULL, worker, (void *)(intptr_t)(P.n + 1)) != 0) break;
        pthread_detach(P.th[P.n]);
        ++P.n;
    }
    if (nth > P.n + 1) nth = P.n + 1;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.nth = nth;
    atomic_store(&P.pending, P.n);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    if (atomic_load(&P.sleeping) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    fn(ctx, 0, nth);
    for (int spins = 0; atomic_load_explicit(&P.pending, memory_order_acquire) > 0; ++spins) {
        if (spins < EG_SPIN) cpu_relax();
        else sched_yield(); /* a worker was descheduled (a busy machine): let it run */
    }
}

/* --------------------------------------------------------------------------- dispatch / gemm */

static rows_fn ROWS = rows_scalar;
static rows_k_fn ROWS_K = rows_k_scalar;
static rows_f_fn ROWS_F = rows_f_scalar;
static float (*DOTF)(const float *, const float *, int) = dotf_scalar;     /* the fused step's attention */
static void (*AXPYF)(float *, const float *, float, int) = axpyf_scalar;
static dequant_fn DEQUANT = dequant_scalar;
static const char *ISA = "scalar";

/* Pick the kernels for this CPU; want: NULL/"" (best), "scalar", "avx2" or "vnni" (capped at what the CPU has). */
EG_API const char *eg_init(const char *want) {
    static int forked_handler = 0;
    if (!forked_handler) forked_handler = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    int lvl = 0; /* 0 scalar, 1 avx2, 2 vnni */
#if EG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) lvl = 1;
    if (lvl == 1 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
        lvl = 2;
#endif
    if (want && *want) {
        int w = !strcmp(want, "scalar") ? 0 : !strcmp(want, "avx2") ? 1 : 2;
        if (w < lvl) lvl = w;
    }
    ROWS = rows_scalar;
    ROWS_K = rows_k_scalar;
    ROWS_F = rows_f_scalar;
    DOTF = dotf_scalar;
    AXPYF = axpyf_scalar;
    DEQUANT = dequant_scalar;
    ISA = "scalar";
#if EG_X86
    if (lvl >= 1) ROWS_F = rows_f_avx2, DOTF = dotf_avx2, AXPYF = axpyf_avx2; /* floats: AVX2 + FMA on both */
    if (lvl == 1) { ROWS = rows_avx2; ROWS_K = rows_k_avx2; DEQUANT = dequant_avx2; ISA = "avx2"; }
    if (lvl == 2) { ROWS = rows_vnni; ROWS_K = rows_k_vnni; DEQUANT = dequant_vnni; ISA = "avx512-vnni"; }
#endif
    return ISA;
}

EG_API int eg_supports(int type) {
    switch (type) {
    case T_F32: case T_F16:
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_Q4_K: case T_Q5_K: case T_Q6_K:
        return block_elems(type);
    }
    return 0;
}

typedef struct {
    const eg_mat *mats;
    int nmat;
    const eg_q8 *xq;
    const eg_q8k *xk;
    const float *xf;  /* the float activations (float rows read them) */
    int64_t ldx;
    int M;
    int per_mat;      /* 1: matrix i reads activation row i alone (M = 1 each; the experts' down projections) */
    float *y;
    int64_t ldy;
    int64_t total; /* rows of all mats */
} gemm_job;

static void gemm_task(void *vctx, int ith, int nth) {
    gemm_job *j = (gemm_job *)vctx;
    /* rows in chunks of 4 so threads never share a cache line of y at M == 1 */
    int64_t chunks = (j->total + 3) / 4;
    int64_t c0 = chunks * ith / nth, c1 = chunks * (ith + 1) / nth;
    int64_t g0 = c0 * 4, g1 = c1 * 4 < j->total ? c1 * 4 : j->total;
    int64_t base = 0, col = 0;
    for (int i = 0; i < j->nmat && g0 < g1; ++i) {
        const eg_mat *w = &j->mats[i];
        int64_t lo = g0 - base, hi = g1 - base;
        if (lo < w->n && hi > 0) {
            int a = lo < 0 ? 0 : (int)lo, b = hi > w->n ? w->n : (int)hi, M = j->M;
            const eg_q8 *xq = j->xq;
            const eg_q8k *xk = j->xk;
            const float *xf = j->xf;
            if (j->per_mat) {
                M = 1;
                xq += (int64_t)i * (w->k / 32);
                xk += (int64_t)i * (w->k / 256);
                xf += (int64_t)i * j->ldx;
            }
            if (is_float(w->type)) ROWS_F(w, xf, M, j->ldx, j->y + col, j->ldy, a, b);
            else if (block_elems(w->type) == 256) ROWS_K(w, xk, M, j->y + col, j->ldy, a, b);
            else ROWS(w, xq, M, j->y + col, j->ldy, a, b);
        }
        base += w->n;
        col += w->n;
    }
}

static eg_q8k *xk_buf;
static int64_t xq_cap, xk_cap;

/* Buffers for M rows of k activations: per 32 (xq_buf) and per 256 (xk_buf). 0, or -1 out of memory. */
static int xbuf_for(int64_t M, int k) {
    int64_t g = M * (k / 32), b = M * (k / 256);
    if (g > xq_cap) {
        free(xq_buf);
        free(xd_buf);
        free(xs_buf);
        xq_buf = (eg_q8 *)malloc(sizeof(eg_q8) * g);
        xd_buf = (float *)malloc(sizeof(float) * g);
        xs_buf = (float *)malloc(sizeof(float) * g);
        if (!xq_buf || !xd_buf || !xs_buf) {
            free(xq_buf), free(xd_buf), free(xs_buf);
            xq_buf = NULL, xd_buf = xs_buf = NULL;
        }
        xq_cap = xq_buf ? g : 0;
    }
    if (b > xk_cap) {
        free(xk_buf);
        xk_buf = (eg_q8k *)malloc(sizeof(eg_q8k) * b);
        xk_cap = xk_buf ? b : 0;
    }
    return (g && !xq_buf) || (b && !xk_buf) ? -1 : 0;
}

/* y = x @ W_i^T for mats (same k): x quantized the way each type wants it (per 32 for the 32-value
 * types, per 256 for the K types; only what is needed), then the rows split over threads.
 * The caller holds call_mu and has sized the buffers (xbuf_for). */
static void gemm_xm(const eg_mat *mats, int nmat, const float *x, int M, int64_t ldx, float *y, int64_t ldy, int nth,
                    int per_mat) {
    int k = mats[0].k, want32 = 0, want256 = 0;
    for (int i = 0; i < nmat; ++i) {
        if (is_float(mats[i].type)) continue;
        if (block_elems(mats[i].type) == 256) want256 = 1;
        else want32 = 1;
    }
    if (want32) quantize_rows(x, M, k, ldx, xq_buf, xd_buf, xs_buf);
    if (want256) quantize_rows_k(x, M, k, ldx, xk_buf);
    gemm_job j = {mats, nmat, xq_buf, xk_buf, x, ldx, M, per_mat, y, ldy, 0};
    for (int i = 0; i < nmat; ++i) j.total += mats[i].n;
    if (j.total * k < 32768) nth = 1; /* too small to split */
    run(gemm_task, &j, nth);
}

static void gemm_x(const eg_mat *mats, int nmat, const float *x, int M, int64_t ldx, float *y, int64_t ldy, int nth) {
    gemm_xm(mats, nmat, x, M, ldx, y, ldy, nth, 0);
}

/* y[m][*] = x[m] @ W_i^T for the matrices mats[0..nmat-1] (same k), outputs side by side in y's
 * columns (row stride ldy >= sum of n). x: [M][k] float32 with row stride ldx. Returns 0, or -1
 * (unsupported type, k not whole blocks, out of memory). */
EG_API int eg_linear(const eg_mat *mats, int nmat, const float *x, int M, int64_t ldx, float *y, int64_t ldy,
                     int nth) {
    int k = mats[0].k;
    for (int i = 0; i < nmat; ++i)
        if (!eg_supports(mats[i].type) || mats[i].k != k || k % block_elems(mats[i].type)) return -1;
    pthread_mutex_lock(&call_mu);
    if (xbuf_for(M, k)) {
        pthread_mutex_unlock(&call_mu);
        return -1;
    }
    gemm_x(mats, nmat, x, M, ldx, y, ldy, nth);
    pthread_mutex_unlock(&call_mu);
    return 0;
}

typedef struct {
    const eg_mat *w;
    int r0, r1, bf16;
    void *out;
} deq_job;

static void deq_task(void *vctx, int ith, int nth) {
    deq_job *j = (deq_job *)vctx;
    int n = j->r1 - j->r0, a = j->r0 + n * ith / nth, b = j->r0 + n * (ith + 1) / nth;
    if (b > a && is_float(j->w->type)) {
        for (int r = a; r < b; ++r)
            for (int i = 0; i < j->w->k; ++i) {
                float v = wf_at(j->w, j->w->data + (int64_t)r * j->w->row_bytes, i);
                int64_t at = (int64_t)(r - j->r0) * j->w->k + i;
                if (j->bf16) ((uint16_t *)j->out)[at] = to_bf16(v);
                else ((float *)j->out)[at] = v;
            }
    } else if (b > a) DEQUANT(j->w, a, b, (char *)j->out + (int64_t)(a - j->r0) * j->w->k * (j->bf16 ? 2 : 4), j->bf16);
}

/* Rows r0..r1-1 of w dequantized to out [r1 - r0][k], float32 or (bf16 != 0) bfloat16: the
 * bounded chunks of the prefill path. */
EG_API int eg_dequant(const eg_mat *w, int r0, int r1, void *out, int bf16, int nth) {
    if (!eg_supports(w->type) || w->k % block_elems(w->type) || r0 < 0 || r1 > w->n || r0 > r1) return -1;
    deq_job j = {w, r0, r1, bf16, out};
    pthread_mutex_lock(&call_mu);
    run(deq_task, &j, (int64_t)(r1 - r0) * w->k < 65536 ? 1 : nth);
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* The activation quantization alone (for the reference tests). */
EG_API void eg_quantize(const float *x, int64_t M, int K, eg_q8 *xq) { quantize_rows(x, M, K, K, xq, NULL, NULL); }
EG_API void eg_quantize_k(const float *x, int64_t M, int K, eg_q8k *xk) { quantize_rows_k(x, M, K, K, xk); }

EG_API const char *eg_isa(void) { return ISA; }

#include "_ggmlcpu_step.h"

#ifndef EG_NO_PYTHON
/* A method-less module, so that the library can be built and installed as an extension. */
static struct PyModuleDef eg_module = {PyModuleDef_HEAD_INIT, "_ggmlcpu",
                                       "GGML-block CPU kernels (loaded with ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__ggmlcpu(void) { return PyModule_Create(&eg_module); }
#endif
