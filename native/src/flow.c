/* Flow loading: every value from the file is validated before it is used, and validation costs
 * at most MAX_RANK operations per float of the file (a downloaded or uploaded file is untrusted).
 * What each op kind reads and checks is its entry of OP_KIND_IMPLS (flow_ops.c). */
#define _POSIX_C_SOURCE 200809L /* open(O_NONBLOCK), fstat */
#include "flow_ops.h"
#include "kernels.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ARENA_ALIGN 64

/* Looks a tensor up, checks its shape (ne[0] = cols, ne[1] = rows) and copies it into the arena as
 * f32 (or i32), rejecting non-finite values. */
innsteer_status flow_load_tensor(flow_loader *L, const char *name, int rows, int cols, bool is_int, const void **out) {
    const ggufr_tensor *t = ggufr_find_tensor(&L->g, name);
    if (!t) return FAIL(L, INNSTEER_ERR_INVALID, "missing tensor '%s'", name);
    uint64_t want_rows = (uint64_t)rows;
    bool shape_ok = t->ne[0] == (uint64_t)cols && t->ne[1] == want_rows && t->ne[2] == 1 && t->ne[3] == 1;
    if (!shape_ok) {
        return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s' has shape [%llu x %llu], expected [%d x %d]", name,
                    (unsigned long long)t->ne[1], (unsigned long long)t->ne[0], rows, cols);
    }
    if (is_int != (t->type == GT_I32)) {
        return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s' has ggml type %u, expected %s", name, t->type,
                    is_int ? "i32" : "f32 or f16");
    }
    size_t n = (size_t)t->n_elements;
    size_t bytes = (n * 4 + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    if (bytes > L->arena_size - L->arena_used) return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s' overflows the weight arena", name);
    uint8_t *dst = L->arena + L->arena_used;
    L->arena_used += bytes;
    if (t->type == GT_F16) {
        float *f = (float *)dst;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, t->data + 2 * i, 2);
            uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
            if (exp == 0x1f) {
                return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s' element %zu is not finite", name, i);
            } else if (exp == 0) {
                float v = ldexpf((float)mant, -24);
                memcpy(&bits, &v, 4);
                bits |= sign;
            } else {
                bits = sign | ((exp + 112) << 23) | (mant << 13);
            }
            memcpy(&f[i], &bits, 4);
        }
    } else {
        memcpy(dst, t->data, n * 4);
        if (!is_int) {
            const float *f = (const float *)dst;
            for (size_t i = 0; i < n; i++) {
                if (!isfinite(f[i])) return FAIL(L, INNSTEER_ERR_INVALID, "tensor '%s' element %zu is not finite", name, i);
            }
        }
    }
    *out = dst;
    return INNSTEER_OK;
}

innsteer_status flow_load_vec(flow_loader *L, const char *name, int n, const float **out) {
    return flow_load_tensor(L, name, 1, n, false, (const void **)out);
}

innsteer_status flow_load_mat(flow_loader *L, const char *name, int rows, int cols, const float **out) {
    return flow_load_tensor(L, name, rows, cols, false, (const void **)out);
}

/* Deterministic probe rows for the load-time invertibility check. */
static void probe_row(float *v, int n, int seed) {
    uint32_t s = 2463534242u + (uint32_t)seed * 7919u;
    for (int i = 0; i < n; i++) v[i] = ((float)(xorshift32(&s) & 0xffff) / 65535.0f - 0.5f) * 4.0f;
}

static innsteer_status load_op(flow_loader *L, flow_site *s, int si, int k, ggufr_str kind, int dim, int n_embd) {
    flow_op *op = &s->ops[k];
    int kind_id = 0;
    /* a kind without a table entry (no name) reads as unknown rather than crashing */
    while (kind_id < N_OP_KINDS && !(OP_KIND_IMPLS[kind_id].name && ggufr_str_eq(kind, OP_KIND_IMPLS[kind_id].name))) kind_id++;
    if (kind_id == N_OP_KINDS) {
        return FAIL(L, INNSTEER_ERR_UNSUPPORTED, "site %d op %d: unknown op kind '%.*s'", si, k, (int)(kind.len > 40 ? 40 : kind.len), kind.ptr);
    }
    op->kind = (op_kind)kind_id;
    op->dim = op->out_dim = dim;
    return OP_KIND_IMPLS[kind_id].load(L, s, op, si, k, n_embd);
}

static void size_scratch(flow_site *s, int n_embd) {
    int widest = 1;
    for (int k = 0; k < s->n_ops; k++) {
        const flow_op *op = &s->ops[k]; /* only a coupling has conditioner layers */
        for (int j = 1; j <= op->n_layers; j++) widest = op->width[j] > widest ? op->width[j] : widest;
    }
    s->widest = widest;
    s->acts_floats = flow_site_acts_floats(s, n_embd);
    s->scratch = 4 * (size_t)n_embd + 2 * (size_t)widest;
    s->block_scratch = flow_site_block_scratch(s, n_embd);
}

/* The op kinds as one string, for innsteer_site_info.ops. */
static void name_ops(flow_site *s) {
    char *p = s->op_names;
    for (int k = 0; k < s->n_ops; k++) {
        const char *name = op_impl(&s->ops[k])->name;
        size_t n = strlen(name);
        if (k) *p++ = ' ';
        memcpy(p, name, n);
        p += n;
    }
    *p = '\0';
}

/* phi^-1(phi(x)) must return x: catches inconsistent inverse matrices and blow-ups that the
 * per-tensor checks cannot see. */
static innsteer_status check_roundtrip(flow_loader *L, const flow_site *s, int si, int n_embd) {
    size_t scratch_floats = s->block_scratch > s->scratch ? s->block_scratch : s->scratch;
    float *buf = malloc(sizeof(float) * ((size_t)n_embd * 3 + scratch_floats));
    if (!buf) return FAIL(L, INNSTEER_ERR_NOMEM, "out of memory");
    float *x = buf, *z = x + n_embd, *back = z + n_embd, *scratch = back + n_embd;
    innsteer_status st = INNSTEER_OK;
    for (int p = 0; p < 3 && st == INNSTEER_OK; p++) {
        probe_row(x, n_embd, p);
        flow_site_forward_rows(s, n_embd, x, z, 1, scratch);
        flow_site_inverse_row(s, n_embd, z, back, scratch);
        double err = 0.0, norm = 0.0;
        for (int i = 0; i < n_embd; i++) {
            err += ((double)back[i] - x[i]) * ((double)back[i] - x[i]);
            norm += (double)x[i] * x[i];
        }
        bool finite = true;
        for (int i = 0; i < n_embd; i++) finite = finite && isfinite(z[i]) && isfinite(back[i]);
        if (!finite || !(sqrt(err) <= 1e-3 * sqrt(norm) + 1e-6)) {
            st = FAIL(L, INNSTEER_ERR_INVALID, "site %d (layer %d): phi is not invertible on a probe row (relative error %.3g)",
                      si, s->layer, finite ? sqrt(err / (norm + 1e-30)) : INFINITY);
        }
    }
    free(buf);
    return st;
}

/* The descriptive strings, validated and copied out of the file buffer into one block. */
static innsteer_status load_strings(flow_loader *L, innsteer_flow *flow) {
    enum { N = 6 };
    static const char *const keys[N] = {"general.name", "innsteer.behavior", "innsteer.method", "innsteer.model.name",
                                        "innsteer.model.architecture", "innsteer.provenance"};
    static const uint64_t caps[N] = {MAX_META_STRING, MAX_META_STRING, MAX_META_STRING, MAX_META_STRING, MAX_META_STRING,
                                     MAX_STRING};
    const char **dst[N] = {&flow->name, &flow->behavior, &flow->method, &flow->model_name, &flow->model_architecture,
                           &flow->provenance};
    ggufr_str vals[N];
    size_t total = 0;
    for (int i = 0; i < N; i++) {
        vals[i] = (ggufr_str){"", 0};
        const ggufr_kv *kv = ggufr_find_kv(&L->g, keys[i]);
        if (kv && kv->type != GV_STRING) {
            return FAIL(L, INNSTEER_ERR_INVALID, "%s must be a string, found GGUF type %u", keys[i], kv->type);
        }
        if (kv) ggufr_get_str(&L->g, keys[i], &vals[i]);
        if (vals[i].len > caps[i]) {
            return FAIL(L, INNSTEER_ERR_INVALID, "%s is %llu bytes long, cap is %llu", keys[i], (unsigned long long)vals[i].len,
                        (unsigned long long)caps[i]);
        }
        if (!ggufr_valid_utf8(vals[i].ptr, vals[i].len)) return FAIL(L, INNSTEER_ERR_INVALID, "%s is not valid UTF-8", keys[i]);
        total += (size_t)vals[i].len + 1;
    }
    char *p = flow->strings = malloc(total);
    if (!p) return FAIL(L, INNSTEER_ERR_NOMEM, "out of memory");
    for (int i = 0; i < N; i++) {
        memcpy(p, vals[i].ptr, (size_t)vals[i].len);
        p[vals[i].len] = '\0';
        *dst[i] = p;
        p += vals[i].len + 1;
    }
    return INNSTEER_OK;
}

static innsteer_status build_flow(flow_loader *L, innsteer_flow *flow) {
    ggufr_file *g = &L->g;
    uint32_t version = 0, n_embd = 0, n_layer = 0;
    if (!ggufr_get_u32(g, "innsteer.format_version", &version)) return FAIL(L, INNSTEER_ERR_INVALID, "missing u32 innsteer.format_version");
    if (version != INNSTEER_FORMAT_VERSION) {
        return FAIL(L, INNSTEER_ERR_UNSUPPORTED, "flow format version %u, this library reads version %d", version, INNSTEER_FORMAT_VERSION);
    }
    if (!ggufr_get_u32(g, "innsteer.model.n_embd", &n_embd) || n_embd < 1 || n_embd > MAX_EMBD) {
        return FAIL(L, INNSTEER_ERR_INVALID, "innsteer.model.n_embd must be a u32 in 1..%d", MAX_EMBD);
    }
    if (!ggufr_get_u32(g, "innsteer.model.n_layer", &n_layer) || n_layer < 1 || n_layer > MAX_LAYERS) {
        return FAIL(L, INNSTEER_ERR_INVALID, "innsteer.model.n_layer must be a u32 in 1..%d", MAX_LAYERS);
    }
    if (L->want_n_embd && (int)n_embd != L->want_n_embd) {
        return FAIL(L, INNSTEER_ERR_MISMATCH, "flow n_embd %u does not fit the model's n_embd %d", n_embd, L->want_n_embd);
    }
    if (!ggufr_get_f32(g, "innsteer.default_strength", &flow->default_strength) || !isfinite(flow->default_strength)) {
        return FAIL(L, INNSTEER_ERR_INVALID, "innsteer.default_strength must be a finite f32");
    }
    const ggufr_kv *layers = ggufr_find_kv(g, "innsteer.layers");
    if (!layers || layers->type != GV_ARRAY || (layers->elem_type != GV_U32 && layers->elem_type != GV_I32)) {
        return FAIL(L, INNSTEER_ERR_INVALID, "innsteer.layers must be an array of u32");
    }
    if (layers->count < 1 || layers->count > MAX_SITES) {
        return FAIL(L, INNSTEER_ERR_INVALID, "innsteer.layers has %llu entries, expected 1..%d", (unsigned long long)layers->count, MAX_SITES);
    }
    innsteer_status st = load_strings(L, flow);
    if (st) return st;
    flow->n_embd = (int)n_embd;
    flow->n_layer = (int)n_layer;
    flow->n_sites = (int)layers->count;
    flow->sites = calloc((size_t)flow->n_sites, sizeof *flow->sites);
    if (!flow->sites) return FAIL(L, INNSTEER_ERR_NOMEM, "out of memory");

    for (int si = 0; si < flow->n_sites; si++) {
        flow_site *s = &flow->sites[si];
        uint32_t layer = 0;
        if (!ggufr_array_u32(g, layers, (uint64_t)si, &layer) || layer >= n_layer) {
            return FAIL(L, INNSTEER_ERR_INVALID, "innsteer.layers[%d] = %u is outside the model's 0..%u", si, layer, n_layer - 1);
        }
        for (int j = 0; j < si; j++) {
            if (flow->sites[j].layer == (int)layer) return FAIL(L, INNSTEER_ERR_INVALID, "layer %u appears twice in innsteer.layers", layer);
        }
        if (L->want_n_layer && (int)layer >= L->want_n_layer) {
            return FAIL(L, INNSTEER_ERR_MISMATCH, "flow layer %u is out of range for the model's %d layers (0..%d)", layer,
                        L->want_n_layer, L->want_n_layer - 1);
        }
        s->layer = (int)layer;
        s->subspace_at = -1;
        char key[96];
        snprintf(key, sizeof key, "innsteer.site.%d.ops", si);
        ggufr_str ops;
        if (!ggufr_get_str(g, key, &ops)) return FAIL(L, INNSTEER_ERR_INVALID, "%s must be a string of op kinds", key);
        int dim = (int)n_embd;
        uint64_t pos = 0;
        s->n_ops = 0;
        while (pos < ops.len) {
            if (ops.ptr[pos] == ' ') {
                pos++;
                continue;
            }
            uint64_t end = pos;
            while (end < ops.len && ops.ptr[end] != ' ') end++;
            if (s->n_ops == MAX_OPS) return FAIL(L, INNSTEER_ERR_INVALID, "%s has more than %d ops", key, MAX_OPS);
            ggufr_str kind = {ops.ptr + pos, end - pos};
            int k = s->n_ops++;
            if ((st = load_op(L, s, si, k, kind, dim, (int)n_embd))) return st;
            dim = s->ops[k].out_dim;
            pos = end;
        }
        s->latent_dim = dim;
        name_ops(s);
        char name[64];
        snprintf(name, sizeof name, "site.%d.delta", si);
        if ((st = flow_load_vec(L, name, dim, &s->delta))) return st;
        s->delta_norm = sqrtf(dot(s->delta, s->delta, dim)); /* the target gate's unit, host and graph alike */
        snprintf(name, sizeof name, "site.%d.edit_scale", si);
        if (ggufr_find_tensor(g, name) && (st = flow_load_vec(L, name, dim, &s->edit_scale))) return st;
        snprintf(name, sizeof name, "site.%d.gate_center", si);
        if (ggufr_find_tensor(g, name)) {
            if ((st = flow_load_vec(L, name, dim, &s->gate_center))) return st;
            const char *fields[] = {"radius", "softness", "target_pos", "target_neg"};
            float *dst[] = {&s->gate_radius, &s->gate_softness, &s->gate_target_pos, &s->gate_target_neg};
            for (int f = 0; f < 4; f++) {
                snprintf(key, sizeof key, "innsteer.site.%d.gate.%s", si, fields[f]);
                if (!ggufr_get_f32(g, key, dst[f]) || !isfinite(*dst[f])) return FAIL(L, INNSTEER_ERR_INVALID, "%s must be a finite f32", key);
            }
            if (!(s->gate_softness > 0.0f) || !(s->gate_radius > 0.0f)) {
                return FAIL(L, INNSTEER_ERR_INVALID, "site %d: gate radius and softness must be positive", si);
            }
        }
        size_scratch(s, (int)n_embd);
        if ((st = check_roundtrip(L, s, si, (int)n_embd))) return st;
    }
    return INNSTEER_OK;
}

static void destroy(innsteer_flow *flow) {
    if (!flow) return;
    free(flow->sites);
    free(flow->arena);
    free(flow->strings);
    free(flow);
}

static innsteer_status load_from_buffer(const uint8_t *buf, size_t size, int n_embd, int n_layer, innsteer_flow **out,
                                        char *err, size_t err_size) {
    flow_loader L = {.err = err, .err_size = err_size, .want_n_embd = n_embd > 0 ? n_embd : 0, .want_n_layer = n_layer > 0 ? n_layer : 0};
    if (err && err_size) err[0] = '\0';
    innsteer_status parsed = ggufr_parse_header(&L.g, buf, size, err, err_size);
    if (parsed) return parsed;
    ggufr_str arch = {"", 0};
    ggufr_get_str(&L.g, "general.architecture", &arch);
    if (!ggufr_str_eq(arch, "innsteer")) {
        FAIL(&L, INNSTEER_ERR_NOT_FLOW, "not an innsteer flow file: general.architecture is '%.*s', expected 'innsteer'",
             (int)(arch.len > 40 ? 40 : arch.len), arch.ptr);
        ggufr_release(&L.g);
        return INNSTEER_ERR_NOT_FLOW;
    }
    if ((parsed = ggufr_parse_tensors(&L.g, err, err_size))) return parsed;
    innsteer_flow *flow = calloc(1, sizeof *flow);
    if (flow) {
        /* tensors are copied into one arena: f16 doubles in size, plus alignment padding per tensor */
        for (uint64_t i = 0; i < L.g.n_tensors; i++) L.arena_size += (size_t)L.g.tensors[i].n_elements * 4 + ARENA_ALIGN;
        flow->arena = L.arena = aligned_alloc(ARENA_ALIGN, (L.arena_size + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN + ARENA_ALIGN);
        atomic_init(&flow->refs, 1);
    }
    innsteer_status st = flow && L.arena ? build_flow(&L, flow) : FAIL(&L, INNSTEER_ERR_NOMEM, "out of memory");
    ggufr_release(&L.g);
    if (st != INNSTEER_OK) {
        destroy(flow);
        return st;
    }
    *out = flow;
    return INNSTEER_OK;
}

innsteer_status innsteer_flow_load_buffer(const void *data, size_t size, innsteer_flow **out, char *err, size_t err_size) {
    if (!out || (!data && size)) return INNSTEER_ERR_ARG;
    *out = NULL;
    /* copy so that the caller's buffer may go away and parsing never reads past an exact-size
     * allocation (what a fuzzer gives us) */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return INNSTEER_ERR_NOMEM;
    if (size) memcpy(copy, data, size);
    innsteer_status st = load_from_buffer(copy, size, 0, 0, out, err, err_size);
    free(copy);
    return st;
}

innsteer_status innsteer_flow_load_for(const char *path, int n_embd, int n_layer, innsteer_flow **out, char *err,
                                       size_t err_size) {
    if (!path || !out) return INNSTEER_ERR_ARG;
    *out = NULL;
    /* non-blocking, and regular files only: a FIFO or a device named as a flow must fail at once
     * instead of blocking the caller (a server thread) until someone writes to it */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return set_error(err, err_size, INNSTEER_ERR_IO, "cannot open flow file '%s'", path);
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return set_error(err, err_size, INNSTEER_ERR_IO, "flow file '%s' is not a regular file", path);
    }
    if ((uint64_t)sb.st_size > (uint64_t)MAX_FILE_BYTES) {
        close(fd);
        return set_error(err, err_size, INNSTEER_ERR_FORMAT, "flow file '%s' is %lld bytes, cap is %zu", path,
                         (long long)sb.st_size, MAX_FILE_BYTES);
    }
    size_t size = (size_t)sb.st_size;
    uint8_t *buf = malloc(size ? size : 1);
    innsteer_status st = buf ? INNSTEER_OK : INNSTEER_ERR_NOMEM;
    for (size_t got = 0; st == INNSTEER_OK && got < size;) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r <= 0) st = INNSTEER_ERR_IO; /* an error, or the file shrank while being read */
        else got += (size_t)r;
    }
    close(fd);
    if (st != INNSTEER_OK) {
        free(buf);
        return set_error(err, err_size, st, "cannot read flow file '%s'", path);
    }
    st = load_from_buffer(buf, size, n_embd, n_layer, out, err, err_size);
    free(buf);
    return st;
}

innsteer_status innsteer_flow_load(const char *path, innsteer_flow **out, char *err, size_t err_size) {
    return innsteer_flow_load_for(path, 0, 0, out, err, err_size);
}

void innsteer_flow_free(innsteer_flow *flow) {
    if (!flow) return;
    if (atomic_fetch_sub(&flow->refs, 1) == 1) destroy(flow);
}

int innsteer_flow_n_embd(const innsteer_flow *flow) { return flow ? flow->n_embd : 0; }
int innsteer_flow_n_sites(const innsteer_flow *flow) { return flow ? flow->n_sites : 0; }
int innsteer_flow_site_layer(const innsteer_flow *flow, int site) {
    return flow && site >= 0 && site < flow->n_sites ? flow->sites[site].layer : -1;
}
float innsteer_flow_default_strength(const innsteer_flow *flow) { return flow ? flow->default_strength : 0.0f; }

innsteer_status innsteer_flow_get_info(const innsteer_flow *flow, innsteer_flow_info *out) {
    if (!flow || !out) return INNSTEER_ERR_ARG;
    *out = (innsteer_flow_info){
        .name = flow->name,
        .behavior = flow->behavior,
        .method = flow->method,
        .model_name = flow->model_name,
        .model_architecture = flow->model_architecture,
        .model_n_embd = flow->n_embd,
        .model_n_layer = flow->n_layer,
        .n_sites = flow->n_sites,
        .default_strength = flow->default_strength,
        .provenance_json = flow->provenance,
    };
    return INNSTEER_OK;
}

innsteer_status innsteer_flow_get_site_info(const innsteer_flow *flow, int site, innsteer_site_info *out) {
    if (!flow || !out || site < 0 || site >= flow->n_sites) return INNSTEER_ERR_ARG;
    const flow_site *s = &flow->sites[site];
    *out = (innsteer_site_info){
        .layer = s->layer,
        .latent_dim = s->latent_dim,
        .n_ops = s->n_ops,
        .ops = s->op_names,
        .has_gate = s->gate_center != NULL,
        .has_edit_scale = s->edit_scale != NULL,
        .delta_norm = s->delta_norm,
    };
    return INNSTEER_OK;
}

typedef enum { MAP_FORWARD, MAP_INVERSE, MAP_STEER } map_kind;

static innsteer_status map_rows(const innsteer_flow *flow, int site, map_kind kind, float strength, innsteer_gate gate,
                                const float *in, float *out, int64_t n_rows) {
    if (!flow || !in || !out || n_rows < 0 || site < 0 || site >= flow->n_sites || !isfinite(strength)) return INNSTEER_ERR_ARG;
    const flow_site *s = &flow->sites[site];
    float *scratch = malloc(sizeof(float) * (kind == MAP_INVERSE ? s->scratch : s->block_scratch));
    if (!scratch) return INNSTEER_ERR_NOMEM;
    int n_embd = flow->n_embd;
    switch (kind) {
        case MAP_FORWARD: flow_site_forward_rows(s, n_embd, in, out, n_rows, scratch); break;
        case MAP_STEER: flow_site_steer_rows(s, n_embd, strength, gate, in, out, n_rows, scratch); break;
        case MAP_INVERSE:
            for (int64_t r = 0; r < n_rows; r++) flow_site_inverse_row(s, n_embd, in + r * n_embd, out + r * n_embd, scratch);
            break;
    }
    free(scratch);
    return INNSTEER_OK;
}

innsteer_status innsteer_flow_forward(const innsteer_flow *flow, int site, const float *in, float *out, int64_t n_rows) {
    return map_rows(flow, site, MAP_FORWARD, 0.0f, INNSTEER_GATE_OFF, in, out, n_rows);
}

innsteer_status innsteer_flow_inverse(const innsteer_flow *flow, int site, const float *in, float *out, int64_t n_rows) {
    return map_rows(flow, site, MAP_INVERSE, 0.0f, INNSTEER_GATE_OFF, in, out, n_rows);
}

innsteer_status innsteer_flow_steer(const innsteer_flow *flow, int site, float strength, const float *in, float *out,
                                    int64_t n_rows) {
    return map_rows(flow, site, MAP_STEER, strength, INNSTEER_GATE_OFF, in, out, n_rows);
}

innsteer_status innsteer_flow_steer_gated(const innsteer_flow *flow, int site, float strength, innsteer_gate gate,
                                          const float *in, float *out, int64_t n_rows) {
    if (gate != INNSTEER_GATE_OFF && !innsteer_flow_has_gate(flow)) return INNSTEER_ERR_ARG;
    return map_rows(flow, site, MAP_STEER, strength, gate, in, out, n_rows);
}

bool innsteer_flow_has_gate(const innsteer_flow *flow) {
    if (!flow) return false;
    for (int i = 0; i < flow->n_sites; i++) {
        if (!flow->sites[i].gate_center) return false;
    }
    return true;
}
