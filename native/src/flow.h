/* In-memory flows: the same ordered list of op kinds as the file format (docs/flow-format.md),
 * the NumPy reference (innsteer_local/flow.py) and the torch modules. */
#ifndef INNSTEER_FLOW_H
#define INNSTEER_FLOW_H

#include "innsteer.h"

#include <stdatomic.h>

#define MAX_OPS 64
#define FLOW_BLOCK 16 /* rows steered together */
#define MAX_MLP_LAYERS 4

typedef enum { OP_AFFINE, OP_SUBSPACE, OP_COUPLING, OP_PERMUTE, OP_LINEAR } op_kind;
typedef enum { ACT_RELU, ACT_TANH, ACT_SILU } act_kind;

typedef struct {
    op_kind kind;
    int dim; /* width of the vector this op acts on */
    /* affine: y = x * scale + bias */
    const float *scale, *bias;
    /* subspace: y = basis x, basis is rank x n_embd with orthonormal rows */
    int rank;
    const float *basis;
    /* coupling: x[d1:] = x[d1:] * exp(s) + t, (s_raw, t) = mlp(x[:d1]), s = clamp * tanh(s_raw / clamp) */
    int d1, d2, n_layers;
    int width[MAX_MLP_LAYERS + 1];
    const float *w[MAX_MLP_LAYERS], *b[MAX_MLP_LAYERS];
    float clamp;
    act_kind act;
    /* permute: y[i] = x[perm[i]] */
    const int32_t *perm;
    /* linear: y = matrix x + bias, x = matrix_inv (y - bias) */
    const float *matrix, *matrix_inv, *lbias;
} flow_op;

typedef struct {
    int layer;
    int n_ops;
    flow_op ops[MAX_OPS];
    int subspace_at;  /* index of the subspace op, -1 if none */
    int latent_dim;   /* width of delta */
    const float *delta;
    const float *edit_scale; /* NULL when zero */
    /* optional gate (innsteer.site.<i>.gate.*): NULL center = no gate parameters */
    const float *gate_center;
    float gate_radius, gate_softness, gate_target_pos, gate_target_neg;
    int widest;         /* widest coupling layer */
    size_t acts_floats; /* forward activations kept by steer() */
    size_t scratch;     /* floats of scratch for the row maps (forward, inverse) */
    size_t steer_scratch; /* floats of scratch for flow_site_steer_rows */
} flow_site;

struct innsteer_flow {
    atomic_int refs;
    int n_embd;
    int n_sites;
    float default_strength;
    flow_site *sites;
    void *arena; /* every weight array, converted to f32 and aligned */
};

/* Row maps. scratch must hold site->scratch floats. */
size_t flow_site_acts_floats(const flow_site *s, int n_embd);
/* Steers n_rows rows (in and out may alias); scratch holds flow_site_block_scratch() floats. */
size_t flow_site_block_scratch(const flow_site *s, int n_embd);
void flow_site_steer_rows(const flow_site *s, int n_embd, float strength, innsteer_gate gate, const float *in, float *out,
                          int64_t n_rows, float *scratch);
void flow_site_forward_row(const flow_site *s, int n_embd, const float *in, float *out, float *scratch);
void flow_site_inverse_row(const flow_site *s, int n_embd, const float *in, float *out, float *scratch);

#endif
