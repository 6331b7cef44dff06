/* Steering kernel: h' = phi^-1(phi(h) + e) for a block of rows, as h + dh.
 *
 * The latent edit e is carried back through each op as a difference: an op maps (its forward
 * input, its forward output, the edit of its output) to the edit of its input. Rounding then
 * scales with the edit, not with |h|, an identity op passes the edit through bit-exactly, and the
 * part of h outside the flow's subspace is never touched. Rows are processed in blocks so every
 * weight row is read once per block (matrix-matrix work for prompt batches). Each kind's step is
 * its forward_block and inverse_delta_block in flow_ops.c. */
#include "flow_ops.h"
#include "kernels.h"

#include <string.h>

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
        op_impl(&s->ops[k])->forward_block(&s->ops[k], acts[k], cursor, n, n_embd, b);
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
    for (int k = s->n_ops - 1; k >= 0; k--) {
        op_impl(&s->ops[k])->inverse_delta_block(&s->ops[k], acts[k], acts[k + 1], b->d, n, n_embd, b);
    }
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
