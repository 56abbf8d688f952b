/*
 * The fused CPU decode step (included by _ggmlcpu.c): one token through every layer of a decoder,
 * then the final norm and the LM head, in one call. The matmuls are the kernels above (quantized
 * blocks or float rows); the rest is plain C on the calling thread, attention split over heads.
 *
 * A layer (eg_layer) is, in the order of models/base.py (Block, Attention, MLP), models/moe.py
 * (MoE, Experts, route) and models/gemma4.py (Gemma4Block, Gemma4MoE):
 *
 *   x = rms(h, attn_norm); q/k/v = x @ Wqkv (+ biases); [v = k (keys as values)]; [v = rms(v)];
 *   [per-head rms of q and k]; RoPE (the layer's own table, n_rot of head_dim, NEOX or pairs);
 *   k/v stored at slot pos % size (size = the window for a ring buffer; KV-shared layers only read
 *   their producer's cache); attention over the visible positions (a window limits them);
 *   a = att @ Wo; h += [rms(a, post_attn_norm)];
 *   x = rms(h, ffn_norm); d = dense MLP act(x @ Wg) * (x @ Wu) @ Wd (ffn > 0);
 *   MoE (moe != NULL): router logits of x (or, Gemma 4, of rms(h) * router_scale), softmax, top-k,
 *     [renormalised], * scale [* expert_scale]; the chosen experts' gate/up in one product over
 *     their input (x, or Gemma 4: rms(h, pre_norm)), their down projections in one product of k
 *     rows, summed in expert-id order; [+ shared expert, optionally sigmoid-gated];
 *     Gemma 4: m = rms(d, post_dense) + rms(e, post_moe), else m = e;
 *   h += [rms(m, post_ffn_norm)];
 *   per-layer embedding: h += rms((gelu(h @ Wpg) * ple_i) @ Wpp, ple_norm); h *= out_scale.
 *
 * kernels/cpu_step.py builds the structs from a loaded model (and decides which models qualify);
 * the tests hold the logits against the model's forward on the same kernels.
 */

typedef struct {
    int32_t n_expert, top_k, ffn, act, gemma, norm_topk, fused;
    float scale;                      /* routed_scaling_factor */
    eg_mat router;                    /* [n_expert, dim] */
    const float *router_scale;        /* gemma: [dim], ffn_gate_inp.scale / sqrt(dim) (router reads rms(h) * it) */
    const float *expert_scale;        /* gemma: [n_expert] (ffn_down_exps.scale) or NULL */
    const eg_mat *gate_up;            /* fused: [n_expert] mats [2 ffn, dim] (gate rows first) */
    const eg_mat *gate, *up;          /* not fused: [n_expert] each */
    const eg_mat *down;               /* [n_expert] mats [dim, ffn] */
    const float *pre_norm;            /* gemma: pre_ffw_norm_2 */
    const float *post_dense, *post_moe;  /* gemma: post_ffw_norm_1 / post_ffw_norm_2 */
    int32_t sh_ffn, sh_gated;         /* shared expert width (0: none); sigmoid gate present */
    eg_mat sh_gate, sh_up, sh_down, sh_gate_inp;
} eg_moe;

typedef struct {
    int32_t n_head, n_kv, head_dim, n_rot, neox;
    int32_t size, ring, window;       /* cache slots; ring buffer (slot = pos % size); window (0: none) */
    int32_t own_kv, k_eq_v, v_norm, n_qkv;
    int32_t ffn, act;                 /* dense MLP width (0: none); 0 silu, 1 gelu (tanh) */
    float attn_scale, out_scale;      /* out_scale: layer_output_scale (1: none) */
    const float *rope_cos, *rope_sin; /* [n_ctx][n_rot / 2] */
    const float *attn_norm, *post_attn_norm, *ffn_norm, *post_ffn_norm;  /* post_*: NULL = none */
    const float *q_norm, *k_norm;     /* [head_dim] or NULL */
    const float *bq, *bk, *bv;        /* biases or NULL */
    eg_mat qkv[3];                    /* q[, k[, v]] (same k = dim) */
    eg_mat o, gate, up, down;
    float *kc, *vc;                   /* cache [n_kv][size][head_dim] (the producer's when !own_kv) */
    const eg_moe *moe;                /* routed experts or NULL */
    int32_t ple;                      /* per-layer embedding gate present */
    eg_mat ple_gate, ple_proj;        /* [P, dim], [dim, P] */
    const float *ple_norm;
} eg_layer;

typedef struct {
    int32_t n_layer, dim, n_ctx, vocab, ple_dim;
    float eps, softcap;
    const eg_layer *layers;
    const float *out_norm;            /* [dim] */
    eg_mat out;                       /* LM head [vocab, dim] */
    const float *ple_in;              /* [n_layer][ple_dim] per-layer inputs of this token, or NULL */
    float *scratch;                   /* eg_step_scratch() floats */
} eg_model;

static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/* The largest activation row any product of the step reads (the quantization buffers' size). */
static int64_t step_max_k(const eg_model *m) {
    int64_t k = m->dim;
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        k = imax(k, imax((int64_t)L->n_head * L->head_dim, L->ffn));
        if (L->moe) k = imax(k, imax((int64_t)L->moe->top_k * L->moe->ffn, L->moe->sh_ffn));
        if (L->ple) k = imax(k, L->ple_gate.n);
    }
    return k;
}

EG_API int64_t eg_step_scratch(const eg_model *m) {
    int64_t qkv = 0, att = 0, scores = 0, gu = 0, ex = m->dim;
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        qkv = imax(qkv, (int64_t)(L->n_head + 2 * L->n_kv) * L->head_dim);
        att = imax(att, (int64_t)L->n_head * L->head_dim);
        scores = imax(scores, (int64_t)L->n_head * L->size);
        gu = imax(gu, 2 * (int64_t)L->ffn);
        if (L->moe) {
            gu = imax(gu, imax(2 * (int64_t)L->moe->top_k * L->moe->ffn, 2 * (int64_t)L->moe->sh_ffn));
            gu = imax(gu, L->moe->n_expert);
            ex = imax(ex, (int64_t)L->moe->top_k * (m->dim + L->moe->ffn));
        }
        if (L->ple) gu = imax(gu, L->ple_gate.n);
    }
    /* xn, tmp, xe, d, e | qkv | att | scores | gu | ex */
    return 5 * (int64_t)m->dim + qkv + att + scores + gu + ex;
}

static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(s / n) + eps);
    for (int i = 0; i < n; ++i) out[i] = x[i] * r * (w ? w[i] : 1.f);
}

static void rope(float *x, int n_heads, int hd, int n_rot, int neox, const float *c, const float *s) {
    int h2 = n_rot / 2;
    for (int h = 0; h < n_heads; ++h) {
        float *v = x + (int64_t)h * hd;
        for (int i = 0; i < h2; ++i) {
            int i0 = neox ? i : 2 * i, i1 = neox ? i + h2 : 2 * i + 1;
            float x0 = v[i0], x1 = v[i1];
            v[i0] = x0 * c[i] - x1 * s[i];
            v[i1] = x0 * s[i] + x1 * c[i];
        }
    }
}

static inline float act_fn(int act, float g) {
    if (act == 0) return g / (1.f + expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));  /* gelu, tanh form */
}

typedef struct {
    const eg_layer *L;
    const float *q;   /* [n_head][hd] */
    float *out;       /* [n_head][hd] */
    float *scores;    /* [n_head][size] */
    int first, n;     /* slots first .. first+n-1 visible */
} attn_job;

static void attn_task(void *vctx, int ith, int nth) {
    attn_job *j = (attn_job *)vctx;
    const eg_layer *L = j->L;
    int hd = L->head_dim, g = L->n_head / L->n_kv, n = j->n, size = L->size;
    int h0 = L->n_head * ith / nth, h1 = L->n_head * (ith + 1) / nth;
    for (int h = h0; h < h1; ++h) {
        const float *q = j->q + (int64_t)h * hd;
        const float *K = L->kc + ((int64_t)(h / g) * size + j->first) * hd;
        const float *V = L->vc + ((int64_t)(h / g) * size + j->first) * hd;
        float *sc = j->scores + (int64_t)h * size, mx = -INFINITY;
        for (int t = 0; t < n; ++t) {
            const float *k = K + (int64_t)t * hd;
            float d = 0.f;
            for (int i = 0; i < hd; ++i) d += q[i] * k[i];
            sc[t] = d * L->attn_scale;
            mx = sc[t] > mx ? sc[t] : mx;
        }
        float sum = 0.f;
        for (int t = 0; t < n; ++t) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
        float inv = 1.f / sum, *o = j->out + (int64_t)h * hd;
        for (int i = 0; i < hd; ++i) o[i] = 0.f;
        for (int t = 0; t < n; ++t) {
            const float *v = V + (int64_t)t * hd;
            float p = sc[t] * inv;
            for (int i = 0; i < hd; ++i) o[i] += p * v[i];
        }
    }
}

static void linear1(const eg_mat *mats, int nmat, const float *x, float *y, int nth) {
    gemm_x(mats, nmat, x, 1, mats[0].k, y, 0, nth);
}

/* The attention half of layer L for the token at pos: h += [post](attention(rms(h))). */
static void step_attention(const eg_model *m, const eg_layer *L, float *h, int pos, float *xn, float *tmp, float *qkv,
                           float *att, float *scores, int nth) {
    int dim = m->dim, hd = L->head_dim, nq = L->n_head * hd, nkv = L->n_kv * hd, h2 = L->n_rot / 2;
    const float *c = L->rope_cos + (int64_t)pos * h2, *s = L->rope_sin + (int64_t)pos * h2;
    rms_norm(h, L->attn_norm, dim, m->eps, xn);
    linear1(L->qkv, L->n_qkv, xn, qkv, nth);
    float *q = qkv, *k = qkv + nq, *v = k + nkv;
    if (L->bq) for (int i = 0; i < nq; ++i) q[i] += L->bq[i];
    if (L->q_norm) for (int i = 0; i < L->n_head; ++i) rms_norm(q + i * hd, L->q_norm, hd, m->eps, q + i * hd);
    rope(q, L->n_head, hd, L->n_rot, L->neox, c, s);
    int slot = L->ring ? pos % L->size : pos;
    if (L->own_kv) {
        if (L->bk) for (int i = 0; i < nkv; ++i) k[i] += L->bk[i];
        if (L->k_eq_v) memcpy(v, k, sizeof(float) * nkv);
        else if (L->bv) for (int i = 0; i < nkv; ++i) v[i] += L->bv[i];
        if (L->v_norm) for (int i = 0; i < L->n_kv; ++i) rms_norm(v + i * hd, NULL, hd, m->eps, v + i * hd);
        if (L->k_norm) for (int i = 0; i < L->n_kv; ++i) rms_norm(k + i * hd, L->k_norm, hd, m->eps, k + i * hd);
        rope(k, L->n_kv, hd, L->n_rot, L->neox, c, s);
        for (int i = 0; i < L->n_kv; ++i) {
            memcpy(L->kc + ((int64_t)i * L->size + slot) * hd, k + (int64_t)i * hd, sizeof(float) * hd);
            memcpy(L->vc + ((int64_t)i * L->size + slot) * hd, v + (int64_t)i * hd, sizeof(float) * hd);
        }
    }
    /* a ring buffer holds exactly the visible window once written; a full cache shows the window's tail */
    int first = 0, n = pos + 1;
    if (L->ring) n = n < L->size ? n : L->size;
    else if (L->window > 0 && n > L->window) first = n - L->window, n = L->window;
    attn_job aj = {L, q, att, scores, first, n};
    run(attn_task, &aj, (int64_t)L->n_head * n * hd < 65536 ? 1 : nth);
    linear1(&L->o, 1, att, tmp, nth);
    if (L->post_attn_norm) rms_norm(tmp, L->post_attn_norm, dim, m->eps, tmp);
    for (int i = 0; i < dim; ++i) h[i] += tmp[i];
}

/* A gated MLP on x (gate and up side by side in gu): y = down(act(gate x) * up x). */
static void mlp(const eg_mat *gate, const eg_mat *up, const eg_mat *down, int ffn, int act, const float *x, float *gu,
                float *y, int nth) {
    eg_mat gate_up[2] = {*gate, *up};
    linear1(gate_up, 2, x, gu, nth);
    for (int i = 0; i < ffn; ++i) gu[i] = act_fn(act, gu[i]) * gu[ffn + i];
    linear1(down, 1, gu, y, nth);
}

/* The routed experts of M on x (router input xr) -> e [dim]. */
static void moe(const eg_model *m, const eg_moe *M, const float *xr, const float *x, float *e, float *gu, float *ex,
                int nth) {
    int dim = m->dim, E = M->n_expert, K = M->top_k, F = M->ffn;
    float *p = gu; /* [E] router scores (reused below: gu is rewritten only after the choice) */
    linear1(&M->router, 1, xr, p, nth);
    float mx = -INFINITY, sum = 0.f;
    for (int i = 0; i < E; ++i) mx = p[i] > mx ? p[i] : mx;
    for (int i = 0; i < E; ++i) { p[i] = expf(p[i] - mx); sum += p[i]; }
    for (int i = 0; i < E; ++i) p[i] /= sum;
    int idx[64];
    float w[64], wsum = 0.f;
    for (int j = 0; j < K; ++j) { /* top-k, largest first; a tie goes to the lower id */
        int best = -1;
        for (int i = 0; i < E; ++i) {
            int taken = 0;
            for (int t = 0; t < j; ++t) taken |= idx[t] == i;
            if (!taken && (best < 0 || p[i] > p[best])) best = i;
        }
        idx[j] = best;
        w[j] = p[best];
        wsum += w[j];
    }
    for (int j = 1; j < K; ++j) /* summed in expert-id order, as the torch path */
        for (int t = j; t > 0 && idx[t - 1] > idx[t]; --t) {
            int ti = idx[t]; idx[t] = idx[t - 1]; idx[t - 1] = ti;
            float tw = w[t]; w[t] = w[t - 1]; w[t - 1] = tw;
        }
    for (int j = 0; j < K; ++j) {
        if (M->norm_topk) w[j] /= wsum;
        w[j] *= M->scale;
        if (M->expert_scale) w[j] *= M->expert_scale[idx[j]];
    }
    eg_mat mats[128];
    int nm = 0;
    for (int j = 0; j < K; ++j) {
        if (M->fused) mats[nm++] = M->gate_up[idx[j]];
        else { mats[nm++] = M->gate[idx[j]]; mats[nm++] = M->up[idx[j]]; }
    }
    linear1(mats, nm, x, gu, nth); /* [K][gate F | up F] */
    float *hid = ex + (int64_t)K * dim; /* [K][F] */
    for (int j = 0; j < K; ++j) {
        const float *g = gu + (int64_t)j * 2 * F, *u = g + F;
        float *o = hid + (int64_t)j * F;
        for (int i = 0; i < F; ++i) o[i] = act_fn(M->act, g[i]) * u[i];
        mats[j] = M->down[idx[j]];
    }
    gemm_xm(mats, K, hid, K, F, ex, 0, nth, 1); /* expert j's down on its own row: ex [K][dim] side by side */
    for (int i = 0; i < dim; ++i) e[i] = ex[i] * w[0];
    for (int j = 1; j < K; ++j)
        for (int i = 0; i < dim; ++i) e[i] += ex[(int64_t)j * dim + i] * w[j];
    if (M->sh_ffn) {
        float *s = ex; /* [dim] */
        mlp(&M->sh_gate, &M->sh_up, &M->sh_down, M->sh_ffn, M->act, x, gu, s, nth);
        float gate = 1.f;
        if (M->sh_gated) {
            linear1(&M->sh_gate_inp, 1, x, gu, nth);
            gate = 1.f / (1.f + expf(-gu[0]));
        }
        for (int i = 0; i < dim; ++i) e[i] += gate * s[i];
    }
}

/* One token at position pos: h [dim] holds its embedding on entry (the residual stream, updated
 * in place); logits [vocab] receive the head's output. Returns 0, -1 (out of memory / bad pos). */
EG_API int eg_step(const eg_model *m, float *h, int pos, float *logits, int nth) {
    if (pos < 0 || pos >= m->n_ctx) return -1;
    int dim = m->dim;
    int64_t qn = 0, an = 0, sn = 0, gn = 0;
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        qn = imax(qn, (int64_t)(L->n_head + 2 * L->n_kv) * L->head_dim);
        an = imax(an, (int64_t)L->n_head * L->head_dim);
        sn = imax(sn, (int64_t)L->n_head * L->size);
        gn = imax(gn, 2 * (int64_t)L->ffn);
        if (L->moe) {
            gn = imax(gn, imax(2 * (int64_t)L->moe->top_k * L->moe->ffn, 2 * (int64_t)L->moe->sh_ffn));
            gn = imax(gn, L->moe->n_expert);
        }
        if (L->ple) gn = imax(gn, L->ple_gate.n);
    }
    float *xn = m->scratch, *tmp = xn + dim, *xe = tmp + dim, *d = xe + dim, *e = d + dim;
    float *qkv = e + dim, *att = qkv + qn, *scores = att + an, *gu = scores + sn, *ex = gu + gn;
    pthread_mutex_lock(&call_mu);
    if (xbuf_for(1, (int)step_max_k(m))) {
        pthread_mutex_unlock(&call_mu);
        return -1;
    }
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        const eg_moe *M = L->moe;
        step_attention(m, L, h, pos, xn, tmp, qkv, att, scores, nth);
        rms_norm(h, L->ffn_norm, dim, m->eps, xn);
        float *f = d; /* the FFN's output */
        if (L->ffn) mlp(&L->gate, &L->up, &L->down, L->ffn, L->act, xn, gu, d, nth);
        if (M && M->gemma) {
            rms_norm(h, NULL, dim, m->eps, tmp); /* the router reads the normed residual, scaled */
            for (int i = 0; i < dim; ++i) tmp[i] *= M->router_scale[i];
            rms_norm(h, M->pre_norm, dim, m->eps, xe);
            moe(m, M, tmp, xe, e, gu, ex, nth);
            rms_norm(d, M->post_dense, dim, m->eps, d);
            rms_norm(e, M->post_moe, dim, m->eps, e);
            for (int i = 0; i < dim; ++i) d[i] += e[i];
        } else if (M) {
            moe(m, M, xn, xn, e, gu, ex, nth);
            f = e;
        }
        if (L->post_ffn_norm) rms_norm(f, L->post_ffn_norm, dim, m->eps, f);
        for (int i = 0; i < dim; ++i) h[i] += f[i];
        if (L->ple) {
            int P = L->ple_gate.n;
            const float *pin = m->ple_in + (int64_t)l * m->ple_dim;
            linear1(&L->ple_gate, 1, h, gu, nth);
            for (int i = 0; i < P; ++i) gu[i] = act_fn(1, gu[i]) * pin[i];
            linear1(&L->ple_proj, 1, gu, tmp, nth);
            rms_norm(tmp, L->ple_norm, dim, m->eps, tmp);
            for (int i = 0; i < dim; ++i) h[i] += tmp[i];
        }
        if (L->out_scale != 1.f)
            for (int i = 0; i < dim; ++i) h[i] *= L->out_scale;
    }
    rms_norm(h, m->out_norm, dim, m->eps, xn);
    linear1(&m->out, 1, xn, logits, nth);
    if (m->softcap > 0.f)
        for (int i = 0; i < m->vocab; ++i) logits[i] = tanhf(logits[i] / m->softcap) * m->softcap;
    pthread_mutex_unlock(&call_mu);
    return 0;
}
