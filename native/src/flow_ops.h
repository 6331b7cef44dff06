/* The op kinds as one table: for each kind (op_kind order), everything the loader, the row and
 * block kernels and the ggml graph need, side by side in flow_ops.c, as innsteer_local/flow/ops.py
 * keeps each kind's maths and serialisation in one class. The drivers (flow.c, flow_math.c,
 * flow_steer.c, flow_graph.c) only walk a site's ops and call through the table. */
#ifndef INNSTEER_FLOW_OPS_H
#define INNSTEER_FLOW_OPS_H

#include "error.h"
#include "flow.h"
#include "ggml_api.h"
#include "gguf_read.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- loading (flow.c) ------------------------------------------------------------------- */

typedef struct {
    ggufr_file g;
    char *err;
    size_t err_size;
    uint8_t *arena;
    size_t arena_used, arena_size;
    int want_n_embd, want_n_layer; /* the model's, checked before any tensor is read; 0: any */
} flow_loader;

/* the loader's error: st, with the message in the caller's buffer */
#define FAIL(L, st, ...) set_error((L)->err, (L)->err_size, st, __VA_ARGS__)

/* A tensor of the file, shape-checked (ne[0] = cols, ne[1] = rows), copied into the arena as f32
 * (or i32), non-finite values refused. */
innsteer_status flow_load_tensor(flow_loader *L, const char *name, int rows, int cols, bool is_int, const void **out);
innsteer_status flow_load_vec(flow_loader *L, const char *name, int n, const float **out);
innsteer_status flow_load_mat(flow_loader *L, const char *name, int rows, int cols, const float **out);

/* The probe generator both readers share (innsteer_local/flow/ops.py): xorshift32. */
static inline uint32_t xorshift32(uint32_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

/* ---- the block kernel's scratch (flow_steer.c) ------------------------------------------ */

typedef struct {
    float *acts;    /* BLOCK x acts_floats: forward outputs of every op */
    float *d;       /* BLOCK x n_embd: the edit */
    float *tmp;     /* BLOCK x n_embd */
    float *cond;    /* BLOCK x n_embd: coupling conditioning inputs */
    float *ha, *hb; /* BLOCK x widest: conditioner layers */
} block_scratch;

/* ---- the graph (flow_graph.c) ----------------------------------------------------------- */

#define OP_MAX_TENSORS (2 * MAX_MLP_LAYERS)

/* one op's weights on the backend, in the order its kind creates them */
typedef struct {
    ggml_api_T *t[OP_MAX_TENSORS];
} op_tensors;

/* ---- the table -------------------------------------------------------------------------- */

typedef struct {
    const char *name; /* in the file's innsteer.site.<i>.ops */
    /* Reads and validates op k of site si from the file: op->kind and op->dim (the width it acts
     * on) are set, op->out_dim is dim until the kind changes it. */
    innsteer_status (*load)(flow_loader *L, flow_site *s, flow_op *op, int si, int k, int n_embd);
    /* phi^-1 of the op on one row, in place (tmp: n_embd floats; ha, hb: widest floats) */
    void (*inverse_row)(const flow_op *op, float *v, float *tmp, float *ha, float *hb);
    /* forward on n rows: x (stride op->dim, n_embd for a subspace) -> y (stride op->out_dim) */
    void (*forward_block)(const flow_op *op, const float *x, float *y, int n, int n_embd, block_scratch *b);
    /* the edit of the op's input from the edit d of its output, in place (d has stride n_embd) */
    void (*inverse_delta_block)(const flow_op *op, const float *x_in, const float *x_out, float *d, int n, int n_embd,
                                block_scratch *b);
    /* upper bound on the graph nodes of the op's forward and edit */
    size_t (*graph_nodes)(const flow_op *op);
    /* creates the op's weight tensors in w (no data yet), then uploads them once allocated
     * (false: out of memory) */
    void (*graph_weights)(const ggml_api *G, ggml_api_C *w, const flow_op *op, int n_embd, op_tensors *o);
    bool (*graph_upload)(const ggml_api *G, const flow_op *op, int n_embd, const op_tensors *o);
    ggml_api_T *(*graph_forward)(const ggml_api *G, ggml_api_C *ctx, const flow_op *op, const op_tensors *o, ggml_api_T *x,
                                 int64_t n);
    ggml_api_T *(*graph_inverse_delta)(const ggml_api *G, ggml_api_C *ctx, const flow_op *op, const op_tensors *o,
                                       ggml_api_T *x_in, ggml_api_T *x_out, ggml_api_T *d, int64_t n);
} op_kind_impl;

extern const op_kind_impl OP_KIND_IMPLS[N_OP_KINDS];

static inline const op_kind_impl *op_impl(const flow_op *op) { return &OP_KIND_IMPLS[op->kind]; }

#endif
