/* The flow as a ggml graph (see flow_graph.h).
 *
 * ggml's functions come from ggml_api.h. We never read struct ggml_tensor: llama.cpp's
 * activations are copied into our own input tensor with ggml_backend_tensor_copy, which moves
 * device-to-device when both sit on the same kind of device, and copied back the same way. Each
 * op kind's weights and nodes come from its entry of OP_KIND_IMPLS (flow_ops.c). */
#include "error.h"
#include "flow_graph.h"
#include "flow_ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef ggml_api_T T;
typedef ggml_api_C C;

/* ---- backends --------------------------------------------------------------------------- */

struct graph_backend {
    const ggml_api *api;
    struct ggml_backend *backend;
    char name[64];
};

innsteer_status graph_backend_new(innsteer_path path, struct ggml_backend_device *device, int n_threads, graph_backend **out,
                                  char *err, size_t err_size) {
    *out = NULL;
    const ggml_api *G = ggml_api_graph(err, err_size);
    if (!G) return INNSTEER_ERR_UNSUPPORTED;
    struct ggml_backend_device *dev = NULL;
    if (path == INNSTEER_PATH_DEVICE && device) {
        dev = device; /* the application's choice, e.g. a remote RPC device that is in no registry */
    } else if (path == INNSTEER_PATH_CPU_GRAPH) {
        dev = G->ggml_backend_dev_by_type(GGML_API_DEV_CPU);
    } else {
        dev = G->ggml_backend_dev_by_type(GGML_API_DEV_GPU);
        if (!dev) dev = G->ggml_backend_dev_by_type(GGML_API_DEV_IGPU);
    }
    if (!dev) {
        return set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "ggml has no %s device in this process",
                         path == INNSTEER_PATH_CPU_GRAPH ? "CPU" : "GPU");
    }
    graph_backend *b = calloc(1, sizeof *b);
    if (!b) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    b->api = G;
    b->backend = G->ggml_backend_dev_init(dev, NULL);
    if (!b->backend) {
        free(b);
        return set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "ggml could not start a backend on its %s device",
                         path == INNSTEER_PATH_CPU_GRAPH ? "CPU" : "GPU");
    }
    snprintf(b->name, sizeof b->name, "%s", G->ggml_backend_name(b->backend));
    if (path == INNSTEER_PATH_CPU_GRAPH && n_threads > 0) {
        /* the registry's way to set CPU threads without linking ggml-cpu */
        void (*set_threads)(struct ggml_backend *, int) = NULL;
        *(void **)&set_threads = G->ggml_backend_reg_get_proc_address(G->ggml_backend_dev_backend_reg(dev), "ggml_backend_set_n_threads");
        if (set_threads) set_threads(b->backend, n_threads);
    }
    *out = b;
    return INNSTEER_OK;
}

void graph_backend_free(graph_backend *b) {
    if (!b) return;
    b->api->ggml_backend_free(b->backend);
    free(b);
}

const char *graph_backend_name(const graph_backend *b) { return b ? b->name : ""; }

/* ---- weights ---------------------------------------------------------------------------- */

/* Compute graphs for recent batch shapes: prompt batches and decode alternate, and a rebuild
 * costs a host-side graph construction (no device allocation once the allocator's buffer is
 * large enough). */
#define GRAPH_SLOTS 2

typedef struct {
    int64_t n_rows; /* 0: empty */
    innsteer_gate gate;
    bool negative; /* strength sign (the target gate's graph depends on it) */
    unsigned last_use;
    C *ctx;
    struct ggml_cgraph *graph;
    struct ggml_gallocr *alloc;
    T *in, *out, *flags;
} graph_slot;

struct flow_graph {
    const flow_site *site;
    int n_embd;
    graph_backend *backend;
    C *wctx;
    struct ggml_backend_buffer *wbuf;
    op_tensors ops[MAX_OPS];
    T *delta, *edit_scale, *gate_center, *strength;
    size_t max_nodes;
    graph_slot slots[GRAPH_SLOTS];
    unsigned clock;
    bool unsupported; /* the backend lacks an op: the host path from then on */
};

/* Upper bound on the tensors (nodes, views, leaves) of one steering graph. */
static size_t graph_bound(const flow_site *s) {
    size_t n = 64;
    for (int k = 0; k < s->n_ops; k++) n += op_impl(&s->ops[k])->graph_nodes(&s->ops[k]);
    return n;
}

static void free_slot(const ggml_api *G, graph_slot *sl) {
    if (sl->alloc) G->ggml_gallocr_free(sl->alloc);
    if (sl->ctx) G->ggml_free(sl->ctx);
    memset(sl, 0, sizeof *sl);
}

void flow_graph_free(flow_graph *g) {
    if (!g) return;
    const ggml_api *G = g->backend->api;
    for (int i = 0; i < GRAPH_SLOTS; i++) free_slot(G, &g->slots[i]);
    if (g->wbuf) G->ggml_backend_buffer_free(g->wbuf);
    if (g->wctx) G->ggml_free(g->wctx);
    free(g);
}

static void upload(const ggml_api *G, T *t, const void *data, size_t bytes) { G->ggml_backend_tensor_set(t, data, 0, bytes); }

innsteer_status flow_graph_new(const flow_site *s, int n_embd, graph_backend *b, flow_graph **out, char *err,
                               size_t err_size) {
    *out = NULL;
    if (!b) return set_error(err, err_size, INNSTEER_ERR_ARG, "no backend");
    const ggml_api *G = b->api;
    flow_graph *g = calloc(1, sizeof *g);
    if (!g) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    g->site = s;
    g->n_embd = n_embd;
    g->backend = b;
    g->max_nodes = graph_bound(s);
    size_t n_tensors = 4 + (size_t)s->n_ops * OP_MAX_TENSORS;
    g->wctx = G->ggml_init((struct ggml_api_init_params){.mem_size = n_tensors * G->ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true});
    if (!g->wctx) {
        flow_graph_free(g);
        return set_error(err, err_size, INNSTEER_ERR_NOMEM, "ggml_init failed for the flow weights");
    }
    C *w = g->wctx;
    for (int k = 0; k < s->n_ops; k++) op_impl(&s->ops[k])->graph_weights(G, w, &s->ops[k], n_embd, &g->ops[k]);
    int lat = s->latent_dim;
    g->delta = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, lat);
    if (s->edit_scale) g->edit_scale = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, lat);
    if (s->gate_center) g->gate_center = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, lat);
    /* read once per batch by the graph: set before every compute */
    g->strength = G->ggml_new_tensor_1d(w, GGML_API_TYPE_F32, 1);
    g->wbuf = G->ggml_backend_alloc_ctx_tensors(w, b->backend);
    if (!g->wbuf) {
        flow_graph_free(g);
        return set_error(err, err_size, INNSTEER_ERR_NOMEM, "cannot allocate the flow weights on backend %s", b->name);
    }
    for (int k = 0; k < s->n_ops; k++) {
        if (!op_impl(&s->ops[k])->graph_upload(G, &s->ops[k], n_embd, &g->ops[k])) {
            flow_graph_free(g);
            return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
        }
    }
    upload(G, g->delta, s->delta, 4 * (size_t)lat);
    if (s->edit_scale) upload(G, g->edit_scale, s->edit_scale, 4 * (size_t)lat);
    if (s->gate_center) upload(G, g->gate_center, s->gate_center, 4 * (size_t)lat);
    *out = g;
    return INNSTEER_OK;
}

bool flow_graph_supports(const flow_graph *g, innsteer_gate gate) {
    if (g->unsupported) return false;
    if (gate == INNSTEER_GATE_OFF) return true;
    if (!g->site->gate_center) return false;
    /* a zero delta gives the host kernel's exact "no edit"; the graph would leave rounding noise */
    return gate == INNSTEER_GATE_DENSITY || g->site->delta_norm > 0.0f;
}

/* ---- graph ------------------------------------------------------------------------------ */

/* Per-row weight of the edit times the strength, [1, n] (flow_steer.c, gate_weight). */
static T *gated_strength_node(flow_graph *g, C *ctx, innsteer_gate gate, bool negative, T *z) {
    const ggml_api *G = g->backend->api;
    const flow_site *s = g->site;
    int lat = s->latent_dim;
    if (gate == INNSTEER_GATE_DENSITY) {
        T *dist2 = G->ggml_sum_rows(ctx, G->ggml_sqr(ctx, G->ggml_sub(ctx, z, g->gate_center)));
        T *x = G->ggml_scale_bias(ctx, dist2, 1.0f / (float)lat, -s->gate_radius);
        T *th = G->ggml_tanh(ctx, G->ggml_scale(ctx, x, 0.5f / s->gate_softness));
        T *wgt = G->ggml_scale_bias(ctx, th, -0.5f, 0.5f);
        return G->ggml_mul(ctx, wgt, g->strength);
    }
    /* target: k = clamp(need, 0, a) with need = (target - <z, delta>/|delta|) / |delta|; a * (k / a) = k */
    float norm = g->site->delta_norm;
    float target = negative ? s->gate_target_neg : s->gate_target_pos;
    T *proj = G->ggml_mul_mat(ctx, g->delta, z); /* [1, n] */
    T *need = G->ggml_scale(ctx, G->ggml_scale_bias(ctx, proj, -1.0f / norm, target), 1.0f / norm);
    if (!negative) {
        T *x = G->ggml_relu(ctx, need); /* max(need, 0) */
        return G->ggml_sub(ctx, x, G->ggml_relu(ctx, G->ggml_sub(ctx, x, g->strength))); /* min(x, a) */
    }
    T *x = G->ggml_relu(ctx, G->ggml_scale(ctx, need, -1.0f)); /* max(-need, 0) */
    T *k = G->ggml_sub(ctx, x, G->ggml_relu(ctx, G->ggml_add(ctx, x, g->strength))); /* min(x, -a) */
    return G->ggml_scale(ctx, k, -1.0f);
}

static innsteer_status build_slot(flow_graph *g, graph_slot *sl, int64_t n, innsteer_gate gate, bool negative, char *err,
                                  size_t err_size) {
    const ggml_api *G = g->backend->api;
    const flow_site *s = g->site;
    size_t mem = g->max_nodes * G->ggml_tensor_overhead() + G->ggml_graph_overhead_custom(g->max_nodes, false);
    sl->ctx = G->ggml_init((struct ggml_api_init_params){.mem_size = mem, .mem_buffer = NULL, .no_alloc = true});
    if (!sl->ctx) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "ggml_init failed for the steering graph");
    C *ctx = sl->ctx;
    T *acts[MAX_OPS + 1];
    sl->in = G->ggml_new_tensor_2d(ctx, GGML_API_TYPE_F32, g->n_embd, n);
    G->ggml_set_input(sl->in);
    acts[0] = sl->in;
    for (int k = 0; k < s->n_ops; k++) acts[k + 1] = op_impl(&s->ops[k])->graph_forward(G, ctx, &s->ops[k], &g->ops[k], acts[k], n);
    T *z = acts[s->n_ops];
    T *base = g->edit_scale ? G->ggml_add(ctx, G->ggml_mul(ctx, z, g->edit_scale), g->delta) : G->ggml_repeat(ctx, g->delta, z);
    T *a = gate == INNSTEER_GATE_OFF ? g->strength : gated_strength_node(g, ctx, gate, negative, z);
    T *d = G->ggml_mul(ctx, base, a);
    for (int k = s->n_ops - 1; k >= 0; k--) {
        d = op_impl(&s->ops[k])->graph_inverse_delta(G, ctx, &s->ops[k], &g->ops[k], acts[k], acts[k + 1], d, n);
    }
    sl->out = G->ggml_add(ctx, sl->in, d);
    /* 0 for a row of finite values, NaN otherwise (x - x) */
    sl->flags = G->ggml_sum_rows(ctx, G->ggml_sub(ctx, sl->out, sl->out));
    G->ggml_set_output(sl->out);
    G->ggml_set_output(sl->flags);
    sl->graph = G->ggml_new_graph_custom(ctx, g->max_nodes, false);
    G->ggml_build_forward_expand(sl->graph, sl->out);
    G->ggml_build_forward_expand(sl->graph, sl->flags);
    /* a backend may lack an op (or a layout of it) that the CPU and CUDA backends have: ask before
     * computing, since an unsupported op aborts inside ggml */
    for (int i = 0; i < G->ggml_graph_n_nodes(sl->graph); i++) {
        if (!G->ggml_backend_supports_op(g->backend->backend, G->ggml_graph_node(sl->graph, i))) {
            return set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "backend %s lacks op %d of the steering graph", g->backend->name, i);
        }
    }
    sl->alloc = G->ggml_gallocr_new(G->ggml_backend_get_default_buffer_type(g->backend->backend));
    if (!sl->alloc || !G->ggml_gallocr_alloc_graph(sl->alloc, sl->graph)) {
        return set_error(err, err_size, INNSTEER_ERR_NOMEM, "cannot allocate the steering graph for %lld rows on %s", (long long)n,
                         g->backend->name);
    }
    sl->n_rows = n;
    sl->gate = gate;
    sl->negative = negative;
    return INNSTEER_OK;
}

/* The graph for this batch shape: cached, else built in the least recently used slot. */
static innsteer_status get_slot(flow_graph *g, int64_t n, innsteer_gate gate, float strength, graph_slot **out, char *err,
                                size_t err_size) {
    const ggml_api *G = g->backend->api;
    bool negative = gate == INNSTEER_GATE_TARGET && strength < 0.0f;
    graph_slot *victim = &g->slots[0];
    g->clock++;
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        graph_slot *sl = &g->slots[i];
        if (sl->n_rows == n && sl->gate == gate && sl->negative == negative) {
            sl->last_use = g->clock;
            *out = sl;
            return INNSTEER_OK;
        }
        if (sl->last_use < victim->last_use) victim = sl;
    }
    free_slot(G, victim);
    innsteer_status st = build_slot(g, victim, n, gate, negative, err, err_size);
    if (st != INNSTEER_OK) {
        free_slot(G, victim);
        g->unsupported = st == INNSTEER_ERR_UNSUPPORTED;
        return st;
    }
    victim->last_use = g->clock;
    *out = victim;
    return INNSTEER_OK;
}

static innsteer_status compute(flow_graph *g, graph_slot *sl, float strength, char *err, size_t err_size) {
    const ggml_api *G = g->backend->api;
    G->ggml_backend_tensor_set(g->strength, &strength, 0, sizeof strength);
    int status = G->ggml_backend_graph_compute(g->backend->backend, sl->graph);
    if (status != 0) return set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "ggml graph compute on %s failed (status %d)", g->backend->name, status);
    return INNSTEER_OK;
}

innsteer_status flow_graph_steer_tensor(flow_graph *g, struct ggml_tensor *t, int64_t n_rows, float strength,
                                        innsteer_gate gate, float *host_rows, uint8_t *bad, uint64_t *steered,
                                        uint64_t *rejected, char *err, size_t err_size) {
    const ggml_api *G = g->backend->api;
    if (!flow_graph_supports(g, gate)) return set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "gate mode %d not on the graph path", gate);
    graph_slot *sl;
    innsteer_status st = get_slot(g, n_rows, gate, strength, &sl, err, err_size);
    if (st != INNSTEER_OK) return st;
    /* ggml_backend_tensor_copy asserts on a layout mismatch: check what we can see first */
    if (!G->ggml_is_contiguous(t) || !G->ggml_are_same_shape(t, sl->in)) {
        return set_error(err, err_size, INNSTEER_ERR_ARG, "tensor is not a contiguous [%d x %lld] matrix", g->n_embd, (long long)n_rows);
    }
    G->ggml_backend_tensor_copy(t, sl->in);
    if ((st = compute(g, sl, strength, err, err_size)) != INNSTEER_OK) return st;
    /* the flags are n_rows floats: reading them is the only device-to-host transfer */
    float *flags = host_rows;
    G->ggml_backend_tensor_get(sl->flags, flags, 0, sizeof(float) * (size_t)n_rows);
    int64_t n_bad = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        n_bad += !isfinite(flags[r]);
        if (bad) bad[r] = !isfinite(flags[r]);
    }
    if (n_bad == 0) {
        G->ggml_backend_tensor_copy(sl->out, t);
    } else {
        /* rare: write back the finite rows only, so the KV cache never sees NaN/Inf */
        size_t row = sizeof(float) * (size_t)g->n_embd;
        uint8_t *bad_row = malloc((size_t)n_rows);
        if (!bad_row) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
        for (int64_t r = 0; r < n_rows; r++) bad_row[r] = !isfinite(flags[r]);
        G->ggml_backend_tensor_get(sl->out, host_rows, 0, row * (size_t)n_rows);
        for (int64_t r = 0; r < n_rows; r++) {
            if (!bad_row[r]) G->ggml_backend_tensor_set(t, host_rows + (size_t)r * g->n_embd, row * (size_t)r, row);
        }
        free(bad_row);
    }
    *steered += (uint64_t)(n_rows - n_bad);
    *rejected += (uint64_t)n_bad;
    return INNSTEER_OK;
}

innsteer_status flow_graph_steer_host(flow_graph *g, const float *in, float *out, int64_t n_rows, float strength,
                                      innsteer_gate gate, uint64_t *rejected, char *err, size_t err_size) {
    const ggml_api *G = g->backend->api;
    if (!flow_graph_supports(g, gate)) return set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "gate mode %d not on the graph path", gate);
    graph_slot *sl;
    innsteer_status st = get_slot(g, n_rows, gate, strength, &sl, err, err_size);
    if (st != INNSTEER_OK) return st;
    size_t bytes = sizeof(float) * (size_t)n_rows * g->n_embd;
    G->ggml_backend_tensor_set(sl->in, in, 0, bytes);
    if ((st = compute(g, sl, strength, err, err_size)) != INNSTEER_OK) return st;
    float *flags = malloc(sizeof(float) * (size_t)n_rows);
    if (!flags) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    G->ggml_backend_tensor_get(sl->flags, flags, 0, sizeof(float) * (size_t)n_rows);
    G->ggml_backend_tensor_get(sl->out, out, 0, bytes);
    for (int64_t r = 0; r < n_rows; r++) {
        if (isfinite(flags[r])) continue;
        memmove(out + (size_t)r * g->n_embd, in + (size_t)r * g->n_embd, sizeof(float) * (size_t)g->n_embd);
        (*rejected)++;
    }
    free(flags);
    return INNSTEER_OK;
}

innsteer_status innsteer_flow_steer_graph(const innsteer_flow *flow, int site, float strength, innsteer_gate gate,
                                          innsteer_path path, const float *in, float *out, int64_t n_rows, char *err,
                                          size_t err_size) {
    if (err && err_size) err[0] = '\0';
    if (!flow || !in || !out || n_rows < 0 || site < 0 || site >= flow->n_sites || !isfinite(strength) ||
        path == INNSTEER_PATH_HOST || path < INNSTEER_PATH_AUTO || path > INNSTEER_PATH_CPU_GRAPH) {
        return set_error(err, err_size, INNSTEER_ERR_ARG, "invalid argument");
    }
    if (gate != INNSTEER_GATE_OFF && !innsteer_flow_has_gate(flow)) return set_error(err, err_size, INNSTEER_ERR_ARG, "flow has no gate parameters");
    if (n_rows == 0) return INNSTEER_OK;
    graph_backend *b;
    innsteer_status st = graph_backend_new(path == INNSTEER_PATH_AUTO ? INNSTEER_PATH_DEVICE : path, NULL, 0, &b, err, err_size);
    if (st != INNSTEER_OK && path == INNSTEER_PATH_AUTO) st = graph_backend_new(INNSTEER_PATH_CPU_GRAPH, NULL, 0, &b, err, err_size);
    if (st != INNSTEER_OK) return st;
    flow_graph *g;
    st = flow_graph_new(&flow->sites[site], flow->n_embd, b, &g, err, err_size);
    if (st == INNSTEER_OK) {
        uint64_t rejected = 0;
        st = flow_graph_steer_host(g, in, out, n_rows, strength, gate, &rejected, err, err_size);
        flow_graph_free(g);
    }
    graph_backend_free(b);
    return st;
}
