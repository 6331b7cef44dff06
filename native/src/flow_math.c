/* Row kernels of the flow ops. Each op knows its forward and inverse together. */
#include "flow.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

/* Eight independent partial sums: the compiler vectorises them without -ffast-math, and the
 * rounding error grows with n/8 instead of n. */
static float dot(const float *restrict a, const float *restrict b, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    }
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

static void matvec(const float *restrict m, const float *restrict bias, const float *restrict x, float *restrict y,
                   int rows, int cols) {
    for (int r = 0; r < rows; r++) y[r] = dot(m + (size_t)r * cols, x, cols) + (bias ? bias[r] : 0.0f);
}

static float activate(act_kind act, float v) {
    switch (act) {
        case ACT_RELU: return v > 0.0f ? v : 0.0f;
        case ACT_TANH: return tanhf(v);
        case ACT_SILU: return v / (1.0f + expf(-v));
    }
    return v;
}

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

/* Carries a latent edit back to raw space as a difference: each op maps (its forward input,
 * its forward output, the edit of its output) to the edit of its input. The result is h + dh, so
 * rounding error scales with the edit, not with |h|; an op that is the identity (a coupling at its
 * zero initialisation) passes the edit through bit-exactly, and the rest of h is never touched. */
static void op_inverse_delta(const flow_op *op, const float *x_in, const float *x_out, float *d, float *tmp, float *ha,
                             float *hb) {
    switch (op->kind) {
        case OP_AFFINE:
            for (int i = 0; i < op->dim; i++) d[i] /= op->scale[i];
            break;
        case OP_PERMUTE:
            for (int i = 0; i < op->dim; i++) tmp[op->perm[i]] = d[i];
            memcpy(d, tmp, sizeof(float) * (size_t)op->dim);
            break;
        case OP_LINEAR:
            matvec(op->matrix_inv, NULL, d, tmp, op->dim, op->dim);
            memcpy(d, tmp, sizeof(float) * (size_t)op->dim);
            break;
        case OP_COUPLING: {
            bool cond_moved = false;
            for (int i = 0; i < op->d1; i++) cond_moved = cond_moved || d[i] != 0.0f;
            float *d2 = d + op->d1;
            if (!cond_moved) { /* same s and t as the forward pass: the inverse is linear in the edit */
                const float *p = coupling_params(op, x_in, ha, hb);
                for (int i = 0; i < op->d2; i++) d2[i] *= expf(-op->clamp * tanhf(p[i] / op->clamp));
                break;
            }
            for (int i = 0; i < op->d1; i++) tmp[i] = x_in[i] + d[i];
            const float *p = coupling_params(op, tmp, ha, hb);
            for (int i = 0; i < op->d2; i++) {
                float s = op->clamp * tanhf(p[i] / op->clamp);
                float x2 = (x_out[op->d1 + i] + d2[i] - p[op->d2 + i]) * expf(-s);
                d2[i] = x2 - x_in[op->d1 + i];
            }
            break;
        }
        case OP_SUBSPACE:
            break; /* handled by the caller: it changes the width */
    }
}

size_t flow_site_acts_floats(const flow_site *s, int n_embd) {
    size_t acts = 0;
    for (int k = 0; k < s->n_ops; k++) acts += (size_t)(s->subspace_at >= 0 && k >= s->subspace_at ? s->latent_dim : n_embd);
    return acts;
}

/* The share of the edit this row gets: 1 without a gate. */
static float gate_weight(const flow_site *s, innsteer_gate gate, float strength, const float *z) {
    int w = s->latent_dim;
    if (gate == INNSTEER_GATE_DENSITY) {
        float dist2 = 0.0f;
        for (int i = 0; i < w; i++) dist2 += (z[i] - s->gate_center[i]) * (z[i] - s->gate_center[i]);
        return 1.0f / (1.0f + expf((dist2 / (float)w - s->gate_radius) / s->gate_softness));
    }
    if (gate == INNSTEER_GATE_TARGET) {
        float norm2 = dot(s->delta, s->delta, w);
        if (norm2 <= 0.0f || strength == 0.0f) return 0.0f;
        float proj = dot(z, s->delta, w) / sqrtf(norm2);
        float target = strength > 0.0f ? s->gate_target_pos : s->gate_target_neg;
        /* the multiple of delta that reaches the target, capped by the strength */
        float need = (target - proj) / sqrtf(norm2);
        float k = strength > 0.0f ? fminf(fmaxf(need, 0.0f), strength) : fmaxf(fminf(need, 0.0f), strength);
        return k / strength;
    }
    return 1.0f;
}

void flow_site_steer_row(const flow_site *s, int n_embd, float strength, innsteer_gate gate, const float *in, float *out,
                         float *scratch) {
    /* acts[k] is the input of op k; the input of op 0 is `in` itself */
    const float *acts[MAX_OPS + 1];
    float *cursor = scratch;
    float *d = scratch + s->acts_floats, *tmp = d + n_embd, *ha = tmp + n_embd, *hb = ha + s->widest;
    int sub = s->subspace_at;
    acts[0] = in;
    for (int k = 0; k < s->n_ops; k++) {
        const flow_op *op = &s->ops[k];
        int w_out = (sub >= 0 && k >= sub) ? s->latent_dim : n_embd;
        float *next = cursor;
        cursor += w_out;
        if (op->kind == OP_SUBSPACE) {
            project(op, acts[k], next, n_embd);
        } else {
            memcpy(next, acts[k], sizeof(float) * (size_t)w_out);
            op_forward(op, next, tmp, ha, hb);
        }
        acts[k + 1] = next;
    }
    const float *z = acts[s->n_ops];
    int w = s->latent_dim;
    float a = strength * (gate != INNSTEER_GATE_OFF && s->gate_center ? gate_weight(s, gate, strength, z) : 1.0f);
    for (int i = 0; i < w; i++) d[i] = a * (s->delta[i] + (s->edit_scale ? s->edit_scale[i] * z[i] : 0.0f));
    for (int k = s->n_ops - 1; k >= 0; k--) {
        const flow_op *op = &s->ops[k];
        if (op->kind == OP_SUBSPACE) {
            memset(tmp, 0, sizeof(float) * (size_t)n_embd);
            lift(op, tmp, d, NULL, n_embd);
            memcpy(d, tmp, sizeof(float) * (size_t)n_embd);
        } else {
            op_inverse_delta(op, acts[k], acts[k + 1], d, tmp, ha, hb);
        }
    }
    for (int i = 0; i < n_embd; i++) out[i] = in[i] + d[i];
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
