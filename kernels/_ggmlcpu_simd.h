/*
 * The x86 SIMD kernels, included by _ggmlcpu.c once per ISA under a target pragma, with SFX (the
 * name suffix) and DOT(c, x) (u8 x s8 -> 8 x int32 sums of 4 products) defined.  One body; the
 * weight type is a compile-time constant in each specialisation (rows_<type>), so the block
 * decoding below folds into straight-line code.  Same arithmetic as group_scalar / rows_scalar.
 */
#define EG_CAT_(a, b) a##_##b
#define EG_CAT(a, b) EG_CAT_(a, b)
#define F(name) EG_CAT(name, SFX)
#define AI static inline __attribute__((always_inline))

AI float F(rdh)(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* bit i of the 32-bit word at p -> byte i = 0x10 if set, else 0 */
AI __m256i F(bits16)(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                         3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), idx), sel);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, sel), _mm256_set1_epi8(0x10));
}

/* 16 bytes of nibbles -> 32 codes: low nibbles (elements 0..15), then high nibbles (16..31) */
AI __m256i F(nib)(const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

/* Scales of the groups of one block (1 group for the 32-element types, 8 for the K types):
 * w = a_h * c + b_h on half h of group j. */
AI void F(scales)(const int type, const uint8_t *b, float *a0, float *a1, float *b0, float *b1) {
    switch (type) {
    case T_Q4_0: a0[0] = F(rdh)(b); b0[0] = -8.f * a0[0]; break;
    case T_Q5_0: a0[0] = F(rdh)(b); b0[0] = -16.f * a0[0]; break;
    case T_Q4_1: case T_Q5_1: a0[0] = F(rdh)(b); b0[0] = F(rdh)(b + 2); break;
    case T_Q8_0: a0[0] = F(rdh)(b); b0[0] = 0.f; break;
    case T_Q4_K: case T_Q5_K: {
        float d = F(rdh)(b), dm = F(rdh)(b + 2);
        for (int j = 0; j < 8; ++j) {
            int sc, m;
            scale_min_k4(j, b + 4, &sc, &m);
            a0[j] = d * (float)sc;
            b0[j] = -dm * (float)m;
        }
        break;
    }
    default: { /* Q6_K: scales[16] int8 per 16 weights, group j = (128-half n, quarter r) */
        float d = F(rdh)(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int j = 0; j < 8; ++j) {
            int n = j >> 2, r = j & 3;
            a0[j] = d * (float)sc[8 * n + 2 * r];
            a1[j] = d * (float)sc[8 * n + 2 * r + 1];
            b0[j] = -32.f * a0[j];
            b1[j] = -32.f * a1[j];
        }
        break;
    }
    }
}

/* The 32 codes of group j of block b (Q8_0: the signed bytes as stored). */
AI __m256i F(codes)(const int type, const uint8_t *b, int j) {
    const __m256i m15 = _mm256_set1_epi8(15);
    switch (type) {
    case T_Q4_0: return F(nib)(b + 2);
    case T_Q4_1: return F(nib)(b + 4);
    case T_Q5_0: return _mm256_or_si256(F(nib)(b + 6), F(bits16)(b + 2));
    case T_Q5_1: return _mm256_or_si256(F(nib)(b + 8), F(bits16)(b + 4));
    case T_Q8_0: return _mm256_loadu_si256((const __m256i *)(b + 2));
    case T_Q4_K: case T_Q5_K: {
        __m256i q = _mm256_loadu_si256((const __m256i *)(b + (type == T_Q4_K ? 16 : 48) + 32 * (j >> 1)));
        __m256i c = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * (j & 1))), m15);
        if (type == T_Q5_K) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(b + 16));
            h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
            c = _mm256_or_si256(c, _mm256_slli_epi16(h, 4));
        }
        return c;
    }
    default: { /* Q6_K */
        int n = j >> 2, r = j & 3;
        __m256i l = _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32 * (r & 1)));
        __m256i h = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
        l = _mm256_and_si256(_mm256_srl_epi16(l, _mm_cvtsi32_si128(4 * (r >> 1))), m15);
        h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * r)), _mm256_set1_epi8(3));
        return _mm256_or_si256(l, _mm256_slli_epi16(h, 4));
    }
    }
}

AI float F(hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 int32x8 vectors p[0..7] -> one vector of their 8 lane sums (lane i = sum of p[i]). */
AI __m256i F(sum8)(const __m256i *p) {
    __m256i t0 = _mm256_hadd_epi32(p[0], p[1]), t1 = _mm256_hadd_epi32(p[2], p[3]);
    __m256i t2 = _mm256_hadd_epi32(p[4], p[5]), t3 = _mm256_hadd_epi32(p[6], p[7]);
    __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* mt (1..4) activation rows xr[t * ng ..] against one weight row: y[t * ldy].
 * The 32-value types go 8 groups at a time: the 8 groups' codes and scales are decoded once, and per
 * activation row the 8 integer dot products are reduced into one vector of group sums, scaled by the
 * weight scales times the activation scales (xd_buf, contiguous per row) in one float step, and the
 * offsets (b * activation sums, xs_buf) in another -- a handful of vector ops per row per 256 weights
 * instead of a float step per group. The remaining groups (k not a multiple of 256) go one by one. */
AI void F(tile)(const int type, const int mt, const uint8_t *row, const eg_q8 *xr, int ng, float *y, int64_t ldy) {
    const int gpb = type >= T_Q4_K ? 8 : 1, bsz = type_bytes(type);
    __m256 acc[4];
    float off[4];
    for (int t = 0; t < mt; ++t) { acc[t] = _mm256_setzero_ps(); off[t] = 0.f; }
    int ib0 = 0;
    if (gpb == 1 && xd_buf) {
        __m256 accb[4];
        for (int t = 0; t < mt; ++t) accb[t] = _mm256_setzero_ps();
        for (; ib0 + 8 <= ng; ib0 += 8) {
            float a[8], b[8], u0[8], u1[8];
            __m256i c[8], cu[8];
            for (int i = 0; i < 8; ++i) {
                const uint8_t *blk = row + (int64_t)(ib0 + i) * bsz;
                F(scales)(type, blk, a + i, u0 + i, b + i, u1 + i);
                c[i] = F(codes)(type, blk, 0);
                cu[i] = type == T_Q8_0 ? _mm256_sign_epi8(c[i], c[i]) : c[i];
            }
            const __m256 A = _mm256_loadu_ps(a), Bv = _mm256_loadu_ps(b);
            for (int t = 0; t < mt; ++t) {
                const eg_q8 *xb = xr + (int64_t)t * ng + ib0;
                __m256i p[8];
                for (int i = 0; i < 8; ++i) {
                    __m256i x = _mm256_loadu_si256((const __m256i *)xb[i].q);
                    if (type == T_Q8_0) x = _mm256_sign_epi8(x, c[i]);
                    p[i] = DOT(cu[i], x);
                }
                const int64_t at = xb - xq_buf;
                __m256 sd = _mm256_mul_ps(A, _mm256_loadu_ps(xd_buf + at));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(F(sum8)(p)), sd, acc[t]);
                if (type != T_Q8_0) accb[t] = _mm256_fmadd_ps(Bv, _mm256_loadu_ps(xs_buf + at), accb[t]);
            }
        }
        for (int t = 0; t < mt; ++t) acc[t] = _mm256_add_ps(acc[t], accb[t]);
    }
    for (int ib = ib0; ib < ng / gpb; ++ib) {
        const uint8_t *blk = row + (int64_t)ib * bsz;
        float a0[8], a1[8], b0[8], b1[8];
        F(scales)(type, blk, a0, a1, b0, b1);
        for (int j = 0; j < gpb; ++j) {
            const int g = ib * gpb + j;
            __m256i c = F(codes)(type, blk, j);
            __m256i cu = type == T_Q8_0 ? _mm256_sign_epi8(c, c) : c;
            for (int t = 0; t < mt; ++t) {
                const eg_q8 *xb = xr + (int64_t)t * ng + g;
                __m256i x = _mm256_loadu_si256((const __m256i *)xb->q);
                if (type == T_Q8_0) x = _mm256_sign_epi8(x, c);
                __m256 p = _mm256_cvtepi32_ps(DOT(cu, x));
                if (type == T_Q6_K) {
                    __m256 sc = _mm256_set_m128(_mm_set1_ps(a1[j] * xb->d), _mm_set1_ps(a0[j] * xb->d));
                    acc[t] = _mm256_fmadd_ps(p, sc, acc[t]);
                    off[t] += b0[j] * xb->ds0 + b1[j] * xb->ds1;
                } else {
                    acc[t] = _mm256_fmadd_ps(p, _mm256_set1_ps(a0[j] * xb->d), acc[t]);
                    if (type != T_Q8_0) off[t] += b0[j] * (xb->ds0 + xb->ds1);
                }
            }
        }
    }
    for (int t = 0; t < mt; ++t) y[(int64_t)t * ldy] = F(hsum)(acc[t]) + off[t];
}

AI void F(rows_t)(const int type, const eg_mat *w, const eg_q8 *xq, int M, float *y, int64_t ldy, int r0, int r1) {
    const int ng = w->k / 32;
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        int m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) F(tile)(type, 4, row, xq + (int64_t)m0 * ng, ng, y + m0 * ldy + r, ldy);
        /* the last 1..3 rows in one pass too (each weight row decoded once per call up to 4 rows) */
        if (M - m0 == 3) F(tile)(type, 3, row, xq + (int64_t)m0 * ng, ng, y + m0 * ldy + r, ldy);
        else if (M - m0 == 2) F(tile)(type, 2, row, xq + (int64_t)m0 * ng, ng, y + m0 * ldy + r, ldy);
        else if (M - m0 == 1) F(tile)(type, 1, row, xq + (int64_t)m0 * ng, ng, y + m0 * ldy + r, ldy);
    }
}

/* The K types against Q8_K-style activations (eg_q8k): per super-block, the 8 code vectors are
 * decoded once, then for each of mt activation rows one int32 vector
 *   sum_j madd(maddubs(c_j, q_j), sc_j)  -  madd(bsums, mn)      (Q6_K: mn = 32 * sc, same d)
 * and one float fma per super-block (two with Q4_K/Q5_K's mins, which have their own dmin).
 * maddubs cannot saturate: codes <= 63, |q| <= 127, 2 * 63 * 127 < 32768. */
AI void F(tile_k)(const int type, const int mt, const uint8_t *row, const eg_q8k *xr, int nb, float *y, int64_t ldy) {
    const int bsz = type_bytes(type);
    __m256 acc[4];
    for (int t = 0; t < mt; ++t) acc[t] = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t *blk = row + (int64_t)ib * bsz;
        __m256i c[8], s16[8], mn;
        float d, dm;
        if (type == T_Q6_K) {
            d = dm = F(rdh)(blk + 208);
            __m128i s8 = _mm_loadu_si128((const __m128i *)(blk + 192));
            for (int j = 0; j < 8; ++j) /* 16-bit lanes 0..7 <- scale 2j (bytes 0..15 of group j), 8..15 <- 2j+1 */
                s16[j] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s8, _mm_set_epi64x(0x0101010101010101LL * (2 * j + 1),
                                                                                  0x0101010101010101LL * (2 * j))));
            mn = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s8), 5);
        } else {
            d = F(rdh)(blk);
            dm = F(rdh)(blk + 2);
            /* the 12 scale bytes as words a, b, c: scales 0..3 = a & 63, 4..7 = (c & 15) | (a >> 6) << 4;
             * mins 0..3 = b & 63, 4..7 = (c >> 4) | (b >> 6) << 4 (bytewise) */
            uint32_t wa, wb, wc;
            memcpy(&wa, blk + 4, 4);
            memcpy(&wb, blk + 8, 4);
            memcpy(&wc, blk + 12, 4);
            const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
            __m128i sm = _mm_setr_epi32((int)(wa & m6), (int)((wc & m4) | (((wa >> 6) & m2) << 4)), (int)(wb & m6),
                                        (int)(((wc >> 4) & m4) | (((wb >> 6) & m2) << 4)));
            __m256i scw = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm)); /* int16 scales 0..7, both lanes */
            for (int j = 0; j < 8; ++j) s16[j] = _mm256_shuffle_epi8(scw, _mm256_set1_epi16((short)((2 * j) | ((2 * j + 1) << 8))));
            mn = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)));
        }
        for (int j = 0; j < 8; ++j) c[j] = F(codes)(type, blk, j);
        for (int t = 0; t < mt; ++t) {
            const eg_q8k *xb = xr + (int64_t)t * nb + ib;
            /* four independent accumulation chains (the madd/dpwssd latency, not throughput, bounds
             * one chain of 8 at M = 1) */
            __m256i ia[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                             _mm256_setzero_si256()};
            for (int j = 0; j < 8; ++j) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(xb->q + 32 * j));
                ia[j & 3] = MADD16(ia[j & 3], _mm256_maddubs_epi16(c[j], x), s16[j]);
            }
            __m256i is = _mm256_add_epi32(_mm256_add_epi32(ia[0], ia[1]), _mm256_add_epi32(ia[2], ia[3]));
            __m256i ms = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), mn);
            if (type == T_Q6_K) {
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(is, ms)), _mm256_set1_ps(d * xb->d), acc[t]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_set1_ps(d * xb->d), acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_set1_ps(-dm * xb->d), acc[t]);
            }
        }
    }
    for (int t = 0; t < mt; ++t) y[(int64_t)t * ldy] = F(hsum)(acc[t]);
}

AI void F(rows_kt)(const int type, const eg_mat *w, const eg_q8k *xk, int M, float *y, int64_t ldy, int r0, int r1) {
    const int nb = w->k / 256;
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        int m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) F(tile_k)(type, 4, row, xk + (int64_t)m0 * nb, nb, y + m0 * ldy + r, ldy);
        if (M - m0 == 3) F(tile_k)(type, 3, row, xk + (int64_t)m0 * nb, nb, y + m0 * ldy + r, ldy);
        else if (M - m0 == 2) F(tile_k)(type, 2, row, xk + (int64_t)m0 * nb, nb, y + m0 * ldy + r, ldy);
        else if (M - m0 == 1) F(tile_k)(type, 1, row, xk + (int64_t)m0 * nb, nb, y + m0 * ldy + r, ldy);
    }
}

static void F(rows_k)(const eg_mat *w, const eg_q8k *xk, int M, float *y, int64_t ldy, int r0, int r1) {
    switch (w->type) {
    case T_Q4_K: F(rows_kt)(T_Q4_K, w, xk, M, y, ldy, r0, r1); break;
    case T_Q5_K: F(rows_kt)(T_Q5_K, w, xk, M, y, ldy, r0, r1); break;
    case T_Q6_K: F(rows_kt)(T_Q6_K, w, xk, M, y, ldy, r0, r1); break;
    }
}

/* F32 / F16 weight rows against float32 activations x [M][ldx] (F16C widens the halves); two
 * accumulators per activation row hide the FMA latency. Same sums as rows_f_scalar up to order. */
AI void F(rows_ft)(const int f16, const eg_mat *w, const float *x, int M, int64_t ldx, float *y, int64_t ldy,
                   int r0, int r1) {
    const int k = w->k, k16 = k & ~15;
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mt = M - m0 < 4 ? M - m0 : 4;
            __m256 a0[4], a1[4];
            for (int t = 0; t < 4; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
            for (int i = 0; i < k16; i += 16) {
                __m256 w0 = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)))
                                : _mm256_loadu_ps((const float *)(row + 4 * i));
                __m256 w1 = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i + 16)))
                                : _mm256_loadu_ps((const float *)(row + 4 * i + 32));
                for (int t = 0; t < mt; ++t) {
                    const float *xm = x + (int64_t)(m0 + t) * ldx + i;
                    a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a0[t]);
                    a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a1[t]);
                }
            }
            for (int t = 0; t < mt; ++t) {
                const float *xm = x + (int64_t)(m0 + t) * ldx;
                float s = F(hsum)(_mm256_add_ps(a0[t], a1[t]));
                for (int i = k16; i < k; ++i) s += wf_at(w, row, i) * xm[i];
                y[(int64_t)(m0 + t) * ldy + r] = s;
            }
        }
    }
}

static __attribute__((unused)) void F(rows_f)(const eg_mat *w, const float *x, int M, int64_t ldx, float *y,
                                             int64_t ldy, int r0, int r1) {
    if (w->type == T_F16) F(rows_ft)(1, w, x, M, ldx, y, ldy, r0, r1);
    else F(rows_ft)(0, w, x, M, ldx, y, ldy, r0, r1);
}

/* Attention's float vectors (the fused step): q . k over n, and o += p * v. */
static __attribute__((unused)) float F(dotf)(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float d = F(hsum)(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) d += a[i] * b[i];
    return d;
}

static __attribute__((unused)) void F(axpyf)(float *o, const float *v, float p, int n) {
    const __m256 pv = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
    for (; i < n; ++i) o[i] += p * v[i];
}

/* 8 floats -> 8 bfloat16 (round to nearest even) at o */
AI void F(store_bf16)(uint16_t *o, __m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    b = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
    _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(b));
}

/* Rows r0..r1-1 dequantized to out [r1 - r0][k], float32 or (bf16) bfloat16 (w = a * c + b, the
 * reference's values up to FMA rounding). */
AI void F(dequant_t)(const int type, const int bf16, const eg_mat *w, int r0, int r1, void *out) {
    const int gpb = type >= T_Q4_K ? 8 : 1, bsz = type_bytes(type), nb = w->k / (32 * gpb);
    for (int r = r0; r < r1; ++r) {
        const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
        int64_t o = (int64_t)(r - r0) * w->k;
        for (int ib = 0; ib < nb; ++ib) {
            const uint8_t *blk = row + (int64_t)ib * bsz;
            float a0[8], a1[8], b0[8], b1[8];
            F(scales)(type, blk, a0, a1, b0, b1);
            for (int j = 0; j < gpb; ++j) {
                __m256i c = F(codes)(type, blk, j);
                float ah[2] = {a0[j], type == T_Q6_K ? a1[j] : a0[j]}, bh[2] = {b0[j], type == T_Q6_K ? b1[j] : b0[j]};
                for (int q = 0; q < 4; ++q) {
                    __m128i c8 = _mm_loadl_epi64((const __m128i *)((const uint8_t *)&c + 8 * q));
                    __m256i c32 = type == T_Q8_0 ? _mm256_cvtepi8_epi32(c8) : _mm256_cvtepu8_epi32(c8);
                    __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c32), _mm256_set1_ps(ah[q >> 1]), _mm256_set1_ps(bh[q >> 1]));
                    int64_t at = o + (ib * gpb + j) * 32 + 8 * q;
                    if (bf16) F(store_bf16)((uint16_t *)out + at, v);
                    else _mm256_storeu_ps((float *)out + at, v);
                }
            }
        }
    }
}

#define EG_SPECIALISE(TY, name)                                                                          \
    static void F(rows_##name)(const eg_mat *w, const eg_q8 *xq, int M, float *y, int64_t ldy, int r0, int r1) { \
        F(rows_t)(TY, w, xq, M, y, ldy, r0, r1);                                                         \
    }                                                                                                    \
    static void F(dequant_##name)(const eg_mat *w, int r0, int r1, void *out, int bf16) {                \
        if (bf16) F(dequant_t)(TY, 1, w, r0, r1, out);                                                   \
        else F(dequant_t)(TY, 0, w, r0, r1, out);                                                        \
    }
EG_SPECIALISE(T_Q4_0, q4_0)
EG_SPECIALISE(T_Q4_1, q4_1)
EG_SPECIALISE(T_Q5_0, q5_0)
EG_SPECIALISE(T_Q5_1, q5_1)
EG_SPECIALISE(T_Q8_0, q8_0)
EG_SPECIALISE(T_Q4_K, q4_k)
EG_SPECIALISE(T_Q5_K, q5_k)
EG_SPECIALISE(T_Q6_K, q6_k)
#undef EG_SPECIALISE

#define EG_BY_TYPE(FN, ...)                                                                              \
    switch (w->type) {                                                                                   \
    case T_Q4_0: F(FN##_q4_0)(__VA_ARGS__); break;                                                       \
    case T_Q4_1: F(FN##_q4_1)(__VA_ARGS__); break;                                                       \
    case T_Q5_0: F(FN##_q5_0)(__VA_ARGS__); break;                                                       \
    case T_Q5_1: F(FN##_q5_1)(__VA_ARGS__); break;                                                       \
    case T_Q8_0: F(FN##_q8_0)(__VA_ARGS__); break;                                                       \
    case T_Q4_K: F(FN##_q4_k)(__VA_ARGS__); break;                                                       \
    case T_Q5_K: F(FN##_q5_k)(__VA_ARGS__); break;                                                       \
    case T_Q6_K: F(FN##_q6_k)(__VA_ARGS__); break;                                                       \
    }

static void F(rows)(const eg_mat *w, const eg_q8 *xq, int M, float *y, int64_t ldy, int r0, int r1) {
    EG_BY_TYPE(rows, w, xq, M, y, ldy, r0, r1)
}

static void F(dequant)(const eg_mat *w, int r0, int r1, void *out, int bf16) { EG_BY_TYPE(dequant, w, r0, r1, out, bf16) }
#undef EG_BY_TYPE
#undef AI
#undef F
#undef EG_CAT
#undef EG_CAT_
