/* phi^-1 on one row: the exact inverse map, for innsteer_flow_inverse and the loader's
 * round-trip check (each kind's step is its inverse_row in flow_ops.c). Steering never inverts a whole row (flow_steer.c carries the edit back as a
 * difference instead), so this path is kept simple rather than blocked. */
#include "flow_ops.h"
#include "kernels.h"

#include <math.h>
#include <string.h>

static void run_inverse(const flow_site *s, int from, int to, float *v, float *tmp, float *ha, float *hb) {
    for (int k = to - 1; k >= from; k--) op_impl(&s->ops[k])->inverse_row(&s->ops[k], v, tmp, ha, hb);
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
