/* The llama.cpp eval callback: steers (and optionally captures) the rows of l_out-<layer>.
 * Attachments, settings and the callback's buffers are guarded by the steerer's lock; captured
 * rows live in capture.c, the worker threads in pool.c, the graph path in flow_graph.c. */
#include "capture.h"
#include "error.h"
#include "flow.h"
#include "flow_graph.h"
#include "ggml_api.h"
#include "pool.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_ATTACHED 64
/* Batches below this many rows take the host path by default: measured on an H200 (docs/PERFORMANCE.md),
 * the graph is faster for prompt batches, the host round trip for decode (one row). */
#define DEFAULT_DEVICE_MIN_ROWS 32
/* Prompt batches at least this long are split across threads. */
#define PARALLEL_MIN_ROWS (2 * FLOW_BLOCK)
static const char LAYER_PREFIX[] = "l_out-";

typedef struct {
    int id;
    innsteer_flow *flow;
    _Atomic float strength;
    atomic_bool enabled;
    atomic_int gate;
    flow_graph **graphs; /* per site: the graph path's weights on the device, made at first use */
} attachment;

struct innsteer_steerer {
    int n_embd, n_layer;
    pthread_mutex_t lock;
    attachment att[MAX_ATTACHED];
    int n_att, next_id;
    atomic_bool active;
    int *steered_at;       /* per layer: attachments with a site there */
    capture_set *captures; /* behind a pointer: readers with a const steerer still take its lock */
    atomic_uint_fast64_t *visits;
    atomic_uint_fast64_t rows_steered, rows_rejected;
    float *rows;
    size_t rows_cap;
    /* per worker: kernel scratch and a block of output rows, sized at attach time */
    int n_threads;
    float *work[POOL_MAX_THREADS];
    size_t work_cap; /* floats per worker */
    pool workers;
    bool (*chain_cb)(struct ggml_tensor *, bool, void *);
    void *chain_ud;
    char last_error[256];
    /* graph path (flow_graph.c) */
    innsteer_path path;
    int device_min_rows;
    graph_backend *backend; /* started at the first batch that takes the graph path */
    bool backend_is_cpu;
    bool backend_failed;    /* no device: the host path from then on */
    atomic_uint_fast64_t rows_on_device;
};

innsteer_steerer *innsteer_steerer_new(int n_embd, int n_layer, int max_rows) {
    if (n_embd < 1 || n_embd > MAX_EMBD || n_layer < 1 || n_layer > MAX_LAYERS || max_rows < 1) return NULL;
    innsteer_steerer *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    st->n_embd = n_embd;
    st->n_layer = n_layer;
    st->steered_at = calloc((size_t)n_layer, sizeof *st->steered_at);
    st->captures = capture_set_new(n_layer, n_embd);
    st->visits = calloc((size_t)n_layer, sizeof *st->visits);
    st->rows_cap = (size_t)max_rows;
    st->rows = malloc(sizeof(float) * st->rows_cap * (size_t)n_embd);
    bool locked = false, pooled = false;
    if (!st->steered_at || !st->captures || !st->visits || !st->rows || !(locked = pthread_mutex_init(&st->lock, NULL) == 0) ||
        !(pooled = pool_init(&st->workers))) {
        if (locked) pthread_mutex_destroy(&st->lock);
        free(st->steered_at);
        capture_set_free(st->captures);
        free(st->visits);
        free(st->rows);
        free(st);
        return NULL;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    st->n_threads = cpus < 1 ? 1 : cpus > POOL_MAX_THREADS ? POOL_MAX_THREADS : (int)cpus;
    atomic_init(&st->active, true);
    st->next_id = 1;
    st->path = INNSTEER_PATH_AUTO;
    st->device_min_rows = DEFAULT_DEVICE_MIN_ROWS;
    return st;
}

static void free_graphs(attachment *a) {
    if (!a->graphs) return;
    for (int s = 0; s < a->flow->n_sites; s++) {
        flow_graph_free(a->graphs[s]);
        a->graphs[s] = NULL;
    }
}

void innsteer_steerer_free(innsteer_steerer *st) {
    if (!st) return;
    pool_destroy(&st->workers);
    for (int i = 0; i < POOL_MAX_THREADS; i++) free(st->work[i]);
    for (int i = 0; i < st->n_att; i++) {
        free_graphs(&st->att[i]);
        free(st->att[i].graphs);
        innsteer_flow_free(st->att[i].flow);
    }
    graph_backend_free(st->backend);
    capture_set_free(st->captures);
    pthread_mutex_destroy(&st->lock);
    free(st->steered_at);
    free(st->visits);
    free(st->rows);
    free(st);
}

innsteer_status innsteer_steerer_attach(innsteer_steerer *st, innsteer_flow *flow, float strength, int *id_out, char *err,
                                        size_t err_size) {
    if (!st || !flow) return set_error(err, err_size, INNSTEER_ERR_ARG, "steerer and flow must not be NULL");
    if (!isfinite(strength)) return set_error(err, err_size, INNSTEER_ERR_ARG, "strength %g is not finite", (double)strength);
    if (flow->n_embd != st->n_embd) {
        return set_error(err, err_size, INNSTEER_ERR_MISMATCH, "flow n_embd %d does not match the model's n_embd %d",
                         flow->n_embd, st->n_embd);
    }
    for (int s = 0; s < flow->n_sites; s++) {
        if (flow->sites[s].layer >= st->n_layer) {
            return set_error(err, err_size, INNSTEER_ERR_MISMATCH, "flow layer %d is out of range for a model with %d layers (0..%d)",
                             flow->sites[s].layer, st->n_layer, st->n_layer - 1);
        }
    }
    size_t need = 0;
    for (int s = 0; s < flow->n_sites; s++) {
        size_t site_need = flow->sites[s].block_scratch + (size_t)FLOW_BLOCK * (size_t)st->n_embd;
        need = site_need > need ? site_need : need;
    }
    flow_graph **graphs = calloc((size_t)flow->n_sites, sizeof *graphs);
    if (!graphs) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    pthread_mutex_lock(&st->lock);
    if (st->n_att == MAX_ATTACHED) {
        pthread_mutex_unlock(&st->lock);
        free(graphs);
        return set_error(err, err_size, INNSTEER_ERR_ARG, "at most %d flows can be attached at once", MAX_ATTACHED);
    }
    if (need > st->work_cap) {
        for (int t = 0; t < POOL_MAX_THREADS; t++) {
            if (t >= st->n_threads && !st->work[t]) continue;
            float *grown = realloc(st->work[t], sizeof(float) * need);
            if (!grown) {
                pthread_mutex_unlock(&st->lock);
                free(graphs);
                return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
            }
            st->work[t] = grown;
        }
        st->work_cap = need;
    }
    attachment *a = &st->att[st->n_att++];
    a->id = st->next_id++;
    a->flow = flow;
    a->graphs = graphs;
    atomic_fetch_add(&flow->refs, 1);
    atomic_store(&a->strength, strength);
    atomic_store(&a->enabled, true);
    atomic_store(&a->gate, INNSTEER_GATE_OFF);
    for (int s = 0; s < flow->n_sites; s++) st->steered_at[flow->sites[s].layer]++;
    if (id_out) *id_out = a->id;
    pthread_mutex_unlock(&st->lock);
    return INNSTEER_OK;
}

static attachment *find(innsteer_steerer *st, int id) {
    for (int i = 0; i < st->n_att; i++) {
        if (st->att[i].id == id) return &st->att[i];
    }
    return NULL;
}

innsteer_status innsteer_steerer_detach(innsteer_steerer *st, int id) {
    if (!st) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    attachment *a = find(st, id);
    if (!a) {
        pthread_mutex_unlock(&st->lock);
        return INNSTEER_ERR_ARG;
    }
    innsteer_flow *flow = a->flow;
    for (int s = 0; s < flow->n_sites; s++) st->steered_at[flow->sites[s].layer]--;
    free_graphs(a);
    free(a->graphs);
    int idx = (int)(a - st->att);
    for (int i = idx; i + 1 < st->n_att; i++) {
        st->att[i].id = st->att[i + 1].id;
        st->att[i].flow = st->att[i + 1].flow;
        st->att[i].graphs = st->att[i + 1].graphs;
        atomic_store(&st->att[i].strength, atomic_load(&st->att[i + 1].strength));
        atomic_store(&st->att[i].enabled, atomic_load(&st->att[i + 1].enabled));
        atomic_store(&st->att[i].gate, atomic_load(&st->att[i + 1].gate));
    }
    st->n_att--;
    pthread_mutex_unlock(&st->lock);
    innsteer_flow_free(flow);
    return INNSTEER_OK;
}

innsteer_status innsteer_steerer_set_strength(innsteer_steerer *st, int id, float strength) {
    if (!st || !isfinite(strength)) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    attachment *a = find(st, id);
    if (a) atomic_store(&a->strength, strength);
    pthread_mutex_unlock(&st->lock);
    return a ? INNSTEER_OK : INNSTEER_ERR_ARG;
}

innsteer_status innsteer_steerer_set_enabled(innsteer_steerer *st, int id, bool enabled) {
    if (!st) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    attachment *a = find(st, id);
    if (a) atomic_store(&a->enabled, enabled);
    pthread_mutex_unlock(&st->lock);
    return a ? INNSTEER_OK : INNSTEER_ERR_ARG;
}

innsteer_status innsteer_steerer_set_threads(innsteer_steerer *st, int n_threads) {
    if (!st || n_threads < 1 || n_threads > POOL_MAX_THREADS) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    innsteer_status status = INNSTEER_OK;
    for (int t = 0; t < n_threads && st->work_cap; t++) {
        if (st->work[t]) continue;
        st->work[t] = malloc(sizeof(float) * st->work_cap);
        if (!st->work[t]) status = INNSTEER_ERR_NOMEM;
    }
    if (status == INNSTEER_OK) {
        pool_stop(&st->workers); /* restarted with the new count on the next prompt batch */
        st->n_threads = n_threads;
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}

innsteer_status innsteer_steerer_set_gate(innsteer_steerer *st, int id, innsteer_gate gate) {
    if (!st || gate < INNSTEER_GATE_OFF || gate > INNSTEER_GATE_TARGET) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    attachment *a = find(st, id);
    innsteer_status status = INNSTEER_ERR_ARG;
    if (a && (gate == INNSTEER_GATE_OFF || innsteer_flow_has_gate(a->flow))) {
        atomic_store(&a->gate, gate);
        status = INNSTEER_OK;
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}

void innsteer_steerer_set_active(innsteer_steerer *st, bool active) {
    if (st) atomic_store(&st->active, active);
}

void innsteer_steerer_chain(innsteer_steerer *st, bool (*cb)(struct ggml_tensor *, bool, void *), void *user_data) {
    if (!st) return;
    pthread_mutex_lock(&st->lock);
    st->chain_cb = cb;
    st->chain_ud = user_data;
    pthread_mutex_unlock(&st->lock);
}

innsteer_status innsteer_steerer_capture(innsteer_steerer *st, int layer, bool post, bool on) {
    if (!st || layer < 0 || layer >= st->n_layer) return INNSTEER_ERR_ARG;
    capture_set_enable(st->captures, layer, post, on);
    return INNSTEER_OK;
}

int64_t innsteer_steerer_captured_rows(const innsteer_steerer *st, int layer, bool post) {
    if (!st || layer < 0 || layer >= st->n_layer) return -1;
    return capture_set_rows(st->captures, layer, post);
}

innsteer_status innsteer_steerer_copy_captured(const innsteer_steerer *st, int layer, bool post, float *dst, int64_t max_rows) {
    if (!st || !dst || layer < 0 || layer >= st->n_layer || max_rows < 0) return INNSTEER_ERR_ARG;
    capture_set_copy(st->captures, layer, post, dst, max_rows);
    return INNSTEER_OK;
}

void innsteer_steerer_clear_captured(innsteer_steerer *st) {
    if (st) capture_set_clear(st->captures);
}

uint64_t innsteer_steerer_layer_visits(const innsteer_steerer *st, int layer) {
    if (!st || layer < 0 || layer >= st->n_layer) return 0;
    return atomic_load(&st->visits[layer]);
}

uint64_t innsteer_steerer_rows_steered(const innsteer_steerer *st) { return st ? atomic_load(&st->rows_steered) : 0; }
uint64_t innsteer_steerer_rows_rejected(const innsteer_steerer *st) { return st ? atomic_load(&st->rows_rejected) : 0; }
uint64_t innsteer_steerer_rows_on_device(const innsteer_steerer *st) { return st ? atomic_load(&st->rows_on_device) : 0; }
const char *innsteer_steerer_device_name(const innsteer_steerer *st) { return st ? graph_backend_name(st->backend) : ""; }

innsteer_status innsteer_steerer_set_path(innsteer_steerer *st, innsteer_path path, int min_rows, char *err, size_t err_size) {
    if (!st || path < INNSTEER_PATH_AUTO || path > INNSTEER_PATH_CPU_GRAPH || min_rows < 1) {
        return set_error(err, err_size, INNSTEER_ERR_ARG, "invalid path %d or min_rows %d", (int)path, min_rows);
    }
    pthread_mutex_lock(&st->lock);
    /* a started backend (and the weights on it) stays while the path keeps to the same kind of
     * device: switching between HOST and DEVICE costs nothing after the first use */
    bool want_cpu = path == INNSTEER_PATH_CPU_GRAPH;
    if (st->backend && path != INNSTEER_PATH_HOST && want_cpu != st->backend_is_cpu) {
        for (int i = 0; i < st->n_att; i++) free_graphs(&st->att[i]);
        graph_backend_free(st->backend);
        st->backend = NULL;
    }
    st->backend_failed = false;
    st->path = path;
    st->device_min_rows = min_rows;
    innsteer_status status = INNSTEER_OK;
    if ((path == INNSTEER_PATH_DEVICE || path == INNSTEER_PATH_CPU_GRAPH) && !st->backend) {
        status = graph_backend_new(path, st->n_threads, &st->backend, err, err_size);
        if (status != INNSTEER_OK) st->path = INNSTEER_PATH_HOST;
        st->backend_is_cpu = want_cpu;
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}
const char *innsteer_steerer_last_error(const innsteer_steerer *st) { return st ? st->last_error : ""; }

/* Parses "l_out-<il>"; returns -1 for any other name. */
static int steered_layer_of(const char *name, int n_layer) {
    if (!name || strncmp(name, LAYER_PREFIX, sizeof LAYER_PREFIX - 1) != 0) return -1;
    const char *p = name + sizeof LAYER_PREFIX - 1;
    if (*p < '0' || *p > '9') return -1;
    long il = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        il = il * 10 + (*p - '0');
        if (il >= n_layer) return -1;
    }
    return *p == '\0' ? (int)il : -1;
}

/* ---- the active sites at a layer -----------------------------------------------------------
 * The one walk over attachments that the ask pass, the host path and the graph path share, so
 * they always agree on what steers a layer. Called under the steerer's lock. */

typedef struct {
    attachment *a;
    int site;           /* index into a->flow->sites */
    float strength;     /* read once per batch: a concurrent set_strength never tears a row */
    innsteer_gate gate;
} active_site;

typedef struct {
    innsteer_steerer *st;
    int layer;
    int next; /* attachment index */
} site_iter;

static site_iter active_sites(innsteer_steerer *st, int layer) { return (site_iter){st, layer, 0}; }

/* Enabled attachments with a nonzero strength whose flow has a site at the layer, in attach
 * order; flows hold at most one site per layer. */
static bool next_active_site(site_iter *it, active_site *out) {
    while (it->next < it->st->n_att) {
        attachment *a = &it->st->att[it->next++];
        float strength = atomic_load(&a->strength);
        innsteer_gate gate = (innsteer_gate)atomic_load(&a->gate);
        if (!atomic_load(&a->enabled) || strength == 0.0f) continue;
        for (int s = 0; s < a->flow->n_sites; s++) {
            if (a->flow->sites[s].layer != it->layer) continue;
            *out = (active_site){a, s, strength, gate};
            return true;
        }
    }
    return false;
}

static bool steers_layer(innsteer_steerer *st, int layer) { return atomic_load(&st->active) && st->steered_at[layer]; }

static bool wants_layer(innsteer_steerer *st, int layer) {
    if (capture_set_enabled(st->captures, layer, false) || capture_set_enabled(st->captures, layer, true)) return true;
    if (!steers_layer(st, layer)) return false;
    site_iter it = active_sites(st, layer);
    active_site as;
    return next_active_site(&it, &as);
}

/* ---- the host path ------------------------------------------------------------------------ */

static bool all_finite(const float *v, int n) {
    for (int i = 0; i < n; i++) {
        if (!isfinite(v[i])) return false;
    }
    return true;
}

/* Steers rows [lo, hi) in place with worker t's buffers; a row whose result is not finite keeps
 * its original values (the KV cache must never see NaN/Inf). */
static void steer_range(innsteer_steerer *st, int t, const flow_site *site, float strength, innsteer_gate gate,
                        float *rows, int64_t lo, int64_t hi, uint64_t *steered, uint64_t *rejected) {
    int n_embd = st->n_embd;
    float *out = st->work[t], *scratch = out + (size_t)FLOW_BLOCK * n_embd;
    for (int64_t r = lo; r < hi; r += FLOW_BLOCK) {
        int n = (int)(hi - r < FLOW_BLOCK ? hi - r : FLOW_BLOCK);
        float *block = rows + r * n_embd;
        flow_site_steer_rows(site, n_embd, strength, gate, block, out, n, scratch);
        for (int j = 0; j < n; j++) {
            const float *o = out + (size_t)j * n_embd;
            if (all_finite(o, n_embd)) {
                memcpy(block + (size_t)j * n_embd, o, sizeof(float) * (size_t)n_embd);
                (*steered)++;
            } else {
                (*rejected)++;
            }
        }
    }
}

/* One site over a batch, split between the pool's threads by part. */
typedef struct {
    innsteer_steerer *st;
    const flow_site *site;
    float strength;
    innsteer_gate gate;
    float *rows;
    int64_t n_rows;
    uint64_t steered[POOL_MAX_THREADS], rejected[POOL_MAX_THREADS];
} steer_job;

static void steer_part(void *arg, int part, int n_parts) {
    steer_job *j = arg;
    /* split on block boundaries so every thread runs whole blocks */
    int64_t blocks = (j->n_rows + FLOW_BLOCK - 1) / FLOW_BLOCK;
    int64_t lo = blocks * part / n_parts * FLOW_BLOCK, hi = blocks * (part + 1) / n_parts * FLOW_BLOCK;
    if (hi > j->n_rows) hi = j->n_rows;
    j->steered[part] = j->rejected[part] = 0;
    if (lo < hi) steer_range(j->st, part, j->site, j->strength, j->gate, j->rows, lo, hi, &j->steered[part], &j->rejected[part]);
}

/* One site over all rows: across the pool for prompt batches, inline for decode. */
static void steer_site(innsteer_steerer *st, const flow_site *site, float strength, innsteer_gate gate, float *rows,
                       int64_t n_rows, uint64_t *steered, uint64_t *rejected) {
    steer_job job = {.st = st, .site = site, .strength = strength, .gate = gate, .rows = rows, .n_rows = n_rows};
    int parts = n_rows >= PARALLEL_MIN_ROWS ? st->n_threads : 1;
    if (parts < 2 || !pool_run(&st->workers, parts, steer_part, &job)) {
        parts = 1;
        steer_part(&job, 0, 1);
    }
    for (int t = 0; t < parts; t++) {
        *steered += job.steered[t];
        *rejected += job.rejected[t];
    }
}

/* Steers rows in place with every active site at this layer, in attach order. */
static bool steer_rows(innsteer_steerer *st, int layer, float *rows, int64_t n_rows) {
    bool changed = false;
    uint64_t steered = 0, rejected = 0;
    site_iter it = active_sites(st, layer);
    for (active_site as; next_active_site(&it, &as);) {
        steer_site(st, &as.a->flow->sites[as.site], as.strength, as.gate, rows, n_rows, &steered, &rejected);
        changed = true;
    }
    atomic_fetch_add(&st->rows_steered, steered);
    atomic_fetch_add(&st->rows_rejected, rejected);
    return changed;
}

/* ---- the graph path ----------------------------------------------------------------------- */

/* Whether the graph path can run: starts the backend at the first batch that asks (AUTO: a GPU if
 * ggml has one; none is not an error). */
static bool graph_backend_ready(innsteer_steerer *st) {
    if (st->path == INNSTEER_PATH_HOST || st->backend_failed) return false;
    if (st->backend) return true;
    char err[200];
    innsteer_path want = st->path == INNSTEER_PATH_CPU_GRAPH ? INNSTEER_PATH_CPU_GRAPH : INNSTEER_PATH_DEVICE;
    st->backend_is_cpu = want == INNSTEER_PATH_CPU_GRAPH;
    if (graph_backend_new(want, st->n_threads, &st->backend, err, sizeof err) != INNSTEER_OK) {
        st->backend_failed = true;
        if (st->path != INNSTEER_PATH_AUTO) {
            set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_UNSUPPORTED, "graph path: %s; using the host path", err);
        }
        return false;
    }
    return true;
}

/* Every active site at this layer on the graph path, in attach order; a site the graph cannot
 * take (a gate it does not compute, an error) takes the host round trip instead. */
static void steer_tensor_graph(innsteer_steerer *st, const ggml_api *G, int layer, struct ggml_tensor *t, int64_t n_rows) {
    uint64_t steered = 0, rejected = 0, on_device = 0;
    size_t bytes = sizeof(float) * (size_t)n_rows * (size_t)st->n_embd;
    site_iter it = active_sites(st, layer);
    for (active_site as; next_active_site(&it, &as);) {
        const flow_site *site = &as.a->flow->sites[as.site];
        flow_graph **graph = &as.a->graphs[as.site];
        char err[200] = "";
        innsteer_status status = INNSTEER_OK;
        if (!*graph) status = flow_graph_new(site, st->n_embd, st->backend, graph, err, sizeof err);
        if (status == INNSTEER_OK && flow_graph_supports(*graph, as.gate)) {
            uint64_t before = steered;
            status = flow_graph_steer_tensor(*graph, t, n_rows, as.strength, as.gate, st->rows, &steered, &rejected, err, sizeof err);
            if (status == INNSTEER_OK) {
                on_device += steered - before;
                continue;
            }
        }
        if (err[0]) {
            set_error(st->last_error, sizeof st->last_error, status, "graph path (layer %d): %s; used the host path", layer, err);
        }
        G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
        steer_site(st, site, as.strength, as.gate, st->rows, n_rows, &steered, &rejected);
        G->ggml_backend_tensor_set(t, st->rows, 0, bytes);
    }
    atomic_fetch_add(&st->rows_steered, steered);
    atomic_fetch_add(&st->rows_rejected, rejected);
    atomic_fetch_add(&st->rows_on_device, on_device);
}

/* ---- the callback ------------------------------------------------------------------------- */

static void capture_rows(innsteer_steerer *st, int layer, bool post, const float *rows, int64_t n_rows) {
    capture_set_append(st->captures, layer, post, rows, n_rows, st->last_error, sizeof st->last_error);
}

static void handle_tensor(innsteer_steerer *st, const ggml_api *G, struct ggml_tensor *t, int layer) {
    int64_t n = G->ggml_nelements(t), n_rows = G->ggml_nrows(t);
    if (n_rows <= 0 || n % n_rows != 0 || n / n_rows != st->n_embd || G->ggml_element_size(t) != 4 ||
        G->ggml_nbytes(t) != (size_t)n * 4 || !G->ggml_is_contiguous(t)) {
        set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_MISMATCH,
                  "tensor %s is not a contiguous f32 tensor of %d-wide rows (%lld elements in %lld rows); not steered",
                  G->ggml_get_name(t), st->n_embd, (long long)n, (long long)n_rows);
        return;
    }
    if ((size_t)n_rows > st->rows_cap) {
        float *grown = realloc(st->rows, sizeof(float) * (size_t)n);
        if (!grown) {
            set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_NOMEM, "out of memory for %lld rows; not steered",
                      (long long)n_rows);
            return;
        }
        st->rows = grown;
        st->rows_cap = (size_t)n_rows;
    }
    size_t bytes = sizeof(float) * (size_t)n;
    bool pre = capture_set_enabled(st->captures, layer, false), post = capture_set_enabled(st->captures, layer, true);
    bool steer = steers_layer(st, layer);
    if (steer && n_rows >= st->device_min_rows && graph_backend_ready(st)) {
        /* the activations stay where they are; captures (a tool path) read them to the host */
        if (pre) {
            G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
            capture_rows(st, layer, false, st->rows, n_rows);
        }
        steer_tensor_graph(st, G, layer, t, n_rows);
        if (post) {
            G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
            capture_rows(st, layer, true, st->rows, n_rows);
        }
        return;
    }
    G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
    if (pre) capture_rows(st, layer, false, st->rows, n_rows);
    if (steer && steer_rows(st, layer, st->rows, n_rows)) G->ggml_backend_tensor_set(t, st->rows, 0, bytes);
    if (post) capture_rows(st, layer, true, st->rows, n_rows);
}

bool innsteer_eval_callback(struct ggml_tensor *t, bool ask, void *user_data) {
    innsteer_steerer *st = user_data;
    if (!st) return !ask;
    char err[128];
    const ggml_api *G = ggml_api_tensor(err, sizeof err);
    int layer = G ? steered_layer_of(G->ggml_get_name(t), st->n_layer) : -1;
    bool ours = false;
    /* the lock only for our layers: the scheduler calls this for every node of the graph */
    if (!G || layer >= 0) {
        pthread_mutex_lock(&st->lock);
        if (!G) {
            set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_UNSUPPORTED, "%s; not steered", err);
        } else if (ask) {
            /* asked about every node once per graph: count here, so a model whose graph lacks
             * l_out-<layer> shows zero visits */
            atomic_fetch_add(&st->visits[layer], 1);
            ours = wants_layer(st, layer);
        } else if (wants_layer(st, layer)) {
            handle_tensor(st, G, t, layer);
        }
        pthread_mutex_unlock(&st->lock);
    }
    if (!st->chain_cb) return ask ? ours : true;
    bool chained = st->chain_cb(t, ask, st->chain_ud);
    /* ask: compute up to this node if either of us wants it; otherwise continue unless the
     * chained callback asked to stop */
    return ask ? (ours || chained) : chained;
}
