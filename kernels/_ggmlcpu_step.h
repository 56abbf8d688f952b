/*
 * The fused CPU decode step (included by _ggmlcpu.c): one token through every layer of a
 * pre-norm decoder (RMSNorm -> q/k/v -> [per-head q/k RMSNorm] -> RoPE -> attention over the
 * float32 KV cache -> output projection -> residual -> RMSNorm -> gated MLP (silu) -> residual),
 * then the final norm and the LM head, in one call: the matmuls are the kernels above, the rest
 * plain C on the calling thread, attention split over heads.
 *
 * The same arithmetic as the torch path of models/base.py (Block, Attention, MLP, Rope, attend)
 * with these kernels as its linears; kernels/cpu_step.py builds the structs from a loaded model
 * (and decides which models qualify) and the tests hold the logits against that path.
 */

typedef struct {
    const float *attn_norm, *ffn_norm;   /* [dim] */
    const float *q_norm, *k_norm;        /* [head_dim] or NULL */
    const float *bq, *bk, *bv;           /* biases or NULL */
    eg_mat qkv[3];                       /* q, k, v (same k = dim) */
    eg_mat o, gate, up, down;
    float *kc, *vc;                      /* cache [n_kv][n_ctx][head_dim] */
} eg_layer;

typedef struct {
    int32_t n_layer, dim, n_head, n_kv, head_dim, ffn, n_ctx, vocab, n_rot, neox;
    float eps, attn_scale, softcap;
    const float *rope_cos, *rope_sin;    /* [n_ctx][n_rot / 2] */
    const eg_layer *layers;
    const float *out_norm;               /* [dim] */
    eg_mat out;                          /* LM head [vocab, dim] */
    float *scratch;                      /* eg_step_scratch() floats */
} eg_model;

EG_API int64_t eg_step_scratch(const eg_model *m) {
    int64_t qkv = (int64_t)(m->n_head + 2 * m->n_kv) * m->head_dim;
    return m->dim * 2 + qkv + (int64_t)m->n_head * m->head_dim + (int64_t)m->n_head * m->n_ctx + 2 * (int64_t)m->ffn;
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

typedef struct {
    const eg_model *m;
    const eg_layer *L;
    const float *q;   /* [n_head][hd] */
    float *out;       /* [n_head][hd] */
    float *scores;    /* [n_head][n_ctx] */
    int n;            /* positions 0..n-1 visible */
} attn_job;

static void attn_task(void *vctx, int ith, int nth) {
    attn_job *j = (attn_job *)vctx;
    const eg_model *m = j->m;
    int hd = m->head_dim, g = m->n_head / m->n_kv, n = j->n;
    int h0 = m->n_head * ith / nth, h1 = m->n_head * (ith + 1) / nth;
    for (int h = h0; h < h1; ++h) {
        const float *q = j->q + (int64_t)h * hd;
        const float *K = j->L->kc + (int64_t)(h / g) * m->n_ctx * hd;
        const float *V = j->L->vc + (int64_t)(h / g) * m->n_ctx * hd;
        float *sc = j->scores + (int64_t)h * m->n_ctx, mx = -INFINITY;
        for (int t = 0; t < n; ++t) {
            const float *k = K + (int64_t)t * hd;
            float d = 0.f;
            for (int i = 0; i < hd; ++i) d += q[i] * k[i];
            sc[t] = d * m->attn_scale;
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

/* One token at position pos: h [dim] holds its embedding on entry (the residual stream, updated
 * in place); logits [vocab] receive the head's output. Returns 0, -1 (out of memory / bad pos). */
EG_API int eg_step(const eg_model *m, float *h, int pos, float *logits, int nth) {
    if (pos < 0 || pos >= m->n_ctx) return -1;
    int dim = m->dim, hd = m->head_dim, nq = m->n_head * hd, nkv = m->n_kv * hd, h2 = m->n_rot / 2;
    float *xn = m->scratch, *tmp = xn + dim, *qkv = tmp + dim, *att = qkv + nq + 2 * nkv;
    float *scores = att + nq, *gu = scores + (int64_t)m->n_head * m->n_ctx;
    const float *c = m->rope_cos + (int64_t)pos * h2, *s = m->rope_sin + (int64_t)pos * h2;
    pthread_mutex_lock(&call_mu);
    if (xbuf_for(1, m->ffn > dim ? m->ffn : dim)) {
        pthread_mutex_unlock(&call_mu);
        return -1;
    }
    for (int l = 0; l < m->n_layer; ++l) {
        const eg_layer *L = &m->layers[l];
        rms_norm(h, L->attn_norm, dim, m->eps, xn);
        linear1(L->qkv, 3, xn, qkv, nth);
        float *q = qkv, *k = qkv + nq, *v = k + nkv;
        if (L->bq) for (int i = 0; i < nq; ++i) q[i] += L->bq[i];
        if (L->bk) for (int i = 0; i < nkv; ++i) k[i] += L->bk[i];
        if (L->bv) for (int i = 0; i < nkv; ++i) v[i] += L->bv[i];
        if (L->q_norm) for (int i = 0; i < m->n_head; ++i) rms_norm(q + i * hd, L->q_norm, hd, m->eps, q + i * hd);
        if (L->k_norm) for (int i = 0; i < m->n_kv; ++i) rms_norm(k + i * hd, L->k_norm, hd, m->eps, k + i * hd);
        rope(q, m->n_head, hd, m->n_rot, m->neox, c, s);
        rope(k, m->n_kv, hd, m->n_rot, m->neox, c, s);
        for (int i = 0; i < m->n_kv; ++i) {
            memcpy(L->kc + ((int64_t)i * m->n_ctx + pos) * hd, k + (int64_t)i * hd, sizeof(float) * hd);
            memcpy(L->vc + ((int64_t)i * m->n_ctx + pos) * hd, v + (int64_t)i * hd, sizeof(float) * hd);
        }
        attn_job aj = {m, L, q, att, scores, pos + 1};
        run(attn_task, &aj, (int64_t)m->n_head * (pos + 1) * hd < 65536 ? 1 : nth);
        linear1(&L->o, 1, att, tmp, nth);
        for (int i = 0; i < dim; ++i) h[i] += tmp[i];
        rms_norm(h, L->ffn_norm, dim, m->eps, xn);
        eg_mat gate_up[2] = {L->gate, L->up};
        linear1(gate_up, 2, xn, gu, nth);
        for (int i = 0; i < m->ffn; ++i) {
            float g = gu[i];
            gu[i] = g / (1.f + expf(-g)) * gu[m->ffn + i];
        }
        linear1(&L->down, 1, gu, tmp, nth);
        for (int i = 0; i < dim; ++i) h[i] += tmp[i];
    }
    rms_norm(h, m->out_norm, dim, m->eps, xn);
    linear1(&m->out, 1, xn, logits, nth);
    if (m->softcap > 0.f)
        for (int i = 0; i < m->vocab; ++i) logits[i] = tanhf(logits[i] / m->softcap) * m->softcap;
    pthread_mutex_unlock(&call_mu);
    return 0;
}
