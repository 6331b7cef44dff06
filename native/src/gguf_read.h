/* A strict, allocation-light GGUF (v2/v3) reader over an in-memory buffer. Every count, size
 * and offset is checked against the buffer before use; nothing points outside it. Its names
 * start with ggufr_ (this library's own reader), never gguf_: that prefix is ggml's API, which
 * this library also calls, with other signatures. */
#ifndef INNSTEER_GGUF_READ_H
#define INNSTEER_GGUF_READ_H

#include "innsteer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum ggufr_value_type {
    GV_U8 = 0, GV_I8 = 1, GV_U16 = 2, GV_I16 = 3, GV_U32 = 4, GV_I32 = 5, GV_F32 = 6, GV_BOOL = 7,
    GV_STRING = 8, GV_ARRAY = 9, GV_U64 = 10, GV_I64 = 11, GV_F64 = 12,
};

/* ggml type ids this project reads */
enum { GT_F32 = 0, GT_F16 = 1, GT_I32 = 26 };

#define GGUF_MAX_DIMS 4

typedef struct {
    const char *ptr; /* not NUL-terminated */
    uint64_t len;
} ggufr_str;

typedef struct {
    ggufr_str key;
    uint32_t type;
    uint32_t elem_type; /* arrays only */
    uint64_t count;     /* arrays only */
    size_t offset;      /* of the value (arrays: of the first element) */
} ggufr_kv;

typedef struct {
    ggufr_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    uint32_t type;
    uint64_t n_elements;
    const uint8_t *data;
} ggufr_tensor;

typedef struct {
    const uint8_t *buf;
    size_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    ggufr_kv *kv;
    ggufr_tensor *tensors;
    size_t tensor_info_at;
    uint32_t alignment;
} ggufr_file;

/* Parses buf (kept borrowed) in two steps, so a caller can check the keys (is this a flow?)
 * before tensor types it does not support are judged. On failure they return
 * INNSTEER_ERR_FORMAT (or INNSTEER_ERR_NOMEM) with a message in err, and release f. */
innsteer_status ggufr_parse_header(ggufr_file *f, const uint8_t *buf, size_t size, char *err, size_t err_size);
innsteer_status ggufr_parse_tensors(ggufr_file *f, char *err, size_t err_size);
void ggufr_release(ggufr_file *f);

const ggufr_kv *ggufr_find_kv(const ggufr_file *f, const char *key);
const ggufr_tensor *ggufr_find_tensor(const ggufr_file *f, const char *name);
bool ggufr_str_eq(ggufr_str s, const char *c);

/* Typed getters: return false if the key is missing or of another type. */
bool ggufr_get_u32(const ggufr_file *f, const char *key, uint32_t *out);
bool ggufr_get_f32(const ggufr_file *f, const char *key, float *out);
bool ggufr_get_str(const ggufr_file *f, const char *key, ggufr_str *out);
/* Element i of a u32 array. */
bool ggufr_array_u32(const ggufr_file *f, const ggufr_kv *kv, uint64_t i, uint32_t *out);

/* Strict UTF-8: no overlong forms, surrogates or code points above U+10FFFF. */
bool ggufr_valid_utf8(const char *p, uint64_t n);

#endif
