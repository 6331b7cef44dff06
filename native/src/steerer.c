/* The llama.cpp eval callback: steers (and optionally captures) the rows of l_out-<layer>.
 * Attachments, settings and the callback's buffers are guarded by the steerer's lock; captured
 * rows live in capture.c, the worker threads in pool.c, the graph path in flow_graph.c. */
#include "batch_map.h"
#include "capture.h"
#include "error.h"
#include "flow.h"
#include "flow_graph.h"
#include "ggml_api.h"
#include "grow.h"
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

/* One sequence's steering while a multi-sequence batch is begun (innsteer.h: slots). */
typedef struct {
    bool used;
    int n;
    int flow_id[INNSTEER_MAX_SLOT_FLOWS];
    float strength[INNSTEER_MAX_SLOT_FLOWS];
    innsteer_gate gate[INNSTEER_MAX_SLOT_FLOWS];
    uint64_t tokens, steered, rejected;
} slot;

/* The begun batch: its ubatches and per-row buffers, grown only for a larger batch than before. */
typedef struct {
    bool on;
    innsteer_split split;
    batch_map map;
    int *ub_seen;      /* per layer: ubatches whose l_out-<layer> was seen since the batch began */
    size_t cap;        /* rows the buffers below hold */
    int32_t *row_slot; /* per row of the tensor at hand */
    float *row_strength;
    int8_t *row_gate;
    int32_t *pending, *picked; /* row indices: still to steer with a flow, steered together now */
    uint8_t *bad;      /* per picked row: kept because steering made it non-finite */
    float *gathered;   /* the picked rows, contiguous */
} batch_state;

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
    char last_error[256];
    /* graph path (flow_graph.c) */
    innsteer_path path;
    int device_min_rows;
    graph_backend *backend; /* started at the first batch that takes the graph path */
    struct ggml_backend_device *device; /* the DEVICE path's device if the application named one */
    bool backend_is_cpu;
    bool backend_failed;    /* no device: the host path from then on */
    atomic_uint_fast64_t rows_on_device;
    slot slots[INNSTEER_MAX_SLOTS];
    batch_state batch;
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
    batch_map_free(&st->batch.map);
    free(st->batch.ub_seen);
    free(st->batch.row_slot);
    free(st->batch.row_strength);
    free(st->batch.row_gate);
    free(st->batch.pending);
    free(st->batch.picked);
    free(st->batch.bad);
    free(st->batch.gathered);
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
    for (int k = 0; k < INNSTEER_MAX_SLOTS; k++) {
        slot *sl = &st->slots[k];
        for (int e = 0; e < sl->n; e++) {
            if (sl->flow_id[e] != id) continue;
            sl->n--;
            sl->flow_id[e] = sl->flow_id[sl->n];
            sl->strength[e] = sl->strength[sl->n];
            sl->gate[e] = sl->gate[sl->n];
            break;
        }
    }
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
    innsteer_status status = INNSTEER_OK;
    if (!a) status = INNSTEER_ERR_ARG;
    else if (gate != INNSTEER_GATE_OFF && !innsteer_flow_has_gate(a->flow)) status = INNSTEER_ERR_UNSUPPORTED;
    else atomic_store(&a->gate, gate);
    pthread_mutex_unlock(&st->lock);
    return status;
}

void innsteer_steerer_set_active(innsteer_steerer *st, bool active) {
    if (st) atomic_store(&st->active, active);
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
        status = graph_backend_new(path, st->device, st->n_threads, &st->backend, err, err_size);
        if (status != INNSTEER_OK) st->path = INNSTEER_PATH_HOST;
        st->backend_is_cpu = want_cpu;
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}
innsteer_status innsteer_steerer_set_device(innsteer_steerer *st, struct ggml_backend_device *device) {
    if (!st) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    if (st->backend && !st->backend_is_cpu && device != st->device) { /* restarted on the new device when next used */
        for (int i = 0; i < st->n_att; i++) free_graphs(&st->att[i]);
        graph_backend_free(st->backend);
        st->backend = NULL;
    }
    st->device = device;
    st->backend_failed = false;
    pthread_mutex_unlock(&st->lock);
    return INNSTEER_OK;
}

const char *innsteer_steerer_last_error(const innsteer_steerer *st) { return st ? st->last_error : ""; }

/* ---- slots and begun batches ---------------------------------------------------------------- */

static bool slot_ok(const innsteer_steerer *st, int k) { return k >= 0 && k < INNSTEER_MAX_SLOTS && st->slots[k].used; }

innsteer_status innsteer_slot_new(innsteer_steerer *st, int *slot_out) {
    if (!st || !slot_out) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    innsteer_status status = INNSTEER_ERR_NOMEM;
    for (int k = 0; k < INNSTEER_MAX_SLOTS; k++) {
        if (st->slots[k].used) continue;
        st->slots[k] = (slot){.used = true};
        *slot_out = k;
        status = INNSTEER_OK;
        break;
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}

innsteer_status innsteer_slot_free(innsteer_steerer *st, int k) {
    if (!st) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    bool ok = slot_ok(st, k);
    if (ok) st->slots[k].used = false;
    pthread_mutex_unlock(&st->lock);
    return ok ? INNSTEER_OK : INNSTEER_ERR_ARG;
}

innsteer_status innsteer_slot_clear(innsteer_steerer *st, int k) {
    if (!st) return INNSTEER_ERR_ARG;
    pthread_mutex_lock(&st->lock);
    bool ok = slot_ok(st, k);
    if (ok) st->slots[k].n = 0;
    pthread_mutex_unlock(&st->lock);
    return ok ? INNSTEER_OK : INNSTEER_ERR_ARG;
}

innsteer_status innsteer_slot_put(innsteer_steerer *st, int k, int flow_id, float strength, innsteer_gate gate, char *err,
                                  size_t err_size) {
    if (!st) return set_error(err, err_size, INNSTEER_ERR_ARG, "steerer must not be NULL");
    if (!isfinite(strength)) return set_error(err, err_size, INNSTEER_ERR_ARG, "strength %g is not finite", (double)strength);
    if (gate < INNSTEER_GATE_OFF || gate > INNSTEER_GATE_TARGET) return set_error(err, err_size, INNSTEER_ERR_ARG, "unknown gate %d", (int)gate);
    pthread_mutex_lock(&st->lock);
    innsteer_status status = INNSTEER_OK;
    attachment *a = find(st, flow_id);
    if (!slot_ok(st, k)) {
        status = set_error(err, err_size, INNSTEER_ERR_ARG, "slot %d is not in use", k);
    } else if (!a) {
        status = set_error(err, err_size, INNSTEER_ERR_ARG, "no attached flow has id %d", flow_id);
    } else if (gate != INNSTEER_GATE_OFF && !innsteer_flow_has_gate(a->flow)) {
        status = set_error(err, err_size, INNSTEER_ERR_ARG, "flow %d carries no gate parameters", flow_id);
    } else {
        slot *sl = &st->slots[k];
        int e = 0;
        while (e < sl->n && sl->flow_id[e] != flow_id) e++;
        if (strength == 0.0f) {
            if (e < sl->n) {
                sl->n--;
                sl->flow_id[e] = sl->flow_id[sl->n];
                sl->strength[e] = sl->strength[sl->n];
                sl->gate[e] = sl->gate[sl->n];
            }
        } else if (e == sl->n && sl->n == INNSTEER_MAX_SLOT_FLOWS) {
            status = set_error(err, err_size, INNSTEER_ERR_ARG, "a slot holds at most %d flows", INNSTEER_MAX_SLOT_FLOWS);
        } else {
            if (e == sl->n) sl->n++;
            sl->flow_id[e] = flow_id;
            sl->strength[e] = strength;
            sl->gate[e] = gate;
        }
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}

innsteer_status innsteer_slot_get_stats(const innsteer_steerer *st, int k, innsteer_slot_stats *out) {
    if (!st || !out) return INNSTEER_ERR_ARG;
    innsteer_steerer *mut = (innsteer_steerer *)st; /* the lock only */
    pthread_mutex_lock(&mut->lock);
    bool ok = slot_ok(st, k);
    if (ok) *out = (innsteer_slot_stats){st->slots[k].tokens, st->slots[k].steered, st->slots[k].rejected};
    pthread_mutex_unlock(&mut->lock);
    return ok ? INNSTEER_OK : INNSTEER_ERR_ARG;
}

static bool grow_batch_rows(innsteer_steerer *st, size_t n) {
    batch_state *b = &st->batch;
    if (n > st->rows_cap) {
        float *grown = realloc(st->rows, sizeof(float) * n * (size_t)st->n_embd);
        if (!grown) return false;
        st->rows = grown;
        st->rows_cap = n;
    }
    if (n <= b->cap) return true;
    void **const ints[] = {(void **)&b->row_slot, (void **)&b->pending, (void **)&b->picked,
                           (void **)&b->row_strength};
    void **const bytes[] = {(void **)&b->row_gate, (void **)&b->bad};
    if (!grow_arrays(ints, sizeof ints / sizeof ints[0], 4 * n)) return false;
    if (!grow_arrays(bytes, sizeof bytes / sizeof bytes[0], n)) return false;
    float *gathered = realloc(b->gathered, sizeof(float) * n * (size_t)st->n_embd);
    if (!gathered) return false;
    b->gathered = gathered;
    b->cap = n;
    return true;
}

innsteer_status innsteer_steerer_batch_begin(innsteer_steerer *st, int n_tokens, const int32_t *seq_ids, const int32_t *slots,
                                             const int8_t *outputs, int n_ubatch, innsteer_split split, char *err,
                                             size_t err_size) {
    if (!st) return set_error(err, err_size, INNSTEER_ERR_ARG, "steerer must not be NULL");
    pthread_mutex_lock(&st->lock);
    batch_state *b = &st->batch;
    b->on = false;
    innsteer_status status = batch_map_fill(&b->map, n_tokens, seq_ids, slots, outputs, n_ubatch, split, err, err_size);
    for (int i = 0; status == INNSTEER_OK && i < n_tokens; i++) {
        if (slots[i] != -1 && !slot_ok(st, slots[i])) {
            status = set_error(err, err_size, INNSTEER_ERR_ARG, "token %d: slot %d is not in use (-1 means unsteered)", i, slots[i]);
        }
    }
    if (status == INNSTEER_OK && !b->ub_seen && !(b->ub_seen = calloc((size_t)st->n_layer, sizeof *b->ub_seen))) {
        status = set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    }
    /* the last layer may hold the outputs only, never more rows than tokens */
    if (status == INNSTEER_OK && !grow_batch_rows(st, (size_t)n_tokens)) {
        status = set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory for a batch of %d tokens", n_tokens);
    }
    if (status == INNSTEER_OK) {
        memset(b->ub_seen, 0, sizeof *b->ub_seen * (size_t)st->n_layer);
        for (int i = 0; i < n_tokens; i++) {
            if (slots[i] >= 0) st->slots[slots[i]].tokens++;
        }
        b->split = split;
        b->on = true;
    }
    pthread_mutex_unlock(&st->lock);
    return status;
}

void innsteer_steerer_batch_end(innsteer_steerer *st) {
    if (!st) return;
    pthread_mutex_lock(&st->lock);
    st->batch.on = false;
    pthread_mutex_unlock(&st->lock);
}

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
 * One list that the ask pass, the host path and the graph path share, so they always agree on
 * what steers a layer. Built under the steerer's lock. */

typedef struct {
    attachment *a;
    int site;           /* index into a->flow->sites */
    float strength;     /* read once per batch: a concurrent set_strength never tears a row */
    innsteer_gate gate;
} active_site;

typedef struct {
    active_site s[MAX_ATTACHED];
    int n;
} site_list;

/* The attachment's site at this layer, or -1 (flows hold at most one site per layer). */
static int site_at(const attachment *a, int layer) {
    for (int s = 0; s < a->flow->n_sites; s++) {
        if (a->flow->sites[s].layer == layer) return s;
    }
    return -1;
}

/* Whole-batch steering: enabled attachments with a nonzero strength and a site at the layer, in
 * attach order. */
static void global_sites(innsteer_steerer *st, int layer, site_list *out) {
    out->n = 0;
    for (int i = 0; i < st->n_att; i++) {
        attachment *a = &st->att[i];
        float strength = atomic_load(&a->strength);
        int site = site_at(a, layer);
        if (!atomic_load(&a->enabled) || strength == 0.0f || site < 0) continue;
        out->s[out->n++] = (active_site){a, site, strength, (innsteer_gate)atomic_load(&a->gate)};
    }
}

/* The strength and gate a slot gives an attachment (0 when absent or for slot -1). */
static float slot_strength(const innsteer_steerer *st, int k, int flow_id, innsteer_gate *gate) {
    *gate = INNSTEER_GATE_OFF;
    if (k < 0) return 0.0f;
    const slot *sl = &st->slots[k];
    for (int e = 0; e < sl->n; e++) {
        if (sl->flow_id[e] == flow_id) {
            *gate = sl->gate[e];
            return sl->strength[e];
        }
    }
    return 0.0f;
}

static bool steers_layer(innsteer_steerer *st, int layer) { return atomic_load(&st->active) && st->steered_at[layer]; }

/* A begun batch wants a layer when a token's slot has a flow with a site there. */
static bool batch_wants_layer(innsteer_steerer *st, int layer) {
    const batch_map *m = &st->batch.map;
    for (int i = 0; i < st->n_att; i++) {
        attachment *a = &st->att[i];
        if (site_at(a, layer) < 0) continue;
        int last = -2;
        for (int t = 0; t < m->n_tokens; t++) {
            if (m->slot[t] == last) continue; /* runs of one sequence's tokens */
            last = m->slot[t];
            innsteer_gate gate;
            if (slot_strength(st, last, a->id, &gate) != 0.0f) return true;
        }
    }
    return false;
}

static bool wants_layer(innsteer_steerer *st, int layer) {
    if (capture_set_enabled(st->captures, layer, false) || capture_set_enabled(st->captures, layer, true)) return true;
    if (!steers_layer(st, layer)) return false;
    if (st->batch.on) return batch_wants_layer(st, layer);
    site_list sites;
    global_sites(st, layer, &sites);
    return sites.n > 0;
}

/* ---- the host path ------------------------------------------------------------------------ */

static bool all_finite(const float *v, int n) {
    for (int i = 0; i < n; i++) {
        if (!isfinite(v[i])) return false;
    }
    return true;
}

/* Steers rows [lo, hi) in place with worker t's buffers; a row whose result is not finite keeps
 * its original values (the KV cache must never see NaN/Inf) and, where bad is given, is marked
 * there. */
static void steer_range(innsteer_steerer *st, int t, const flow_site *site, float strength, innsteer_gate gate,
                        float *rows, int64_t lo, int64_t hi, uint8_t *bad, uint64_t *steered, uint64_t *rejected) {
    int n_embd = st->n_embd;
    float *out = st->work[t], *scratch = out + (size_t)FLOW_BLOCK * n_embd;
    for (int64_t r = lo; r < hi; r += FLOW_BLOCK) {
        int n = (int)(hi - r < FLOW_BLOCK ? hi - r : FLOW_BLOCK);
        float *block = rows + r * n_embd;
        flow_site_steer_rows(site, n_embd, strength, gate, block, out, n, scratch);
        for (int j = 0; j < n; j++) {
            const float *o = out + (size_t)j * n_embd;
            bool ok = all_finite(o, n_embd);
            if (ok) {
                memcpy(block + (size_t)j * n_embd, o, sizeof(float) * (size_t)n_embd);
                (*steered)++;
            } else {
                (*rejected)++;
            }
            if (bad) bad[r + j] = !ok;
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
    uint8_t *bad;
    uint64_t steered[POOL_MAX_THREADS], rejected[POOL_MAX_THREADS];
} steer_job;

static void steer_part(void *arg, int part, int n_parts) {
    steer_job *j = arg;
    /* split on block boundaries so every thread runs whole blocks */
    int64_t blocks = (j->n_rows + FLOW_BLOCK - 1) / FLOW_BLOCK;
    int64_t lo = blocks * part / n_parts * FLOW_BLOCK, hi = blocks * (part + 1) / n_parts * FLOW_BLOCK;
    if (hi > j->n_rows) hi = j->n_rows;
    j->steered[part] = j->rejected[part] = 0;
    if (lo < hi) steer_range(j->st, part, j->site, j->strength, j->gate, j->rows, lo, hi, j->bad, &j->steered[part], &j->rejected[part]);
}

/* One site over all rows: across the pool for prompt batches, inline for decode. */
static void steer_site(innsteer_steerer *st, const flow_site *site, float strength, innsteer_gate gate, float *rows,
                       int64_t n_rows, uint8_t *bad, uint64_t *steered, uint64_t *rejected) {
    steer_job job = {.st = st, .site = site, .strength = strength, .gate = gate, .rows = rows, .n_rows = n_rows, .bad = bad};
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

/* Steers rows in place with every site of the list, in order. */
static bool steer_rows(innsteer_steerer *st, const site_list *sites, float *rows, int64_t n_rows) {
    uint64_t steered = 0, rejected = 0;
    for (int i = 0; i < sites->n; i++) {
        const active_site *as = &sites->s[i];
        steer_site(st, &as->a->flow->sites[as->site], as->strength, as->gate, rows, n_rows, NULL, &steered, &rejected);
    }
    atomic_fetch_add(&st->rows_steered, steered);
    atomic_fetch_add(&st->rows_rejected, rejected);
    return sites->n > 0;
}

/* A begun batch on host rows: for each attachment with a site here (attach order), the rows whose
 * slots give it the same strength and gate are gathered, steered together and put back; each
 * row's counts go to its own slot. Rows no slot steers are never written. */
static bool steer_rows_by_slot(innsteer_steerer *st, int layer, float *rows, int64_t n_rows) {
    batch_state *b = &st->batch;
    size_t row_bytes = sizeof(float) * (size_t)st->n_embd;
    uint64_t steered = 0, rejected = 0;
    bool changed = false;
    for (int i = 0; i < st->n_att; i++) {
        attachment *a = &st->att[i];
        int site = site_at(a, layer);
        if (site < 0) continue;
        int64_t n_pending = 0;
        for (int64_t r = 0; r < n_rows; r++) {
            innsteer_gate gate;
            float strength = slot_strength(st, b->row_slot[r], a->id, &gate);
            if (strength == 0.0f) continue;
            b->row_strength[r] = strength;
            b->row_gate[r] = (int8_t)gate;
            b->pending[n_pending++] = (int32_t)r;
        }
        while (n_pending > 0) {
            float strength = b->row_strength[b->pending[0]];
            innsteer_gate gate = (innsteer_gate)b->row_gate[b->pending[0]];
            int64_t n_picked = 0, n_left = 0;
            for (int64_t j = 0; j < n_pending; j++) {
                int32_t r = b->pending[j];
                if (b->row_strength[r] == strength && b->row_gate[r] == (int8_t)gate) {
                    memcpy(b->gathered + (size_t)n_picked * st->n_embd, rows + (size_t)r * st->n_embd, row_bytes);
                    b->picked[n_picked++] = r;
                } else {
                    b->pending[n_left++] = r;
                }
            }
            n_pending = n_left;
            steer_site(st, &a->flow->sites[site], strength, gate, b->gathered, n_picked, b->bad, &steered, &rejected);
            for (int64_t j = 0; j < n_picked; j++) {
                int32_t r = b->picked[j];
                slot *sl = &st->slots[b->row_slot[r]];
                if (b->bad[j]) {
                    sl->rejected++;
                    continue;
                }
                memcpy(rows + (size_t)r * st->n_embd, b->gathered + (size_t)j * st->n_embd, row_bytes);
                sl->steered++;
            }
            changed = true;
        }
    }
    atomic_fetch_add(&st->rows_steered, steered);
    atomic_fetch_add(&st->rows_rejected, rejected);
    return changed;
}

/* When every row of the tensor gets the same steering from its slot (one sequence's prompt, or
 * sequences that share a setting), the batch can take the whole-tensor graph path. */
static bool uniform_slot_sites(innsteer_steerer *st, int layer, int64_t n_rows, site_list *out) {
    out->n = 0;
    for (int i = 0; i < st->n_att; i++) {
        attachment *a = &st->att[i];
        int site = site_at(a, layer);
        if (site < 0) continue;
        innsteer_gate gate, g;
        float strength = slot_strength(st, st->batch.row_slot[0], a->id, &gate);
        for (int64_t r = 1; r < n_rows; r++) {
            if (slot_strength(st, st->batch.row_slot[r], a->id, &g) != strength || g != gate) return false;
        }
        if (strength != 0.0f) out->s[out->n++] = (active_site){a, site, strength, gate};
    }
    return true;
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
    if (graph_backend_new(want, st->device, st->n_threads, &st->backend, err, sizeof err) != INNSTEER_OK) {
        st->backend_failed = true;
        if (st->path != INNSTEER_PATH_AUTO) {
            set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_UNSUPPORTED, "graph path: %s; using the host path", err);
        }
        return false;
    }
    return true;
}

/* Every site of the list on the graph path, in order; a site the graph cannot take (a gate it
 * does not compute, an error) takes the host round trip instead. by_slot: a begun batch, whose
 * rows count for their own slots. */
static void steer_tensor_graph(innsteer_steerer *st, const ggml_api *G, int layer, struct ggml_tensor *t, int64_t n_rows,
                               const site_list *sites, bool by_slot) {
    uint64_t steered = 0, rejected = 0, on_device = 0;
    size_t bytes = sizeof(float) * (size_t)n_rows * (size_t)st->n_embd;
    uint8_t *bad = by_slot ? st->batch.bad : NULL;
    for (int i = 0; i < sites->n; i++) {
        const active_site *as = &sites->s[i];
        const flow_site *site = &as->a->flow->sites[as->site];
        flow_graph **graph = &as->a->graphs[as->site];
        char err[200] = "";
        innsteer_status status = INNSTEER_OK;
        uint64_t before = steered;
        bool done = false;
        if (!*graph) status = flow_graph_new(site, st->n_embd, st->backend, graph, err, sizeof err);
        if (status == INNSTEER_OK && flow_graph_supports(*graph, as->gate)) {
            status = flow_graph_steer_tensor(*graph, t, n_rows, as->strength, as->gate, st->rows, bad, &steered, &rejected,
                                             err, sizeof err);
            if (status == INNSTEER_OK) {
                on_device += steered - before;
                done = true;
            }
        }
        if (!done) {
            if (err[0]) {
                set_error(st->last_error, sizeof st->last_error, status, "graph path (layer %d): %s; used the host path", layer, err);
            }
            G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
            steer_site(st, site, as->strength, as->gate, st->rows, n_rows, bad, &steered, &rejected);
            G->ggml_backend_tensor_set(t, st->rows, 0, bytes);
        }
        if (by_slot) {
            for (int64_t r = 0; r < n_rows; r++) {
                slot *sl = &st->slots[st->batch.row_slot[r]];
                if (bad[r]) {
                    sl->rejected++;
                } else {
                    sl->steered++;
                }
            }
        }
    }
    atomic_fetch_add(&st->rows_steered, steered);
    atomic_fetch_add(&st->rows_rejected, rejected);
    atomic_fetch_add(&st->rows_on_device, on_device);
}

/* ---- the callback ------------------------------------------------------------------------- */

static void capture_rows(innsteer_steerer *st, int layer, bool post, const float *rows, int64_t n_rows) {
    capture_set_append(st->captures, layer, post, rows, n_rows, st->last_error, sizeof st->last_error);
}

/* For a begun batch: each row's slot, from the ubatch this tensor belongs to. */
static bool map_rows_to_slots(innsteer_steerer *st, int layer, int64_t n_rows) {
    batch_state *b = &st->batch;
    int u = b->ub_seen[layer] - 1;
    const int32_t *idx = batch_map_rows(&b->map, u, n_rows);
    if (!idx) {
        const batch_map *m = &b->map;
        if (u >= m->n_ubatches) {
            set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_MISMATCH,
                      "l_out-%d was computed %d times for a batch that the %s split cuts into %d ubatches: llama.cpp split "
                      "it another way; not steered", layer, u + 1, b->split == INNSTEER_SPLIT_SIMPLE ? "simple" : "equal",
                      m->n_ubatches);
        } else {
            set_error(st->last_error, sizeof st->last_error, INNSTEER_ERR_MISMATCH,
                      "l_out-%d has %lld rows in ubatch %d, which holds %d tokens and %d outputs under the %s split: "
                      "llama.cpp split this batch another way; not steered", layer, (long long)n_rows, u,
                      m->ub_start[u + 1] - m->ub_start[u], m->ub_out[u + 1] - m->ub_out[u],
                      b->split == INNSTEER_SPLIT_SIMPLE ? "simple" : "equal");
        }
        return false;
    }
    for (int64_t r = 0; r < n_rows; r++) b->row_slot[r] = b->map.slot[idx[r]];
    return true;
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
    bool by_slot = st->batch.on;
    bool steer = steers_layer(st, layer) && (!by_slot || map_rows_to_slots(st, layer, n_rows));
    site_list sites = {.n = 0};
    bool whole = false; /* the same steering for every row: the graph path may take it */
    if (steer) {
        if (by_slot) {
            whole = uniform_slot_sites(st, layer, n_rows, &sites);
        } else {
            global_sites(st, layer, &sites);
            whole = true;
        }
    }
    if (whole && sites.n > 0 && n_rows >= st->device_min_rows && graph_backend_ready(st)) {
        /* the activations stay where they are; captures (a tool path) read them to the host */
        if (pre) {
            G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
            capture_rows(st, layer, false, st->rows, n_rows);
        }
        steer_tensor_graph(st, G, layer, t, n_rows, &sites, by_slot);
        if (post) {
            G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
            capture_rows(st, layer, true, st->rows, n_rows);
        }
        return;
    }
    G->ggml_backend_tensor_get(t, st->rows, 0, bytes);
    if (pre) capture_rows(st, layer, false, st->rows, n_rows);
    bool changed = false;
    if (steer) changed = by_slot ? steer_rows_by_slot(st, layer, st->rows, n_rows) : steer_rows(st, &sites, st->rows, n_rows);
    if (changed) G->ggml_backend_tensor_set(t, st->rows, 0, bytes);
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
             * l_out-<layer> shows zero visits, and a begun batch knows which ubatch this is */
            atomic_fetch_add(&st->visits[layer], 1);
            if (st->batch.on) st->batch.ub_seen[layer]++;
            ours = wants_layer(st, layer);
        } else if (wants_layer(st, layer)) {
            handle_tensor(st, G, t, layer);
        }
        pthread_mutex_unlock(&st->lock);
    }
    return ask ? ours : true;
}
