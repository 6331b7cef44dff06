/* Every op kind, whole: how the loader reads and validates it, its inverse on one row, its
 * forward and carried-back edit on a block of rows, and its ggml graph, kept together so a kind
 * is added (or read) in one place. The table at the end is indexed by op_kind; the drivers in
 * flow.c, flow_math.c, flow_steer.c and flow_graph.c never branch on a kind.
 *
 * Loading: every value from the file is validated before it is used, and validation costs at most
 * MAX_RANK operations per float of the file (a downloaded or uploaded file is untrusted). The
 * messages match innsteer_local/flow/ops.py's. */
#include "flow_ops.h"
#include "kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef ggml_api_T T;
typedef ggml_api_C C;

/* the file's name of tensor <suffix> of op k at site si, in the caller's buffer */
#define TNAME(buf, si, k, suffix) (snprintf(buf, sizeof buf, "site.%d.op.%d.%s", si, k, suffix), buf)

static void upload(const ggml_api *G, T *t, const void *data, size_t bytes) { G->ggml_backend_tensor_set(t, data, 0, bytes); }

/* Columns [from, from + cols) of every row of x (rows of width w): a strided view. */
static T *cols(const ggml_api *G, C *ctx, T *x, int w, int from, int cols_n, int64_t n) {
    return G->ggml_view_2d(ctx, x, cols_n, n, 4 * (size_t)w, 4 * (size_t)from);
}

/* Feature permutation y[i] = x[idx[i]] of every row: rows of the transpose, gathered. */
static T *permute_node(const ggml_api *G, C *ctx, T *x, T *idx) {
    T *xt = G->ggml_cont(ctx, G->ggml_transpose(ctx, x));
    return G->ggml_cont(ctx, G->ggml_transpose(ctx, G->ggml_get_rows(ctx, xt, idx)));
}

static size_t few_nodes(const flow_op *op) { return 12; }

/* ==== affine: y = x * scale + bias ========================================================= */

static innsteer_status affine_load(flow_loader *L, flow_site *s, flow_op *op, int si, int k, int n_embd) {
    char name[64];
    innsteer_status st;
    int dim = op->dim;
    if ((st = flow_load_vec(L, TNAME(name, si, k, "scale"), dim, &op->scale)) || (st = flow_load_vec(L, TNAME(name, si, k, "bias"), dim, &op->bias))) {
        return st;
    }
    for (int i = 0; i < dim; i++) {
        float a = fabsf(op->scale[i]);
        if (!(a >= 1e-6f && a <= 1e6f)) {
            return FAIL(L, INNSTEER_ERR_INVALID, "site %d op %d (affine): scale[%d] = %g is outside 1e-6..1e6 in magnitude", si,
                        k, i, (double)op->scale[i]);
        }
    }
    return INNSTEER_OK;
}

static void affine_inverse_row(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    for (int i = 0; i < op->dim; i++) v[i] = (v[i] - op->bias[i]) / op->scale[i];
}

static void affine_forward_block(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b) {
    int w = op->dim;
    for (int j = 0; j < n; j++) {
        const float *xi = x + (size_t)j * w;
        float *yi = y + (size_t)j * w;
        for (int i = 0; i < w; i++) yi[i] = xi[i] * op->scale[i] + op->bias[i];
    }
}

static void affine_inverse_delta_block(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                       block_scratch *b) {
    for (int j = 0; j < n; j++) {
        float *dj = d + (size_t)j * n_embd;
        for (int i = 0; i < op->dim; i++) dj[i] /= op->scale[i];
    }
}

static void affine_graph_weights(const ggml_api *G, C *w, const flow_op *op, int n_embd, op_tensors *o) {
    o->t[0] = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, op->dim);
    o->t[1] = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, op->dim);
}

static bool affine_graph_upload(const ggml_api *G, const flow_op *op, int n_embd, const op_tensors *o) {
    upload(G, o->t[0], op->scale, 4 * (size_t)op->dim);
    upload(G, o->t[1], op->bias, 4 * (size_t)op->dim);
    return true;
}

static T *affine_graph_forward(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x, int64_t n) {
    return G->ggml_add(ctx, G->ggml_mul(ctx, x, o->t[0]), o->t[1]);
}

static T *affine_graph_inverse_delta(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x_in, T *x_out, T *d,
                                     int64_t n) {
    return G->ggml_div(ctx, d, o->t[0]);
}

/* ==== subspace: y = basis x; the site keeps the orthogonal complement ====================== */

/* Nearly orthonormal rows, in O(rows * cols): every row's squared norm within tol of 1, and for
 * three fixed sign vectors v, B B^T v within tol * sqrt(rows) of v. The full Gram matrix would cost
 * rows^2 * cols; orthonormalise() makes the rows exactly orthonormal afterwards, so this only has
 * to refuse a basis that is not one. innsteer_local/flow/ops.py runs the same test. */
static bool rows_orthonormal(const float *b, int rows, int cols_n, float tol) {
    for (int i = 0; i < rows; i++) {
        double acc = 0.0;
        for (int k = 0; k < cols_n; k++) acc += (double)b[(size_t)i * cols_n + k] * b[(size_t)i * cols_n + k];
        if (!(fabs(acc - 1.0) <= tol)) return false;
    }
    double *w = malloc(sizeof(double) * (size_t)cols_n);
    if (!w) return false;
    bool ok = true;
    const double bound = tol * sqrt((double)rows);
    for (int p = 0; p < 3 && ok; p++) {
        uint32_t s = 2463534242u + (uint32_t)p * 7919u;
        for (int k = 0; k < cols_n; k++) w[k] = 0.0;
        for (int i = 0; i < rows; i++) { /* w = B^T v, v_i = +-1 from xorshift32 */
            const double v = (xorshift32(&s) & 1u) ? 1.0 : -1.0;
            for (int k = 0; k < cols_n; k++) w[k] += v * b[(size_t)i * cols_n + k];
        }
        s = 2463534242u + (uint32_t)p * 7919u;
        for (int i = 0; i < rows && ok; i++) { /* (B w)_i against v_i */
            const double v = (xorshift32(&s) & 1u) ? 1.0 : -1.0;
            double acc = 0.0;
            for (int k = 0; k < cols_n; k++) acc += (double)b[(size_t)i * cols_n + k] * w[k];
            ok = fabs(acc - v) <= bound;
        }
    }
    free(w);
    return ok;
}

/* Modified Gram-Schmidt in double, in place: the project/lift pair is exact only for an
 * orthonormal basis, and f16 storage or rounding leaves it slightly off. The Python reader
 * (innsteer_local/flow/ops.py) runs the same loop, so both readers end with the same basis. */
static bool orthonormalise(float *b, int rows, int cols_n) {
    double *q = malloc(sizeof(double) * (size_t)rows * (size_t)cols_n);
    if (!q) return false;
    for (int k = 0; k < rows; k++) {
        double *v = q + (size_t)k * cols_n;
        for (int i = 0; i < cols_n; i++) v[i] = b[(size_t)k * cols_n + i];
        for (int j = 0; j < k; j++) {
            const double *u = q + (size_t)j * cols_n;
            double d = 0.0;
            for (int i = 0; i < cols_n; i++) d += v[i] * u[i];
            for (int i = 0; i < cols_n; i++) v[i] -= d * u[i];
        }
        double norm = 0.0;
        for (int i = 0; i < cols_n; i++) norm += v[i] * v[i];
        norm = sqrt(norm);
        for (int i = 0; i < cols_n; i++) v[i] /= norm;
    }
    for (size_t i = 0; i < (size_t)rows * cols_n; i++) b[i] = (float)q[i];
    free(q);
    return true;
}

static innsteer_status subspace_load(flow_loader *L, flow_site *s, flow_op *op, int si, int k, int n_embd) {
    char name[64];
    innsteer_status st;
    if (s->subspace_at >= 0) return FAIL(L, INNSTEER_ERR_INVALID, "site %d: more than one subspace op", si);
    if (op->dim != n_embd) return FAIL(L, INNSTEER_ERR_INVALID, "site %d op %d: subspace must act on the full n_embd", si, k);
    const ggufr_tensor *t = ggufr_find_tensor(&L->g, TNAME(name, si, k, "basis"));
    if (!t) return FAIL(L, INNSTEER_ERR_INVALID, "missing tensor '%s'", name);
    const int max_rank = n_embd < MAX_RANK ? n_embd : MAX_RANK;
    if (t->ne[1] < 1 || t->ne[1] > (uint64_t)max_rank) {
        return FAIL(L, INNSTEER_ERR_INVALID, "site %d op %d: subspace rank %llu outside 1..%d", si, k, (unsigned long long)t->ne[1],
                    max_rank);
    }
    op->rank = (int)t->ne[1];
    if ((st = flow_load_mat(L, name, op->rank, n_embd, &op->basis))) return st;
    if (!rows_orthonormal(op->basis, op->rank, n_embd, 1e-2f)) {
        return FAIL(L, INNSTEER_ERR_INVALID, "site %d op %d: subspace basis rows are not orthonormal", si, k);
    }
    if (!orthonormalise((float *)op->basis, op->rank, n_embd)) return FAIL(L, INNSTEER_ERR_NOMEM, "out of memory");
    s->subspace_at = k;
    op->out_dim = op->rank;
    return INNSTEER_OK;
}

static void subspace_inverse_row(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    /* nothing: flow_site_inverse_row projects and lifts, so the complement is kept */
}

static void subspace_forward_block(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b) {
    matmat(op->basis, NULL, x, (size_t)n_embd, y, (size_t)op->rank, op->rank, n_embd, n);
}

static void subspace_inverse_delta_block(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                         block_scratch *b) {
    /* d (rank wide) -> basis^T d (n_embd wide); each basis row is read once per block */
    memset(b->tmp, 0, sizeof(float) * (size_t)n * n_embd);
    for (int k = 0; k < op->rank; k++) {
        const float *u = op->basis + (size_t)k * n_embd;
        for (int j = 0; j < n; j++) {
            float c = d[(size_t)j * n_embd + k];
            if (c == 0.0f) continue;
            float *t = b->tmp + (size_t)j * n_embd;
            for (int i = 0; i < n_embd; i++) t[i] += c * u[i];
        }
    }
    memcpy(d, b->tmp, sizeof(float) * (size_t)n * n_embd);
}

/* t[0]: the basis (rank rows of n_embd), t[1]: its transpose */
static void subspace_graph_weights(const ggml_api *G, C *w, const flow_op *op, int n_embd, op_tensors *o) {
    o->t[0] = G->ggml_new_tensor_2d(w, GGML_API_TYPE_F32, n_embd, op->rank);
    o->t[1] = G->ggml_new_tensor_2d(w, GGML_API_TYPE_F32, op->rank, n_embd);
}

static bool subspace_graph_upload(const ggml_api *G, const flow_op *op, int n_embd, const op_tensors *o) {
    float *bt = malloc(sizeof(float) * (size_t)op->rank * n_embd);
    if (!bt) return false;
    upload(G, o->t[0], op->basis, 4 * (size_t)op->rank * n_embd);
    for (int r = 0; r < op->rank; r++) {
        for (int i = 0; i < n_embd; i++) bt[(size_t)i * op->rank + r] = op->basis[(size_t)r * n_embd + i];
    }
    upload(G, o->t[1], bt, 4 * (size_t)op->rank * n_embd);
    free(bt);
    return true;
}

static T *subspace_graph_forward(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x, int64_t n) {
    return G->ggml_mul_mat(ctx, o->t[0], x);
}

static T *subspace_graph_inverse_delta(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x_in, T *x_out, T *d,
                                       int64_t n) {
    return G->ggml_mul_mat(ctx, o->t[1], d);
}

/* ==== coupling: x[d1:] = x[d1:] * exp(s) + t, (s_raw, t) = mlp(x[:d1]), s = clamp * tanh(s_raw / clamp) */

static innsteer_status coupling_load(flow_loader *L, flow_site *s, flow_op *op, int si, int k, int n_embd) {
    char key[128], name[64];
    innsteer_status st;
    int dim = op->dim;
    if (dim < 2) return FAIL(L, INNSTEER_ERR_INVALID, "site %d op %d: coupling needs width >= 2, got %d", si, k, dim);
    op->d1 = dim / 2;
    op->d2 = dim - op->d1;
    uint32_t n_layers = 0;
    snprintf(key, sizeof key, "innsteer.site.%d.op.%d.mlp_layers", si, k);
    if (!ggufr_get_u32(&L->g, key, &n_layers) || n_layers < 1 || n_layers > MAX_MLP_LAYERS) {
        return FAIL(L, INNSTEER_ERR_INVALID, "%s must be a u32 in 1..%d", key, MAX_MLP_LAYERS);
    }
    op->n_layers = (int)n_layers;
    snprintf(key, sizeof key, "innsteer.site.%d.op.%d.clamp", si, k);
    if (!ggufr_get_f32(&L->g, key, &op->clamp) || !(op->clamp > 0.0f && op->clamp <= 20.0f)) {
        return FAIL(L, INNSTEER_ERR_INVALID, "%s must be an f32 in (0, 20]", key);
    }
    snprintf(key, sizeof key, "innsteer.site.%d.op.%d.activation", si, k);
    ggufr_str act;
    if (!ggufr_get_str(&L->g, key, &act)) return FAIL(L, INNSTEER_ERR_INVALID, "missing string %s", key);
    if (ggufr_str_eq(act, "relu")) op->act = ACT_RELU;
    else if (ggufr_str_eq(act, "tanh")) op->act = ACT_TANH;
    else if (ggufr_str_eq(act, "silu")) op->act = ACT_SILU;
    else return FAIL(L, INNSTEER_ERR_UNSUPPORTED, "%s: unknown activation '%.*s'", key, (int)(act.len > 40 ? 40 : act.len), act.ptr);
    op->width[0] = op->d1;
    for (int j = 0; j < op->n_layers; j++) {
        char wn[16];
        snprintf(wn, sizeof wn, "w%d", j);
        const ggufr_tensor *t = ggufr_find_tensor(&L->g, TNAME(name, si, k, wn));
        if (!t) return FAIL(L, INNSTEER_ERR_INVALID, "missing tensor '%s'", name);
        int out = j + 1 == op->n_layers ? 2 * op->d2 : (int)(t->ne[1] <= MAX_WIDTH ? t->ne[1] : MAX_WIDTH + 1);
        if (out > MAX_WIDTH) return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s': hidden width above %d", name, MAX_WIDTH);
        op->width[j + 1] = out;
        if ((st = flow_load_mat(L, name, out, op->width[j], &op->w[j]))) return st;
        snprintf(wn, sizeof wn, "b%d", j);
        if ((st = flow_load_vec(L, TNAME(name, si, k, wn), out, &op->b[j]))) return st;
    }
    return INNSTEER_OK;
}

/* (s_raw, t) of a coupling for one conditioning vector; returns the conditioner's output layer. */
static const float *coupling_params(const flow_op *op, const float *cond, float *ha, float *hb) {
    const float *in = cond;
    float *bufs[2] = {ha, hb};
    for (int k = 0; k < op->n_layers; k++) {
        float *out = bufs[k & 1];
        matvec(op->w[k], op->b[k], in, out, op->width[k + 1], op->width[k]);
        if (k + 1 < op->n_layers) {
            for (int j = 0; j < op->width[k + 1]; j++) out[j] = activate(op->act, out[j]);
        }
        in = out;
    }
    return in;
}

static void coupling_inverse_row(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    const float *p = coupling_params(op, v, ha, hb);
    float *x = v + op->d1;
    for (int i = 0; i < op->d2; i++) {
        float s = op->clamp * tanhf(p[i] / op->clamp);
        x[i] = (x[i] - p[op->d2 + i]) * expf(-s);
    }
}

/* (s_raw, t) of a coupling for n conditioning vectors (stride ldc); returns the output layer,
 * one row of 2*d2 per vector. */
static const float *conditioner(const flow_op *op, const float *cond, size_t ldc, int n, block_scratch *b) {
    const float *in = cond;
    size_t ld_in = ldc;
    float *bufs[2] = {b->ha, b->hb};
    for (int k = 0; k < op->n_layers; k++) {
        float *out = bufs[k & 1];
        int w = op->width[k + 1];
        matmat(op->w[k], op->b[k], in, ld_in, out, (size_t)w, w, op->width[k], n);
        if (k + 1 < op->n_layers) {
            for (size_t i = 0; i < (size_t)n * w; i++) out[i] = activate(op->act, out[i]);
        }
        in = out;
        ld_in = (size_t)w;
    }
    return in;
}

static void coupling_forward_block(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b) {
    int w = op->dim;
    const float *p = conditioner(op, x, (size_t)w, n, b);
    for (int j = 0; j < n; j++) {
        const float *xi = x + (size_t)j * w, *pj = p + (size_t)j * 2 * op->d2;
        float *yi = y + (size_t)j * w;
        memcpy(yi, xi, sizeof(float) * (size_t)op->d1);
        for (int i = 0; i < op->d2; i++) {
            float s = op->clamp * tanhf(pj[i] / op->clamp);
            yi[op->d1 + i] = xi[op->d1 + i] * expf(s) + pj[op->d2 + i];
        }
    }
}

static void coupling_inverse_delta_block(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                         block_scratch *b) {
    int w = op->dim;
    /* condition on the moved first half; where it did not move (x + 0 is exact) s and t equal the
     * forward pass and the inverse is linear in the edit */
    for (int j = 0; j < n; j++) {
        const float *xi = x_in + (size_t)j * w, *dj = d + (size_t)j * n_embd;
        float *c = b->cond + (size_t)j * op->d1;
        for (int i = 0; i < op->d1; i++) c[i] = xi[i] + dj[i];
    }
    const float *p = conditioner(op, b->cond, (size_t)op->d1, n, b);
    for (int j = 0; j < n; j++) {
        const float *xi = x_in + (size_t)j * w, *xo = x_out + (size_t)j * w, *pj = p + (size_t)j * 2 * op->d2;
        float *dj = d + (size_t)j * n_embd;
        bool moved = false;
        for (int i = 0; i < op->d1; i++) moved = moved || dj[i] != 0.0f;
        for (int i = 0; i < op->d2; i++) {
            float s = op->clamp * tanhf(pj[i] / op->clamp);
            if (!moved) {
                dj[op->d1 + i] *= expf(-s);
            } else {
                float x2 = (xo[op->d1 + i] + dj[op->d1 + i] - pj[op->d2 + i]) * expf(-s);
                dj[op->d1 + i] = x2 - xi[op->d1 + i];
            }
        }
    }
}

static size_t coupling_graph_nodes(const flow_op *op) { return 40 + 8 * (size_t)op->n_layers; }

/* t[2j]: w_j, t[2j + 1]: b_j */
static void coupling_graph_weights(const ggml_api *G, C *w, const flow_op *op, int n_embd, op_tensors *o) {
    for (int j = 0; j < op->n_layers; j++) {
        o->t[2 * j] = G->ggml_new_tensor_2d(w, GGML_API_TYPE_F32, op->width[j], op->width[j + 1]);
        o->t[2 * j + 1] = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, op->width[j + 1]);
    }
}

static bool coupling_graph_upload(const ggml_api *G, const flow_op *op, int n_embd, const op_tensors *o) {
    for (int j = 0; j < op->n_layers; j++) {
        upload(G, o->t[2 * j], op->w[j], 4 * (size_t)op->width[j] * op->width[j + 1]);
        upload(G, o->t[2 * j + 1], op->b[j], 4 * (size_t)op->width[j + 1]);
    }
    return true;
}

static T *activate_node(const ggml_api *G, C *ctx, act_kind act, T *x) {
    switch (act) {
        case ACT_RELU: return G->ggml_relu(ctx, x);
        case ACT_TANH: return G->ggml_tanh(ctx, x);
        case ACT_SILU: return G->ggml_silu(ctx, x);
    }
    return x;
}

/* (s, t) of a coupling for conditioning rows cond (contiguous, width d1): s = c tanh(s_raw / c). */
static void conditioner_node(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *cond, int64_t n, T **s, T **t) {
    T *h = cond;
    for (int j = 0; j < op->n_layers; j++) {
        h = G->ggml_add(ctx, G->ggml_mul_mat(ctx, o->t[2 * j], h), o->t[2 * j + 1]);
        if (j + 1 < op->n_layers) h = activate_node(G, ctx, op->act, h);
    }
    int d2 = op->d2;
    /* unary ops want contiguous input on some backends */
    T *s_raw = G->ggml_cont(ctx, cols(G, ctx, h, 2 * d2, 0, d2, n));
    *s = G->ggml_scale(ctx, G->ggml_tanh(ctx, G->ggml_scale(ctx, s_raw, 1.0f / op->clamp)), op->clamp);
    *t = cols(G, ctx, h, 2 * d2, d2, d2, n);
}

static T *coupling_graph_forward(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x, int64_t n) {
    T *s, *t;
    T *x1 = cols(G, ctx, x, op->dim, 0, op->d1, n);
    conditioner_node(G, ctx, op, o, G->ggml_cont(ctx, x1), n, &s, &t);
    T *y2 = G->ggml_add(ctx, G->ggml_mul(ctx, cols(G, ctx, x, op->dim, op->d1, op->d2, n), G->ggml_exp(ctx, s)), t);
    return G->ggml_concat(ctx, x1, y2, 0);
}

static T *coupling_graph_inverse_delta(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x_in, T *x_out, T *d,
                                       int64_t n) {
    /* condition on the moved first half; x2' = (x_out2 + d2 - t) exp(-s), edit x2' - x_in2 */
    int w = op->dim, d1 = op->d1, d2 = op->d2;
    T *dd1 = cols(G, ctx, d, w, 0, d1, n);
    T *cond = G->ggml_add(ctx, cols(G, ctx, x_in, w, 0, d1, n), dd1);
    T *s, *t;
    conditioner_node(G, ctx, op, o, cond, n, &s, &t);
    T *u = G->ggml_sub(ctx, G->ggml_add(ctx, cols(G, ctx, x_out, w, d1, d2, n), cols(G, ctx, d, w, d1, d2, n)), t);
    u = G->ggml_mul(ctx, u, G->ggml_exp(ctx, G->ggml_scale(ctx, s, -1.0f)));
    T *e2 = G->ggml_sub(ctx, u, cols(G, ctx, x_in, w, d1, d2, n));
    return G->ggml_concat(ctx, dd1, e2, 0);
}

/* ==== permute: y[i] = x[perm[i]] =========================================================== */

static innsteer_status permute_load(flow_loader *L, flow_site *s, flow_op *op, int si, int k, int n_embd) {
    char name[64];
    innsteer_status st;
    int dim = op->dim;
    if ((st = flow_load_tensor(L, TNAME(name, si, k, "perm"), 1, dim, true, (const void **)&op->perm))) return st;
    /* a permutation: every index in range and seen once */
    uint8_t *seen = calloc((size_t)dim, 1);
    if (!seen) return FAIL(L, INNSTEER_ERR_NOMEM, "out of memory");
    for (int i = 0; i < dim; i++) {
        int32_t p = op->perm[i];
        if (p < 0 || p >= dim || seen[p]) {
            free(seen);
            return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s' is not a permutation of 0..%d (entry %d = %d)", name, dim - 1, i, p);
        }
        seen[p] = 1;
    }
    free(seen);
    return INNSTEER_OK;
}

static void permute_inverse_row(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    for (int i = 0; i < op->dim; i++) tmp[op->perm[i]] = v[i];
    memcpy(v, tmp, sizeof(float) * (size_t)op->dim);
}

static void permute_forward_block(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b) {
    int w = op->dim;
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < w; i++) y[(size_t)j * w + i] = x[(size_t)j * w + op->perm[i]];
    }
}

static void permute_inverse_delta_block(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                        block_scratch *b) {
    int w = op->dim;
    for (int j = 0; j < n; j++) {
        float *dj = d + (size_t)j * n_embd, *t = b->tmp + (size_t)j * n_embd;
        for (int i = 0; i < w; i++) t[op->perm[i]] = dj[i];
        memcpy(dj, t, sizeof(float) * (size_t)w);
    }
}

/* t[0]: perm, t[1]: its inverse (i32) */
static void permute_graph_weights(const ggml_api *G, C *w, const flow_op *op, int n_embd, op_tensors *o) {
    o->t[0] = G->ggml_new_tensor_1d(w, GGML_API_TYPE_I32, op->dim);
    o->t[1] = G->ggml_new_tensor_1d(w, GGML_API_TYPE_I32, op->dim);
}

static bool permute_graph_upload(const ggml_api *G, const flow_op *op, int n_embd, const op_tensors *o) {
    int32_t *inv = malloc(sizeof(int32_t) * (size_t)op->dim);
    if (!inv) return false;
    upload(G, o->t[0], op->perm, 4 * (size_t)op->dim);
    for (int i = 0; i < op->dim; i++) inv[op->perm[i]] = i;
    upload(G, o->t[1], inv, 4 * (size_t)op->dim);
    free(inv);
    return true;
}

static T *permute_graph_forward(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x, int64_t n) {
    return permute_node(G, ctx, x, o->t[0]);
}

static T *permute_graph_inverse_delta(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x_in, T *x_out, T *d,
                                      int64_t n) {
    return permute_node(G, ctx, d, o->t[1]);
}

/* ==== linear: y = matrix x + bias, x = matrix_inv (y - bias) =============================== */

static innsteer_status linear_load(flow_loader *L, flow_site *s, flow_op *op, int si, int k, int n_embd) {
    char name[64];
    innsteer_status st;
    int dim = op->dim;
    if ((st = flow_load_mat(L, TNAME(name, si, k, "matrix"), dim, dim, &op->matrix)) ||
        (st = flow_load_mat(L, TNAME(name, si, k, "matrix_inv"), dim, dim, &op->matrix_inv)) ||
        (st = flow_load_vec(L, TNAME(name, si, k, "bias"), dim, &op->lbias))) {
        return st;
    }
    return INNSTEER_OK;
}

static void linear_inverse_row(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    for (int i = 0; i < op->dim; i++) v[i] -= op->lbias[i];
    matvec(op->matrix_inv, NULL, v, tmp, op->dim, op->dim);
    memcpy(v, tmp, sizeof(float) * (size_t)op->dim);
}

static void linear_forward_block(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b) {
    int w = op->dim;
    matmat(op->matrix, op->lbias, x, (size_t)w, y, (size_t)w, w, w, n);
}

static void linear_inverse_delta_block(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                       block_scratch *b) {
    int w = op->dim;
    matmat(op->matrix_inv, NULL, d, (size_t)n_embd, b->tmp, (size_t)n_embd, w, w, n);
    for (int j = 0; j < n; j++) memcpy(d + (size_t)j * n_embd, b->tmp + (size_t)j * n_embd, sizeof(float) * (size_t)w);
}

/* t[0]: matrix, t[1]: matrix_inv, t[2]: bias */
static void linear_graph_weights(const ggml_api *G, C *w, const flow_op *op, int n_embd, op_tensors *o) {
    o->t[0] = G->ggml_new_tensor_2d(w, GGML_API_TYPE_F32, op->dim, op->dim);
    o->t[1] = G->ggml_new_tensor_2d(w, GGML_API_TYPE_F32, op->dim, op->dim);
    o->t[2] = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, op->dim);
}

static bool linear_graph_upload(const ggml_api *G, const flow_op *op, int n_embd, const op_tensors *o) {
    upload(G, o->t[0], op->matrix, 4 * (size_t)op->dim * op->dim);
    upload(G, o->t[1], op->matrix_inv, 4 * (size_t)op->dim * op->dim);
    upload(G, o->t[2], op->lbias, 4 * (size_t)op->dim);
    return true;
}

static T *linear_graph_forward(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x, int64_t n) {
    return G->ggml_add(ctx, G->ggml_mul_mat(ctx, o->t[0], x), o->t[2]);
}

static T *linear_graph_inverse_delta(const ggml_api *G, C *ctx, const flow_op *op, const op_tensors *o, T *x_in, T *x_out, T *d,
                                     int64_t n) {
    return G->ggml_mul_mat(ctx, o->t[1], d);
}

/* ==== the table ============================================================================ */

#define OP_KIND(kind, nodes)                                                                                                    \
    {                                                                                                                           \
        .name = #kind, .load = kind##_load, .inverse_row = kind##_inverse_row, .forward_block = kind##_forward_block,         \
        .inverse_delta_block = kind##_inverse_delta_block, .graph_nodes = nodes, .graph_weights = kind##_graph_weights,       \
        .graph_upload = kind##_graph_upload, .graph_forward = kind##_graph_forward,                                           \
        .graph_inverse_delta = kind##_graph_inverse_delta,                                                                    \
    }

const op_kind_impl OP_KIND_IMPLS[N_OP_KINDS] = {
    [OP_AFFINE] = OP_KIND(affine, few_nodes),
    [OP_SUBSPACE] = OP_KIND(subspace, few_nodes),
    [OP_COUPLING] = OP_KIND(coupling, coupling_graph_nodes),
    [OP_PERMUTE] = OP_KIND(permute, few_nodes),
    [OP_LINEAR] = OP_KIND(linear, few_nodes),
};
