/* Row kernels of the flow ops. Each op knows its forward and inverse together. */
#include "flow.h"
#include "kernels.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

/* Eight independent partial sums: the compiler vectorises them without -ffast-math, and the
 * rounding error grows with n/8 instead of n. */
/* Conditioner output (s_raw, t) for a coupling, written to out[0 .. 2*d2). */
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

static void op_forward(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    switch (op->kind) {
        case OP_AFFINE:
            for (int i = 0; i < op->dim; i++) v[i] = v[i] * op->scale[i] + op->bias[i];
            break;
        case OP_COUPLING: {
            const float *p = coupling_params(op, v, ha, hb);
            float *x = v + op->d1;
            for (int i = 0; i < op->d2; i++) {
                float s = op->clamp * tanhf(p[i] / op->clamp);
                x[i] = x[i] * expf(s) + p[op->d2 + i];
            }
            break;
        }
        case OP_PERMUTE:
            for (int i = 0; i < op->dim; i++) tmp[i] = v[op->perm[i]];
            memcpy(v, tmp, sizeof(float) * (size_t)op->dim);
            break;
        case OP_LINEAR:
            matvec(op->matrix, op->lbias, v, tmp, op->dim, op->dim);
            memcpy(v, tmp, sizeof(float) * (size_t)op->dim);
            break;
        case OP_SUBSPACE:
            break; /* handled by the site, which keeps the orthogonal complement */
    }
}

static void op_inverse(const flow_op *op, float *v, float *tmp, float *ha, float *hb) {
    switch (op->kind) {
        case OP_AFFINE:
            for (int i = 0; i < op->dim; i++) v[i] = (v[i] - op->bias[i]) / op->scale[i];
            break;
        case OP_COUPLING: {
            const float *p = coupling_params(op, v, ha, hb);
            float *x = v + op->d1;
            for (int i = 0; i < op->d2; i++) {
                float s = op->clamp * tanhf(p[i] / op->clamp);
                x[i] = (x[i] - p[op->d2 + i]) * expf(-s);
            }
            break;
        }
        case OP_PERMUTE:
            for (int i = 0; i < op->dim; i++) tmp[op->perm[i]] = v[i];
            memcpy(v, tmp, sizeof(float) * (size_t)op->dim);
            break;
        case OP_LINEAR:
            for (int i = 0; i < op->dim; i++) v[i] -= op->lbias[i];
            matvec(op->matrix_inv, NULL, v, tmp, op->dim, op->dim);
            memcpy(v, tmp, sizeof(float) * (size_t)op->dim);
            break;
        case OP_SUBSPACE:
            break;
    }
}

typedef struct {
    float *x, *y, *y0, *tmp, *ha, *hb;
} row_scratch;

static row_scratch split_scratch(const flow_site *s, int n_embd, float *scratch) {
    row_scratch r;
    r.x = scratch;
    r.y = r.x + n_embd;
    r.y0 = r.y + n_embd;
    r.tmp = r.y0 + n_embd;
    r.ha = r.tmp + n_embd;
    r.hb = r.ha + s->widest;
    return r;
}

/* Projects x onto the subspace basis: y = basis x. */
static void project(const flow_op *op, const float *x, float *y, int n_embd) {
    matvec(op->basis, NULL, x, y, op->rank, n_embd);
}

/* x += basis^T (y - y0) (y0 NULL: x += basis^T y): moves x within the subspace only, the
 * complement stays bit-exact. */
static void lift(const flow_op *op, float *x, const float *y, const float *y0, int n_embd) {
    for (int k = 0; k < op->rank; k++) {
        float d = y0 ? y[k] - y0[k] : y[k];
        if (d == 0.0f) continue;
        const float *u = op->basis + (size_t)k * n_embd;
        for (int i = 0; i < n_embd; i++) x[i] += d * u[i];
    }
}

static void run_forward(const flow_site *s, int from, int to, float *v, row_scratch *r) {
    for (int k = from; k < to; k++) op_forward(&s->ops[k], v, r->tmp, r->ha, r->hb);
}

static void run_inverse(const flow_site *s, int from, int to, float *v, row_scratch *r) {
    for (int k = to - 1; k >= from; k--) op_inverse(&s->ops[k], v, r->tmp, r->ha, r->hb);
}

/* The latent of a site with a subspace is x + basis^T (g(basis x) - basis x): n_embd wide, the
 * complement of the subspace passes through unchanged. */
void flow_site_forward_row(const flow_site *s, int n_embd, const float *in, float *out, float *scratch) {
    row_scratch r = split_scratch(s, n_embd, scratch);
    int sub = s->subspace_at;
    int pre_end = sub >= 0 ? sub : s->n_ops;
    memcpy(r.x, in, sizeof(float) * (size_t)n_embd);
    run_forward(s, 0, pre_end, r.x, &r);
    if (sub >= 0) {
        project(&s->ops[sub], r.x, r.y, n_embd);
        memcpy(r.y0, r.y, sizeof(float) * (size_t)s->latent_dim);
        run_forward(s, sub + 1, s->n_ops, r.y, &r);
        lift(&s->ops[sub], r.x, r.y, r.y0, n_embd);
    }
    memcpy(out, r.x, sizeof(float) * (size_t)n_embd);
}

void flow_site_inverse_row(const flow_site *s, int n_embd, const float *in, float *out, float *scratch) {
    row_scratch r = split_scratch(s, n_embd, scratch);
    int sub = s->subspace_at;
    int pre_end = sub >= 0 ? sub : s->n_ops;
    memcpy(r.x, in, sizeof(float) * (size_t)n_embd);
    if (sub >= 0) {
        project(&s->ops[sub], r.x, r.y, n_embd);
        memcpy(r.y0, r.y, sizeof(float) * (size_t)s->latent_dim);
        run_inverse(s, sub + 1, s->n_ops, r.y, &r);
        lift(&s->ops[sub], r.x, r.y, r.y0, n_embd);
    }
    run_inverse(s, 0, pre_end, r.x, &r);
    memcpy(out, r.x, sizeof(float) * (size_t)n_embd);
}
