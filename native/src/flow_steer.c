/* Steering kernel: h' = phi^-1(phi(h) + e) for a block of rows, as h + dh.
 *
 * The latent edit e is carried back through each op as a difference: an op maps (its forward
 * input, its forward output, the edit of its output) to the edit of its input. Rounding then
 * scales with the edit, not with |h|, an identity op passes the edit through bit-exactly, and the
 * part of h outside the flow's subspace is never touched. Rows are processed in blocks so every
 * weight row is read once per block (matrix-matrix work for prompt batches). */
#include "flow.h"
#include "kernels.h"

#include <stdbool.h>
#include <string.h>

typedef struct {
    float *acts;  /* BLOCK x acts_floats: forward outputs of every op */
    float *d;     /* BLOCK x n_embd: the edit */
    float *tmp;   /* BLOCK x n_embd */
    float *cond;  /* BLOCK x n_embd: coupling conditioning inputs */
    float *ha, *hb; /* BLOCK x widest: conditioner layers */
} block_scratch;

size_t flow_site_acts_floats(const flow_site *s, int n_embd) {
    size_t acts = 0;
    for (int k = 0; k < s->n_ops; k++) acts += (size_t)(s->subspace_at >= 0 && k >= s->subspace_at ? s->latent_dim : n_embd);
    return acts;
}

size_t flow_site_block_scratch(const flow_site *s, int n_embd) {
    return (size_t)FLOW_BLOCK * (s->acts_floats + 3 * (size_t)n_embd + 2 * (size_t)s->widest);
}

static block_scratch split(const flow_site *s, int n_embd, float *scratch) {
    block_scratch b;
    b.acts = scratch;
    b.d = b.acts + (size_t)FLOW_BLOCK * s->acts_floats;
    b.tmp = b.d + (size_t)FLOW_BLOCK * n_embd;
    b.cond = b.tmp + (size_t)FLOW_BLOCK * n_embd;
    b.ha = b.cond + (size_t)FLOW_BLOCK * n_embd;
    b.hb = b.ha + (size_t)FLOW_BLOCK * s->widest;
    return b;
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

/* Forward of op k on n vectors: x (width w_in, stride w_in) -> y (width w_out). */
static void op_forward_block(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b) {
    int w = op->dim;
    switch (op->kind) {
        case OP_AFFINE:
            for (int j = 0; j < n; j++) {
                const float *xi = x + (size_t)j * w;
                float *yi = y + (size_t)j * w;
                for (int i = 0; i < w; i++) yi[i] = xi[i] * op->scale[i] + op->bias[i];
            }
            break;
        case OP_SUBSPACE:
            matmat(op->basis, NULL, x, (size_t)n_embd, y, (size_t)op->rank, op->rank, n_embd, n);
            break;
        case OP_COUPLING: {
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
            break;
        }
        case OP_PERMUTE:
            for (int j = 0; j < n; j++) {
                for (int i = 0; i < w; i++) y[(size_t)j * w + i] = x[(size_t)j * w + op->perm[i]];
            }
            break;
        case OP_LINEAR:
            matmat(op->matrix, op->lbias, x, (size_t)w, y, (size_t)w, w, w, n);
            break;
    }
}

/* The edit of op k's input from the edit d of its output (in place; d has stride n_embd). */
static void op_inverse_delta_block(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                   block_scratch *b) {
    int w = op->dim;
    switch (op->kind) {
        case OP_AFFINE:
            for (int j = 0; j < n; j++) {
                float *dj = d + (size_t)j * n_embd;
                for (int i = 0; i < w; i++) dj[i] /= op->scale[i];
            }
            break;
        case OP_SUBSPACE:
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
            break;
        case OP_PERMUTE:
            for (int j = 0; j < n; j++) {
                float *dj = d + (size_t)j * n_embd, *t = b->tmp + (size_t)j * n_embd;
                for (int i = 0; i < w; i++) t[op->perm[i]] = dj[i];
                memcpy(dj, t, sizeof(float) * (size_t)w);
            }
            break;
        case OP_LINEAR:
            matmat(op->matrix_inv, NULL, d, (size_t)n_embd, b->tmp, (size_t)n_embd, w, w, n);
            for (int j = 0; j < n; j++) memcpy(d + (size_t)j * n_embd, b->tmp + (size_t)j * n_embd, sizeof(float) * (size_t)w);
            break;
        case OP_COUPLING: {
            /* condition on the moved first half; where it did not move (x + 0 is exact) s and t
             * equal the forward pass and the inverse is linear in the edit */
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
            break;
        }
    }
}

/* The share of the edit a row gets: 1 without a gate. */
static float gate_weight(const flow_site *s, innsteer_gate gate, float strength, const float *z) {
    int w = s->latent_dim;
    if (gate == INNSTEER_GATE_DENSITY) {
        float dist2 = 0.0f;
        for (int i = 0; i < w; i++) dist2 += (z[i] - s->gate_center[i]) * (z[i] - s->gate_center[i]);
        return 0.5f * (1.0f - tanhf(0.5f * (dist2 / (float)w - s->gate_radius) / s->gate_softness));
    }
    if (gate == INNSTEER_GATE_TARGET) {
        float norm = s->delta_norm;
        if (norm <= 0.0f || strength == 0.0f) return 0.0f;
        float target = strength > 0.0f ? s->gate_target_pos : s->gate_target_neg;
        float need = (target - dot(z, s->delta, w) / norm) / norm; /* multiples of delta to the target */
        float k = strength > 0.0f ? fminf(fmaxf(need, 0.0f), strength) : fmaxf(fminf(need, 0.0f), strength);
        return k / strength;
    }
    return 1.0f;
}

/* phi on n rows: acts[k + 1] is op k's output (n rows, n_embd wide before the subspace op and
 * latent_dim wide from it on), kept in b->acts for the way back. */
static void forward_block(const flow_site *s, int n_embd, const float *in, int n, block_scratch *b, const float **acts) {
    int sub = s->subspace_at;
    acts[0] = in;
    float *cursor = b->acts;
    for (int k = 0; k < s->n_ops; k++) {
        op_forward_block(&s->ops[k], acts[k], cursor, n, n_embd, b);
        acts[k + 1] = cursor;
        cursor += (size_t)n * (size_t)(sub >= 0 && k >= sub ? s->latent_dim : n_embd);
    }
}

static void steer_block(const flow_site *s, int n_embd, float strength, innsteer_gate gate, const float *in, float *out,
                        int n, block_scratch *b) {
    const float *acts[MAX_OPS + 1];
    forward_block(s, n_embd, in, n, b, acts);
    int w = s->latent_dim;
    for (int j = 0; j < n; j++) {
        const float *z = acts[s->n_ops] + (size_t)j * w;
        float a = strength * (gate != INNSTEER_GATE_OFF && s->gate_center ? gate_weight(s, gate, strength, z) : 1.0f);
        float *dj = b->d + (size_t)j * n_embd;
        for (int i = 0; i < w; i++) dj[i] = a * (s->delta[i] + (s->edit_scale ? s->edit_scale[i] * z[i] : 0.0f));
    }
    for (int k = s->n_ops - 1; k >= 0; k--) op_inverse_delta_block(&s->ops[k], acts[k], acts[k + 1], b->d, n, n_embd, b);
    for (size_t i = 0; i < (size_t)n * n_embd; i++) out[i] = in[i] + b->d[i];
}

void flow_site_steer_rows(const flow_site *s, int n_embd, float strength, innsteer_gate gate, const float *in, float *out,
                          int64_t n_rows, float *scratch) {
    block_scratch b = split(s, n_embd, scratch);
    for (int64_t r = 0; r < n_rows; r += FLOW_BLOCK) {
        int n = (int)(n_rows - r < FLOW_BLOCK ? n_rows - r : FLOW_BLOCK);
        steer_block(s, n_embd, strength, gate, in + r * n_embd, out + r * n_embd, n, &b);
    }
}

/* With a subspace the latent is x + basis^T (g(basis x) - basis x), x the input of the subspace
 * op: n_embd wide, and flow_site_inverse_row undoes it exactly. */
void flow_site_forward_rows(const flow_site *s, int n_embd, const float *in, float *out, int64_t n_rows, float *scratch) {
    block_scratch b = split(s, n_embd, scratch);
    const float *acts[MAX_OPS + 1];
    int sub = s->subspace_at, w = s->latent_dim;
    for (int64_t r = 0; r < n_rows; r += FLOW_BLOCK) {
        int n = (int)(n_rows - r < FLOW_BLOCK ? n_rows - r : FLOW_BLOCK);
        float *y = out + r * n_embd;
        forward_block(s, n_embd, in + r * n_embd, n, &b, acts);
        /* memmove: with no op before the output, acts[] is the input, which may be y itself */
        memmove(y, acts[sub >= 0 ? sub : s->n_ops], sizeof(float) * (size_t)n * n_embd);
        if (sub < 0) continue;
        for (int j = 0; j < n; j++) {
            subspace_lift(&s->ops[sub], y + (size_t)j * n_embd, acts[s->n_ops] + (size_t)j * w, acts[sub + 1] + (size_t)j * w, n_embd);
        }
    }
}
