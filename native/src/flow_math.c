/* phi^-1 on one row: the exact inverse map, for innsteer_flow_inverse and the loader's
 * round-trip check. Steering never inverts a whole row (flow_steer.c carries the edit back as a
 * difference instead), so this path is kept simple rather than blocked. */
#include "flow.h"
#include "kernels.h"

#include <math.h>
#include <string.h>

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
            break; /* handled by the site, which keeps the orthogonal complement */
    }
}

static void run_inverse(const flow_site *s, int from, int to, float *v, float *tmp, float *ha, float *hb) {
    for (int k = to - 1; k >= from; k--) op_inverse(&s->ops[k], v, tmp, ha, hb);
}

/* Undoes flow_site_forward_rows: with a subspace, the ops after it are inverted on the projection
 * and the change lifted back, so the complement passes through unchanged. */
void flow_site_inverse_row(const flow_site *s, int n_embd, const float *in, float *out, float *scratch) {
    float *x = scratch, *y = x + n_embd, *y0 = y + n_embd, *tmp = y0 + n_embd, *ha = tmp + n_embd, *hb = ha + s->widest;
    int sub = s->subspace_at;
    memcpy(x, in, sizeof(float) * (size_t)n_embd);
    if (sub >= 0) {
        const flow_op *op = &s->ops[sub];
        matvec(op->basis, NULL, x, y, op->rank, n_embd);
        memcpy(y0, y, sizeof(float) * (size_t)s->latent_dim);
        run_inverse(s, sub + 1, s->n_ops, y, tmp, ha, hb);
        subspace_lift(op, x, y, y0, n_embd);
    }
    run_inverse(s, 0, sub >= 0 ? sub : s->n_ops, x, tmp, ha, hb);
    memcpy(out, x, sizeof(float) * (size_t)n_embd);
}
