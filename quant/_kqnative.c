/*
 * Per-group scale searches of the K-quant (and weighted legacy) encoders, compiled.
 *
 * Same contract as the numpy searches in quant/kquants_search.py, which derive each
 * search from ggml/src/ggml-quants.c and are this file's oracle in the tests; see that
 * module for the algorithm notes.  Here every group is searched in one pass of plain
 * scalar C: all arithmetic is float32, every sum runs in index order, no FMA contraction
 * (built with -ffp-contract=off, never -ffast-math), so the results are bit for bit those
 * of llama.cpp's reference quantizers.  edgeinfer.quant.kqnative loads this library with
 * ctypes (the calls release the GIL) and checks it against the numpy code before use.
 *
 * Layout: groups are rows of a C-contiguous float32 array x[ng][n] (n <= 256), so a
 * block tensor [nb][256] is simply viewed as [nb*256/n][n].  Levels are written as uint8
 * in the offset form the block packers use.
 *
 * The library is built as a (method-less) Python extension module only so that setuptools
 * compiles and installs it with the package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define EI_API __declspec(dllexport)
#else
#define EI_API __attribute__((visibility("default")))
#endif

/* The lane loops are compiled for several x86 vector widths, picked at load time (GCC/clang
 * ifunc on glibc); elsewhere (ARM has NEON as its baseline) the default build is used. */
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && defined(__GLIBC__)
#define EI_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EI_SIMD_CLONES
#endif

#define EI_MAX_N 256
#define EI_GROUP_MAX_EPS 1e-15f

/* Round to nearest, ties to even, by adding 1.5*2^23 and reading the mantissa bits: the
 * definition the reference quantizers use (valid for |v| < 2^22; outside that range the
 * same bit arithmetic is reproduced, as the stored values depend on it). */
static inline int ei_round(float v) {
    union { float f; int32_t i; } u;
    u.f = v + 12582912.f;
    return (u.i & 0x007fffff) - 0x00400000;
}

static inline int ei_clampi(int v, int lo, int hi) {
    v = v > lo ? v : lo;
    return v < hi ? v : hi;
}

/* Library version: bumped whenever a kernel's contract changes (checked by the loader). */
EI_API int ei_version(void) { return 2; }

/* out[g] = x[g][0] + x[g][1] + ... + x[g][n-1], in that order. */
EI_API void ei_rowsum(int64_t ng, int n, const float *x, float *out) {
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + g * n;
        float s = 0.f;
        for (int i = 0; i < n; ++i) s += xg[i];
        out[g] = s;
    }
}

/* Weights of the unweighted Q4_K/Q5_K search: w[g][i] = sqrtf(sum_i x^2 / n) + |x[g][i]|. */
EI_API void ei_weights_rms_abs(int64_t ng, int n, const float *x, float *w) {
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + g * n;
        float s = 0.f;
        for (int i = 0; i < n; ++i) s += xg[i] * xg[i];
        float av = sqrtf(s / (float)n);
        for (int i = 0; i < n; ++i) w[g * n + i] = av + fabsf(xg[i]);
    }
}

/* Final levels against the stored (already rounded) sub-block scales, per group g of n:
 * L = clamp(nearest_int((x + dm[g]) / d[g]), lo, hi) - lo, or x / d[g] when dm is NULL.
 * Groups with d[g] == 0 keep the levels already in L. */
EI_API void ei_requant(int64_t ng, int n, const float *x, const float *d, const float *dm,
                       int lo, int hi, uint8_t *L) {
    for (int64_t g = 0; g < ng; ++g) {
        if (d[g] == 0) continue;
        const float *xg = x + g * n;
        const float off = dm ? dm[g] : 0.f;
        for (int i = 0; i < n; ++i) {
            float v = dm ? (xg[i] + off) / d[g] : xg[i] / d[g];
            L[g * n + i] = (uint8_t)(ei_clampi(ei_round(v), lo, hi) - lo);
        }
    }
}

/* The two hot searches below process EI_LANES groups at a time: the tile is transposed so
 * that every loop's innermost index runs over groups (lanes).  Each lane keeps its own
 * sums, added in index order as in the scalar reference, so the compiler can put the lanes
 * in SIMD registers without reordering any sum (no -ffast-math needed); C's per-group
 * branches become per-lane selects.  A winning candidate is remembered by the (iscale, min)
 * its levels were made with, and the levels are rebuilt once at the end. */
#define EI_LANES 16

/* Load groups g0 .. g0+EI_LANES-1 of a [ng][n] array into tile[i][lane]; lanes past the
 * last group repeat group g0 (their results are discarded). */
static void ei_load_tile(const float *a, int64_t g0, int64_t ng, int n, float tile[][EI_LANES]) {
    for (int b = 0; b < EI_LANES; ++b) {
        const float *src = a + (g0 + b < ng ? g0 + b : g0) * n;
        for (int i = 0; i < n; ++i) tile[i][b] = src[i];
    }
}

/* Asymmetric scale + min search (make_qkx2/qkx3 with explicit weights) for every group.
 * scale[g], the_min[g] (= -min, >= 0) and levels L[g][i] in 0..nmax. */
EI_API EI_SIMD_CLONES void ei_make_qkx(int64_t ng, int n, int nmax, const float *x, const float *w,
                        float rmin, float rdelta, int nstep, int use_mad,
                        float *scale_out, float *the_min_out, uint8_t *L_out) {
    float X[EI_MAX_N][EI_LANES], W[EI_MAX_N][EI_LANES], LA[EI_MAX_N][EI_LANES];   /* 48 KiB of stack */
    const float fnmax = (float)nmax;
    for (int64_t g0 = 0; g0 < ng; g0 += EI_LANES) {
        ei_load_tile(x, g0, ng, n, X);
        ei_load_tile(w, g0, ng, n, W);
        float mn[EI_LANES], mx[EI_LANES], sum_w[EI_LANES], sum_x[EI_LANES], scale[EI_LANES],
              best[EI_LANES], win_is[EI_LANES], win_mn[EI_LANES];
        int flat[EI_LANES];
        for (int b = 0; b < EI_LANES; ++b) {
            mn[b] = mx[b] = X[0][b];
            sum_w[b] = W[0][b];
            sum_x[b] = W[0][b] * X[0][b];
        }
        for (int i = 1; i < n; ++i)
            for (int b = 0; b < EI_LANES; ++b) {
                mn[b] = X[i][b] < mn[b] ? X[i][b] : mn[b];
                mx[b] = X[i][b] > mx[b] ? X[i][b] : mx[b];
                sum_w[b] += W[i][b];
                sum_x[b] += W[i][b] * X[i][b];
            }
        for (int b = 0; b < EI_LANES; ++b) {
            if (mn[b] > 0) mn[b] = 0;
            flat[b] = !(mx[b] > mn[b]);       /* one value: zero scale, L = 0 */
            float is = fnmax / (flat[b] ? 1.f : mx[b] - mn[b]);
            win_is[b] = is;
            win_mn[b] = mn[b];
            scale[b] = 1.f / is;
            best[b] = 0.f;
        }
        for (int i = 0; i < n; ++i)
            for (int b = 0; b < EI_LANES; ++b) {
                int l = ei_clampi(ei_round(win_is[b] * (X[i][b] - mn[b])), 0, nmax);
                float d = scale[b] * (float)l + mn[b] - X[i][b];
                d = use_mad ? fabsf(d) : d * d;
                best[b] += W[i][b] * d;
            }
        for (int step = 0; step <= nstep; ++step) {
            const float num = rmin + rdelta * (float)step + fnmax;
            float is[EI_LANES], s_l[EI_LANES], s_l2[EI_LANES], s_xl[EI_LANES], err[EI_LANES],
                  t_scale[EI_LANES], t_min[EI_LANES], D[EI_LANES];
            for (int b = 0; b < EI_LANES; ++b) {
                is[b] = num / (mx[b] - mn[b]);
                s_l[b] = s_l2[b] = s_xl[b] = err[b] = 0.f;
            }
            for (int i = 0; i < n; ++i)
                for (int b = 0; b < EI_LANES; ++b) {
                    float l = (float)ei_clampi(ei_round(is[b] * (X[i][b] - mn[b])), 0, nmax);
                    float wl = W[i][b] * l;
                    LA[i][b] = l;
                    s_l[b] += wl;
                    s_l2[b] += wl * l;
                    s_xl[b] += wl * X[i][b];
                }
            for (int b = 0; b < EI_LANES; ++b) {
                D[b] = sum_w[b] * s_l2[b] - s_l[b] * s_l[b];
                float ts = (sum_w[b] * s_xl[b] - sum_x[b] * s_l[b]) / D[b];
                float tm = (s_l2[b] * sum_x[b] - s_l[b] * s_xl[b]) / D[b];
                float ts0 = s_xl[b] / s_l2[b];   /* the scale when the min is pinned to 0 */
                int pos = tm > 0;
                t_scale[b] = pos ? ts0 : ts;
                t_min[b] = pos ? 0.f : tm;
            }
            if (use_mad) {
                for (int i = 0; i < n; ++i)
                    for (int b = 0; b < EI_LANES; ++b)
                        err[b] += W[i][b] * fabsf(t_scale[b] * LA[i][b] + t_min[b] - X[i][b]);
            } else {
                for (int i = 0; i < n; ++i)
                    for (int b = 0; b < EI_LANES; ++b) {
                        float d = t_scale[b] * LA[i][b] + t_min[b] - X[i][b];
                        err[b] += W[i][b] * (d * d);
                    }
            }
            for (int b = 0; b < EI_LANES; ++b) {
                int upd = !flat[b] & (D[b] > 0) & (err[b] < best[b]);
                best[b] = upd ? err[b] : best[b];
                scale[b] = upd ? t_scale[b] : scale[b];
                win_is[b] = upd ? is[b] : win_is[b];
                win_mn[b] = upd ? mn[b] : win_mn[b];
                mn[b] = upd ? t_min[b] : mn[b];
            }
        }
        for (int b = 0; b < EI_LANES && g0 + b < ng; ++b) {
            uint8_t *L = L_out + (g0 + b) * n;
            for (int i = 0; i < n; ++i)
                L[i] = flat[b] ? 0 : (uint8_t)ei_clampi(ei_round(win_is[b] * (X[i][b] - win_mn[b])), 0, nmax);
            scale_out[g0 + b] = flat[b] ? 0.f : scale[b];
            the_min_out[g0 + b] = -mn[b];
        }
    }
}

/* Symmetric search with weights (make_qx_quants, rmse_type 1): levels L in 0..2*nmax-1. */
EI_API EI_SIMD_CLONES void ei_make_qx(int64_t ng, int n, int nmax, const float *x, const float *w,
                       float *scale_out, uint8_t *L_out) {
    float X[EI_MAX_N][EI_LANES], W[EI_MAX_N][EI_LANES];
    for (int64_t g0 = 0; g0 < ng; g0 += EI_LANES) {
        ei_load_tile(x, g0, ng, n, X);
        ei_load_tile(w, g0, ng, n, W);
        float amax[EI_LANES], vmax[EI_LANES], scale[EI_LANES], best[EI_LANES], win_is[EI_LANES],
              s_lx[EI_LANES], s_l2[EI_LANES];
        int zero[EI_LANES];
        for (int b = 0; b < EI_LANES; ++b) amax[b] = vmax[b] = 0.f;
        for (int i = 0; i < n; ++i)
            for (int b = 0; b < EI_LANES; ++b) {
                float a = fabsf(X[i][b]);
                int more = a > amax[b];
                vmax[b] = more ? X[i][b] : vmax[b];
                amax[b] = more ? a : amax[b];
            }
        for (int b = 0; b < EI_LANES; ++b) {
            zero[b] = amax[b] < EI_GROUP_MAX_EPS;
            vmax[b] = zero[b] ? 1.f : vmax[b];
            win_is[b] = (float)(-nmax) / vmax[b];
            s_lx[b] = s_l2[b] = 0.f;
        }
        for (int i = 0; i < n; ++i)
            for (int b = 0; b < EI_LANES; ++b) {
                float l = (float)ei_clampi(ei_round(win_is[b] * X[i][b]), -nmax, nmax - 1);
                s_lx[b] += W[i][b] * X[i][b] * l;
                s_l2[b] += W[i][b] * l * l;
            }
        for (int b = 0; b < EI_LANES; ++b) {
            scale[b] = s_l2[b] != 0 ? s_lx[b] / s_l2[b] : 0.f;
            best[b] = scale[b] * s_lx[b];
        }
        for (int step = -9; step <= 9; ++step) {
            if (step == 0) continue;
            const float num = (float)nmax + 0.1f * (float)step;
            float is[EI_LANES];
            for (int b = 0; b < EI_LANES; ++b) {
                is[b] = -num / vmax[b];
                s_lx[b] = s_l2[b] = 0.f;
            }
            for (int i = 0; i < n; ++i)
                for (int b = 0; b < EI_LANES; ++b) {
                    float l = (float)ei_clampi(ei_round(is[b] * X[i][b]), -nmax, nmax - 1);
                    s_lx[b] += W[i][b] * X[i][b] * l;
                    s_l2[b] += W[i][b] * l * l;
                }
            for (int b = 0; b < EI_LANES; ++b) {
                int upd = (s_l2[b] > 0) & (s_lx[b] * s_lx[b] > best[b] * s_l2[b]);
                float sc = s_lx[b] / s_l2[b];
                scale[b] = upd ? sc : scale[b];
                best[b] = upd ? sc * s_lx[b] : best[b];
                win_is[b] = upd ? is[b] : win_is[b];
            }
        }
        for (int b = 0; b < EI_LANES && g0 + b < ng; ++b) {
            uint8_t *L = L_out + (g0 + b) * n;
            for (int i = 0; i < n; ++i)
                L[i] = zero[b] ? 0 : (uint8_t)(ei_clampi(ei_round(win_is[b] * X[i][b]), -nmax, nmax - 1) + nmax);
            scale_out[g0 + b] = zero[b] ? 0.f : scale[b];
        }
    }
}

/* Symmetric search with greedy refinement, weights x*x (make_q3_quants, do_rmse):
 * levels L in 0..2*nmax-1. */
EI_API void ei_make_q3(int64_t ng, int n, int nmax, const float *x,
                       float *scale_out, uint8_t *L_out) {
    int l8[EI_MAX_N];
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + g * n;
        uint8_t *L = L_out + g * n;
        float amax = 0.f, vmax = 0.f;
        for (int i = 0; i < n; ++i) {
            float a = fabsf(xg[i]);
            if (a > amax) { amax = a; vmax = xg[i]; }
        }
        if (amax < EI_GROUP_MAX_EPS) {
            memset(L, 0, (size_t)n);
            scale_out[g] = 0.f;
            continue;
        }
        float iscale = (float)(-nmax) / vmax;
        float s_lx = 0.f, s_l2 = 0.f;
        for (int i = 0; i < n; ++i) {
            int l = ei_clampi(ei_round(iscale * xg[i]), -nmax, nmax - 1);
            l8[i] = l;
            float w = xg[i] * xg[i];
            s_lx += w * xg[i] * (float)l;
            s_l2 += w * (float)l * (float)l;
        }
        for (int pass = 0; pass < 5; ++pass) {
            int changed = 0;
            for (int i = 0; i < n; ++i) {
                float w = xg[i] * xg[i];
                float slx = s_lx - w * xg[i] * (float)l8[i];
                if (!(slx > 0)) continue;
                float sl2 = s_l2 - w * (float)l8[i] * (float)l8[i];
                int nl = ei_clampi(ei_round(xg[i] * sl2 / slx), -nmax, nmax - 1);
                if (nl == l8[i]) continue;
                slx += w * xg[i] * (float)nl;
                sl2 += w * (float)nl * (float)nl;
                if (sl2 > 0 && slx * slx * s_l2 > s_lx * s_lx * sl2) {
                    l8[i] = nl;
                    s_lx = slx;
                    s_l2 = sl2;
                    ++changed;
                }
            }
            if (!changed) break;
        }
        for (int i = 0; i < n; ++i) L[i] = (uint8_t)(l8[i] + nmax);
        scale_out[g] = s_l2 > 0.f ? s_lx / s_l2 : 0.f;
    }
}

/* Non-negative values, weighted (make_qp_quants): levels L as the uint8 stored (0..nmax
 * normally; the first guess is stored without a clamp, wrapping like a uint8). */
EI_API void ei_make_qp(int64_t ng, int n, int nmax, const float *x, const float *w,
                       float *scale_out, uint8_t *L_out) {
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + g * n, *wg = w + g * n;
        uint8_t *L = L_out + g * n;
        float vmax = 0.f;
        for (int i = 0; i < n; ++i) vmax = vmax > xg[i] ? vmax : xg[i];   /* MAX(vmax, x): x on ties */
        if (vmax < EI_GROUP_MAX_EPS) {
            memset(L, 0, (size_t)n);
            scale_out[g] = 0.f;
            continue;
        }
        float iscale = (float)nmax / vmax;
        for (int i = 0; i < n; ++i) L[i] = (uint8_t)ei_round(iscale * xg[i]);
        float scale = 1.f / iscale;
        float best = 0.f;
        for (int i = 0; i < n; ++i) {
            float d = xg[i] - scale * (float)L[i];
            best += wg[i] * d * d;
        }
        for (int step = -4; step <= 4; ++step) {
            if (step == 0) continue;
            float isc = (0.1f * (float)step + (float)nmax) / vmax;
            float sc = 1.f / isc;
            float mse = 0.f;
            for (int i = 0; i < n; ++i) {
                int l = ei_round(isc * xg[i]);
                if (l > nmax) l = nmax;
                float d = xg[i] - sc * (float)l;
                mse += wg[i] * d * d;
            }
            if (mse < best) {
                best = mse;
                iscale = isc;
            }
        }
        float s_lx = 0.f, s_l2 = 0.f;
        for (int i = 0; i < n; ++i) {
            int l = ei_round(iscale * xg[i]);
            if (l > nmax) l = nmax;
            L[i] = (uint8_t)l;
            s_lx += wg[i] * xg[i] * (float)l;
            s_l2 += wg[i] * (float)l * (float)l;
        }
        for (int pass = 0; pass < 5; ++pass) {
            int changed = 0;
            for (int i = 0; i < n; ++i) {
                float slx = s_lx - wg[i] * xg[i] * (float)L[i];
                float sl2 = s_l2 - wg[i] * (float)L[i] * (float)L[i];
                if (!(slx > 0 && sl2 > 0)) continue;
                int nl = ei_round(xg[i] * sl2 / slx);
                if (nl > nmax) nl = nmax;
                if (nl == (int)L[i]) continue;
                slx += wg[i] * xg[i] * (float)nl;
                sl2 += wg[i] * (float)nl * (float)nl;
                if (slx * slx * s_l2 > s_lx * s_lx * sl2) {
                    L[i] = (uint8_t)nl;
                    s_lx = slx;
                    s_l2 = sl2;
                    ++changed;
                }
            }
            if (!changed) break;
        }
        scale_out[g] = s_l2 > 0.f ? s_lx / s_l2 : 0.f;
    }
}

/* A method-less module, so that the library can be built and installed as an extension. */
static struct PyModuleDef ei_module = {PyModuleDef_HEAD_INIT, "_kqnative",
                                       "Compiled K-quant group searches (loaded with ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__kqnative(void) { return PyModule_Create(&ei_module); }
