/* In-memory flows: the same ordered list of op kinds as the file format (docs/flow-format.md),
 * the NumPy reference (innsteer_local/flow/) and the torch modules. */
#ifndef INNSTEER_FLOW_H
#define INNSTEER_FLOW_H

#include "limits.h"
#include "innsteer_tools.h"

#include <stdatomic.h>

#define FLOW_BLOCK 16 /* rows steered together */

/* indexes OP_KIND_IMPLS (flow_ops.c), which holds everything each kind does */
typedef enum { OP_AFFINE, OP_SUBSPACE, OP_COUPLING, OP_PERMUTE, OP_LINEAR, N_OP_KINDS } op_kind;
typedef enum { ACT_RELU, ACT_TANH, ACT_SILU } act_kind;

typedef struct {
    op_kind kind;
    int dim;     /* width of the vector this op acts on */
    int out_dim; /* width after it (a subspace's rank) */
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

/* longest op kind name ("subspace", "coupling") plus a separator */
#define OP_NAME_CHARS 9

typedef struct {
    int layer;
    int n_ops;
    flow_op ops[MAX_OPS];
    char op_names[MAX_OPS * OP_NAME_CHARS]; /* the op kinds, space-separated (innsteer_site_info.ops) */
    int subspace_at;  /* index of the subspace op, -1 if none */
    int latent_dim;   /* width of delta */
    const float *delta;
    float delta_norm;
    const float *edit_scale; /* NULL when zero */
    /* optional gate (innsteer.site.<i>.gate.*): NULL center = no gate parameters */
    const float *gate_center;
    float gate_radius, gate_softness, gate_target_pos, gate_target_neg;
    int widest;           /* widest coupling layer */
    size_t acts_floats;   /* forward activations of one row, kept by the block kernel */
    size_t scratch;       /* floats of scratch for flow_site_inverse_row */
    size_t block_scratch; /* floats of scratch for flow_site_steer_rows and flow_site_forward_rows */
} flow_site;

struct innsteer_flow {
    atomic_int refs;
    int n_embd;
    int n_layer;
    int n_sites;
    float default_strength;
    flow_site *sites;
    void *arena; /* every weight array, converted to f32 and aligned */
    /* general.name, innsteer.behavior, innsteer.method, innsteer.model.name,
     * innsteer.model.architecture, innsteer.provenance: NUL-terminated, in one block (strings) */
    const char *name, *behavior, *method, *model_name, *model_architecture, *provenance;
    char *strings;
};

/* ---- block kernel (flow_steer.c): FLOW_BLOCK rows at a time, scratch of
 * flow_site_block_scratch() floats; in and out may alias ---------------------------------- */
size_t flow_site_acts_floats(const flow_site *s, int n_embd);
size_t flow_site_block_scratch(const flow_site *s, int n_embd);
/* h' = phi^-1(phi(h) + a * edit), carried back as h + dh */
void flow_site_steer_rows(const flow_site *s, int n_embd, float strength, innsteer_gate gate, const float *in, float *out,
                          int64_t n_rows, float *scratch);
/* phi: the latent, n_embd wide (a subspace's complement passes through) */
void flow_site_forward_rows(const flow_site *s, int n_embd, const float *in, float *out, int64_t n_rows, float *scratch);

/* ---- phi^-1 on one row (flow_math.c): scratch of site->scratch floats ------------------- */
void flow_site_inverse_row(const flow_site *s, int n_embd, const float *in, float *out, float *scratch);

#endif
