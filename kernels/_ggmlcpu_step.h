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
            sc[t] = DOTF(q, K + (int64_t)t * hd, hd) * L->attn_scale;
            mx = sc[t] > mx ? sc[t] : mx;
        }
        float sum = 0.f;
        for (int t = 0; t < n; ++t) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
        float inv = 1.f / sum, *o = j->out + (int64_t)h * hd;
        for (int i = 0; i < hd; ++i) o[i] = 0.f;
        for (int t = 0; t < n; ++t) AXPYF(o, V + (int64_t)t * hd, sc[t] * inv, hd);
    }
}

static void linear1(const eg_mat *mats, int nmat, const float *x, float *y, int nth) {
    gemm_x(mats, nmat, x, 1, mats[0].k, y, 0, nth);
}

/* Row b's attention after the batched q/k/v product: bias, norms, RoPE at pos, its K/V into the
 * sequence's cache (L: that sequence's layer struct), attention over the visible positions -> att. */
static void attention_row(const eg_model *m, const eg_layer *L, int pos, float *qkv, float *att, float *scores,
                          int nth) {
    int hd = L->head_dim, nq = L->n_head * hd, nkv = L->n_kv * hd, h2 = L->n_rot / 2;
    const float *c = L->rope_cos + (int64_t)pos * h2, *s = L->rope_sin + (int64_t)pos * h2;
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
}

/* A gated MLP on B rows of x [B][ldx] (gate and up side by side in gu [B][ldg]):
 * y [B][ldy] = down(act(gate x) * up x). */
static void mlp(const eg_mat *gate, const eg_mat *up, const eg_mat *down, int ffn, int act, const float *x, int B,
                int64_t ldx, float *gu, int64_t ldg, float *y, int64_t ldy, int nth) {
    eg_mat gate_up[2] = {*gate, *up};
    gemm_x(gate_up, 2, x, B, ldx, gu, ldg, nth);
    for (int b = 0; b < B; ++b) {
        float *g = gu + (int64_t)b * ldg;
        for (int i = 0; i < ffn; ++i) g[i] = act_fn(act, g[i]) * g[ffn + i];
    }
    gemm_x(down, 1, gu, B, ldg, y, ldy, nth);
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
        mlp(&M->sh_gate, &M->sh_up, &M->sh_down, M->sh_ffn, M->act, x, 1, dim, gu, 0, s, 0, nth);
        float gate = 1.f;
        if (M->sh_gated) {
            linear1(&M->sh_gate_inp, 1, x, gu, nth);
            gate = 1.f / (1.f + expf(-gu[0]));
        }
        for (int i = 0; i < dim; ++i) e[i] += gate * s[i];
    }
}

/* Per-row buffer sizes of the step (floats): q/k/v, attention output, scores (one row at a time),
 * gate/up, the experts' outputs (one row at a time); k: the longest activation row any product
 * reads (the quantization buffers' size). */
typedef struct { int64_t qn, an, sn, gn, exn, k; } step_sizes;

static step_sizes sizes_of(const eg_model *m) {
    step_sizes z = {0, 0, 0, 0, m->dim, m->dim};
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        z.qn = imax(z.qn, (int64_t)(L->n_head + 2 * L->n_kv) * L->head_dim);
        z.an = imax(z.an, (int64_t)L->n_head * L->head_dim);
        z.sn = imax(z.sn, (int64_t)L->n_head * L->size);
        z.gn = imax(z.gn, 2 * (int64_t)L->ffn);
        z.k = imax(z.k, imax(z.an, L->ffn));
        if (L->moe) {
            z.gn = imax(z.gn, imax(2 * (int64_t)L->moe->top_k * L->moe->ffn, 2 * (int64_t)L->moe->sh_ffn));
            z.gn = imax(z.gn, L->moe->n_expert);
            z.exn = imax(z.exn, (int64_t)L->moe->top_k * (m->dim + L->moe->ffn));
            z.k = imax(z.k, imax((int64_t)L->moe->top_k * L->moe->ffn, L->moe->sh_ffn));
        }
        if (L->ple) {
            z.gn = imax(z.gn, L->ple_gate.n);
            z.k = imax(z.k, L->ple_gate.n);
        }
    }
    return z;
}

/* Scratch floats eg_step_batch needs for B rows. */
EG_API int64_t eg_step_scratch_batch(const eg_model *m, int B) {
    step_sizes z = sizes_of(m);
    return (int64_t)B * (4 * (int64_t)m->dim + z.qn + z.an + z.gn) + m->dim + z.sn + z.exn;
}

/* One token of each of B sequences (ms[b]: sequence b's structs -- the same weights, its own caches
 * and per-layer inputs) at positions pos[b]: h [B][dim] holds their embeddings on entry (updated in
 * place), logits [B][vocab] receive the head's outputs. Every product runs over the B rows at once
 * (the weights are read once); a row's result does not depend on the others (each activation row is
 * quantized on its own), so a batch gives what B single steps give. Routed experts run row by row.
 * Rows of one sequence at consecutive positions (ms[b] all the same) are causal: row b's K/V enter the
 * cache before row b + 1 attends (a speculative verification pass).
 * scratch: eg_step_scratch_batch(ms[0], B) floats; ple_in: [B][n_layer][ple_dim] per-layer inputs, or
 * NULL (each row reads ms[b]->ple_in); head_rows: the last rows whose logits are computed (a prompt
 * chunk needs none or one), logits [head_rows][vocab]. Returns 0, or -1 (out of memory / bad pos). */
EG_API int eg_step_batch(const eg_model *const *ms, int B, float *h, const int *pos, float *logits, int nth,
                         float *scratch, const float *ple_in, int head_rows) {
    const eg_model *m = ms[0];
    for (int b = 0; b < B; ++b)
        if (pos[b] < 0 || pos[b] >= ms[b]->n_ctx) return -1;
    int dim = m->dim;
    step_sizes z = sizes_of(m);
    float *xn = scratch, *tmp = xn + (int64_t)B * dim, *d = tmp + (int64_t)B * dim, *f = d + (int64_t)B * dim;
    float *qkv = f + (int64_t)B * dim, *att = qkv + B * z.qn, *gu = att + B * z.an, *xe = gu + B * z.gn;
    float *scores = xe + dim, *ex = scores + z.sn;
    pthread_mutex_lock(&call_mu);
    if (xbuf_for(B, (int)z.k)) {
        pthread_mutex_unlock(&call_mu);
        return -1;
    }
#define ROW(buf, stride, b) ((buf) + (int64_t)(b) * (stride))
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        const eg_moe *M = L->moe;
        for (int b = 0; b < B; ++b) rms_norm(ROW(h, dim, b), L->attn_norm, dim, m->eps, ROW(xn, dim, b));
        gemm_x(L->qkv, L->n_qkv, xn, B, dim, qkv, z.qn, nth);
        for (int b = 0; b < B; ++b)
            attention_row(ms[b], &ms[b]->layers[l], pos[b], ROW(qkv, z.qn, b), ROW(att, z.an, b), scores, nth);
        gemm_x(&L->o, 1, att, B, z.an, tmp, dim, nth);
        for (int b = 0; b < B; ++b) {
            float *hb = ROW(h, dim, b), *tb = ROW(tmp, dim, b);
            if (L->post_attn_norm) rms_norm(tb, L->post_attn_norm, dim, m->eps, tb);
            for (int i = 0; i < dim; ++i) hb[i] += tb[i];
            rms_norm(hb, L->ffn_norm, dim, m->eps, ROW(xn, dim, b));
        }
        if (L->ffn) mlp(&L->gate, &L->up, &L->down, L->ffn, L->act, xn, B, dim, gu, z.gn, d, dim, nth); /* -> d */
        for (int b = 0; b < B; ++b) {
            float *hb = ROW(h, dim, b), *db = ROW(d, dim, b), *fb = ROW(f, dim, b), *out = db;
            if (M && M->gemma) {
                rms_norm(hb, NULL, dim, m->eps, fb); /* the router reads the normed residual, scaled */
                for (int i = 0; i < dim; ++i) fb[i] *= M->router_scale[i];
                rms_norm(hb, M->pre_norm, dim, m->eps, xe);
                moe(m, M, fb, xe, fb, gu, ex, nth);
                rms_norm(db, M->post_dense, dim, m->eps, db);
                rms_norm(fb, M->post_moe, dim, m->eps, fb);
                for (int i = 0; i < dim; ++i) db[i] += fb[i];
            } else if (M) {
                moe(m, M, ROW(xn, dim, b), ROW(xn, dim, b), fb, gu, ex, nth);
                out = fb;
            }
            if (L->post_ffn_norm) rms_norm(out, L->post_ffn_norm, dim, m->eps, out);
            for (int i = 0; i < dim; ++i) hb[i] += out[i];
        }
        if (L->ple) {
            int P = L->ple_gate.n;
            gemm_x(&L->ple_gate, 1, h, B, dim, gu, z.gn, nth);
            for (int b = 0; b < B; ++b) {
                const float *pin = (ple_in ? ple_in + (int64_t)b * m->n_layer * m->ple_dim : ms[b]->ple_in) +
                                   (int64_t)l * m->ple_dim;
                float *g = ROW(gu, z.gn, b);
                for (int i = 0; i < P; ++i) g[i] = act_fn(1, g[i]) * pin[i];
            }
            gemm_x(&L->ple_proj, 1, gu, B, z.gn, tmp, dim, nth);
            for (int b = 0; b < B; ++b) {
                float *hb = ROW(h, dim, b), *tb = ROW(tmp, dim, b);
                rms_norm(tb, L->ple_norm, dim, m->eps, tb);
                for (int i = 0; i < dim; ++i) hb[i] += tb[i];
            }
        }
        if (L->out_scale != 1.f)
            for (int64_t i = 0; i < (int64_t)B * dim; ++i) h[i] *= L->out_scale;
    }
    int hr = head_rows < B ? (head_rows > 0 ? head_rows : 0) : B;
    for (int b = B - hr; b < B; ++b) rms_norm(ROW(h, dim, b), m->out_norm, dim, m->eps, ROW(xn, dim, b));
    if (hr) gemm_x(&m->out, 1, ROW(xn, dim, B - hr), hr, dim, logits, m->vocab, nth);
#undef ROW
    if (m->softcap > 0.f)
        for (int64_t i = 0; i < (int64_t)hr * m->vocab; ++i) logits[i] = tanhf(logits[i] / m->softcap) * m->softcap;
    pthread_mutex_unlock(&call_mu);
    return 0;
}

EG_API int64_t eg_step_scratch(const eg_model *m) { return eg_step_scratch_batch(m, 1); }

/* One token at position pos (eg_step_batch with one row, the model's own scratch). */
EG_API int eg_step(const eg_model *m, float *h, int pos, float *logits, int nth) {
    return eg_step_batch(&m, 1, h, &pos, logits, nth, m->scratch, NULL, 1);
}
