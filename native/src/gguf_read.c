#include "gguf_read.h"

#include "limits.h"
#include "error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint8_t *buf;
    size_t size;
    size_t pos;
    char *err;
    size_t err_size;
} cursor;

#define BAD(c, ...) set_error((c)->err, (c)->err_size, INNSTEER_ERR_FORMAT, __VA_ARGS__)

static innsteer_status take(cursor *c, size_t n, const uint8_t **out, const char *what) {
    *out = NULL;
    if (n > c->size - c->pos) {
        return BAD(c, "truncated file: %s needs %zu bytes at offset %zu, file has %zu", what, n, c->pos, c->size);
    }
    *out = c->buf + c->pos;
    c->pos += n;
    return INNSTEER_OK;
}

static innsteer_status read_u32(cursor *c, uint32_t *v, const char *what) {
    const uint8_t *p = NULL;
    innsteer_status st = take(c, 4, &p, what);
    if (st == INNSTEER_OK) memcpy(v, p, 4);
    return st;
}

static innsteer_status read_u64(cursor *c, uint64_t *v, const char *what) {
    const uint8_t *p = NULL;
    innsteer_status st = take(c, 8, &p, what);
    if (st == INNSTEER_OK) memcpy(v, p, 8);
    return st;
}

/* GGUF requires UTF-8 names; the Python reader decodes them strictly, so both readers refuse the
 * same files. */
bool ggufr_valid_utf8(const char *s, uint64_t n) {
    const uint8_t *p = (const uint8_t *)s;
    uint64_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
        if (!len || i + (uint64_t)len > n) return false;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1fu) : len == 3 ? (c & 0x0fu) : (c & 0x07u);
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3fu);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += (uint64_t)len;
    }
    return true;
}

static innsteer_status read_str(cursor *c, ggufr_str *s, const char *what) {
    uint64_t len;
    innsteer_status st = read_u64(c, &len, what);
    if (st) return st;
    if (len > MAX_STRING) return BAD(c, "%s: string length %llu exceeds the cap of %d", what, (unsigned long long)len, MAX_STRING);
    const uint8_t *p = NULL;
    if ((st = take(c, (size_t)len, &p, what))) return st;
    s->ptr = (const char *)p;
    s->len = len;
    return INNSTEER_OK;
}

static size_t scalar_size(uint32_t type) {
    switch (type) {
        case GV_U8: case GV_I8: case GV_BOOL: return 1;
        case GV_U16: case GV_I16: return 2;
        case GV_U32: case GV_I32: case GV_F32: return 4;
        case GV_U64: case GV_I64: case GV_F64: return 8;
        default: return 0;
    }
}

static innsteer_status skip_value(cursor *c, uint32_t type, int depth, const char *key) {
    const uint8_t *p;
    if (type == GV_STRING) {
        ggufr_str s;
        return read_str(c, &s, key);
    }
    if (type == GV_ARRAY) {
        if (depth >= MAX_NESTING) return BAD(c, "key '%s': arrays nested too deeply", key);
        uint32_t et;
        uint64_t n;
        innsteer_status st;
        if ((st = read_u32(c, &et, key)) || (st = read_u64(c, &n, key))) return st;
        if (n > MAX_ARRAY) return BAD(c, "key '%s': array of %llu items exceeds the cap of %d", key, (unsigned long long)n, MAX_ARRAY);
        size_t es = scalar_size(et);
        if (es) return take(c, (size_t)n * es, &p, key);
        if (et != GV_STRING && et != GV_ARRAY) return BAD(c, "key '%s': unknown array element type %u", key, et);
        for (uint64_t i = 0; i < n; i++) {
            if ((st = skip_value(c, et, depth + 1, key))) return st;
        }
        return INNSTEER_OK;
    }
    size_t sz = scalar_size(type);
    if (!sz) return BAD(c, "key '%s': unknown value type %u", key, type);
    return take(c, sz, &p, key);
}

/* One key/value entry at the cursor, checked and recorded in kv. */
static innsteer_status parse_kv(cursor *c, ggufr_file *f, uint64_t i, uint32_t *alignment) {
    ggufr_kv *kv = &f->kv[i];
    char key[96];
    innsteer_status st = read_str(c, &kv->key, "key name");
    if (st) return st;
    if (!ggufr_valid_utf8(kv->key.ptr, kv->key.len)) return BAD(c, "key %llu: name is not valid UTF-8", (unsigned long long)i);
    snprintf(key, sizeof key, "%.*s", (int)(kv->key.len < 80 ? kv->key.len : 80), kv->key.ptr);
    for (uint64_t j = 0; j < i; j++) {
        if (f->kv[j].key.len == kv->key.len && memcmp(f->kv[j].key.ptr, kv->key.ptr, kv->key.len) == 0) {
            return BAD(c, "duplicate key '%s'", key);
        }
    }
    if ((st = read_u32(c, &kv->type, key))) return st;
    if (kv->type == GV_ARRAY) {
        size_t start = c->pos;
        if ((st = read_u32(c, &kv->elem_type, key)) || (st = read_u64(c, &kv->count, key))) return st;
        kv->offset = c->pos;
        c->pos = start;
    } else {
        kv->offset = c->pos;
    }
    if ((st = skip_value(c, kv->type, 0, key))) return st;
    if (ggufr_str_eq(kv->key, "general.alignment")) {
        if (kv->type != GV_U32) return BAD(c, "general.alignment must be u32, got type %u", kv->type);
        memcpy(alignment, f->buf + kv->offset, 4);
        if (*alignment == 0 || (*alignment & (*alignment - 1)) || *alignment > 65536) {
            return BAD(c, "general.alignment %u is not a power of two up to 65536", *alignment);
        }
    }
    return INNSTEER_OK;
}

innsteer_status ggufr_parse_header(ggufr_file *f, const uint8_t *buf, size_t size, char *err, size_t err_size) {
    memset(f, 0, sizeof *f);
    f->buf = buf;
    f->size = size;
    cursor c = {buf, size, 0, err, err_size};
    const uint8_t *magic;
    if (size < 4 || take(&c, 4, &magic, "magic")) return BAD(&c, "not a GGUF file: only %zu bytes", size);
    if (memcmp(magic, "GGUF", 4) != 0) return BAD(&c, "not a GGUF file: bad magic bytes");
    innsteer_status st;
    if ((st = read_u32(&c, &f->version, "version"))) return st;
    if (f->version != 2 && f->version != 3) return BAD(&c, "unsupported GGUF version %u (expected 2 or 3)", f->version);
    if ((st = read_u64(&c, &f->n_tensors, "tensor count")) || (st = read_u64(&c, &f->n_kv, "key count"))) return st;
    if (f->n_kv > MAX_KV) return BAD(&c, "GGUF header claims %llu keys, cap is %d", (unsigned long long)f->n_kv, MAX_KV);
    if (f->n_tensors > MAX_TENSORS) return BAD(&c, "GGUF header claims %llu tensors, cap is %d", (unsigned long long)f->n_tensors, MAX_TENSORS);

    f->kv = calloc(f->n_kv ? f->n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *f->tensors);
    if (!f->kv || !f->tensors) {
        ggufr_release(f);
        return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    }
    uint32_t alignment = 32;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        if ((st = parse_kv(&c, f, i, &alignment))) {
            ggufr_release(f);
            return st;
        }
    }
    f->tensor_info_at = c.pos;
    f->alignment = alignment;
    return INNSTEER_OK;
}

/* Tensor info i at the cursor: name, shape, type and data offset, checked. */
static innsteer_status parse_tensor_info(cursor *c, ggufr_file *f, uint64_t i, uint64_t *offset) {
    ggufr_tensor *t = &f->tensors[i];
    innsteer_status st = read_str(c, &t->name, "tensor name");
    if (st) return st;
    if (!ggufr_valid_utf8(t->name.ptr, t->name.len)) return BAD(c, "tensor %llu: name is not valid UTF-8", (unsigned long long)i);
    if (t->name.len == 0 || t->name.len > 63) {
        return BAD(c, "tensor %llu: name length %llu outside 1..63", (unsigned long long)i, (unsigned long long)t->name.len);
    }
    char name[72];
    snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
    for (uint64_t j = 0; j < i; j++) {
        if (f->tensors[j].name.len == t->name.len && memcmp(f->tensors[j].name.ptr, t->name.ptr, t->name.len) == 0) {
            return BAD(c, "duplicate tensor '%s'", name);
        }
    }
    if ((st = read_u32(c, &t->n_dims, name))) return st;
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS) return BAD(c, "tensor '%s': %u dimensions, expected 1..%d", name, t->n_dims, GGUF_MAX_DIMS);
    uint64_t n = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if ((st = read_u64(c, &t->ne[d], name))) return st;
        if (t->ne[d] == 0 || t->ne[d] > ((uint64_t)1 << 31)) {
            return BAD(c, "tensor '%s': dimension %u has size %llu", name, d, (unsigned long long)t->ne[d]);
        }
        if (n > UINT64_MAX / t->ne[d]) return BAD(c, "tensor '%s': element count overflows", name);
        n *= t->ne[d];
    }
    t->n_elements = n;
    if ((st = read_u32(c, &t->type, name)) || (st = read_u64(c, offset, name))) return st;
    if (t->type != GT_F32 && t->type != GT_F16 && t->type != GT_I32) {
        return BAD(c, "tensor '%s': ggml type %u is not supported in flow files (f32, f16, i32)", name, t->type);
    }
    if (*offset % f->alignment) {
        return BAD(c, "tensor '%s': data offset %llu not aligned to %u", name, (unsigned long long)*offset, f->alignment);
    }
    return INNSTEER_OK;
}

static innsteer_status parse_tensor_infos(cursor *c, ggufr_file *f, uint64_t *offsets) {
    innsteer_status st;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        if ((st = parse_tensor_info(c, f, i, &offsets[i]))) return st;
    }
    size_t data_start = (c->pos + f->alignment - 1) / f->alignment * f->alignment;
    if (f->n_tensors && data_start > f->size) {
        return BAD(c, "truncated file: tensor data would start at %zu, file has %zu bytes", data_start, f->size);
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        ggufr_tensor *t = &f->tensors[i];
        uint64_t esize = t->type == GT_F16 ? 2 : 4;
        uint64_t nbytes = t->n_elements * esize;
        uint64_t avail = f->size - data_start;
        if (t->n_elements > UINT64_MAX / esize || offsets[i] > avail || nbytes > avail - offsets[i]) {
            return BAD(c, "truncated file: tensor '%.*s' needs %llu bytes at data offset %llu, only %llu available",
                       (int)t->name.len, t->name.ptr, (unsigned long long)nbytes, (unsigned long long)offsets[i],
                       (unsigned long long)avail);
        }
        t->data = f->buf + data_start + offsets[i];
    }
    return INNSTEER_OK;
}

innsteer_status ggufr_parse_tensors(ggufr_file *f, char *err, size_t err_size) {
    cursor c = {f->buf, f->size, f->tensor_info_at, err, err_size};
    uint64_t *offsets = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *offsets);
    innsteer_status st = offsets ? parse_tensor_infos(&c, f, offsets) : set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory");
    free(offsets);
    if (st) ggufr_release(f);
    return st;
}

void ggufr_release(ggufr_file *f) {
    free(f->kv);
    free(f->tensors);
    f->kv = NULL;
    f->tensors = NULL;
    f->n_kv = f->n_tensors = 0;
}

bool ggufr_str_eq(ggufr_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && memcmp(s.ptr, c, n) == 0;
}

const ggufr_kv *ggufr_find_kv(const ggufr_file *f, const char *key) {
    for (uint64_t i = 0; i < f->n_kv; i++) {
        if (ggufr_str_eq(f->kv[i].key, key)) return &f->kv[i];
    }
    return NULL;
}

const ggufr_tensor *ggufr_find_tensor(const ggufr_file *f, const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        if (ggufr_str_eq(f->tensors[i].name, name)) return &f->tensors[i];
    }
    return NULL;
}

bool ggufr_get_u32(const ggufr_file *f, const char *key, uint32_t *out) {
    const ggufr_kv *kv = ggufr_find_kv(f, key);
    if (!kv) return false;
    if (kv->type == GV_U32 || kv->type == GV_I32) {
        memcpy(out, f->buf + kv->offset, 4);
        return kv->type == GV_U32 || (int32_t)*out >= 0;
    }
    return false;
}

bool ggufr_get_f32(const ggufr_file *f, const char *key, float *out) {
    const ggufr_kv *kv = ggufr_find_kv(f, key);
    if (!kv || kv->type != GV_F32) return false;
    memcpy(out, f->buf + kv->offset, 4);
    return true;
}

static ggufr_str str_at(const ggufr_file *f, size_t offset) {
    ggufr_str s;
    memcpy(&s.len, f->buf + offset, 8);
    s.ptr = (const char *)f->buf + offset + 8;
    return s;
}

bool ggufr_get_str(const ggufr_file *f, const char *key, ggufr_str *out) {
    const ggufr_kv *kv = ggufr_find_kv(f, key);
    if (!kv || kv->type != GV_STRING) return false;
    *out = str_at(f, kv->offset); /* bounds were checked by ggufr_parse_header */
    return true;
}

bool ggufr_array_u32(const ggufr_file *f, const ggufr_kv *kv, uint64_t i, uint32_t *out) {
    if (kv->type != GV_ARRAY || (kv->elem_type != GV_U32 && kv->elem_type != GV_I32) || i >= kv->count) return false;
    memcpy(out, f->buf + kv->offset + 4 * i, 4);
    return kv->elem_type == GV_U32 || (int32_t)*out >= 0;
}
