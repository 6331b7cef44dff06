#include "capture.h"

#include "error.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *data;
    int64_t rows, cap;
    atomic_bool on; /* read by the callback's ask pass without the lock */
} capture_buf;

struct capture_set {
    int n_layer, n_embd;
    pthread_mutex_t lock; /* every buffer's data, rows and cap */
    capture_buf *bufs;    /* [2 * layer] before steering, [2 * layer + 1] after */
};

capture_set *capture_set_new(int n_layer, int n_embd) {
    capture_set *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->n_layer = n_layer;
    c->n_embd = n_embd;
    c->bufs = calloc(2 * (size_t)n_layer, sizeof *c->bufs);
    if (!c->bufs || pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c->bufs);
        free(c);
        return NULL;
    }
    return c;
}

void capture_set_free(capture_set *c) {
    if (!c) return;
    for (int i = 0; i < 2 * c->n_layer; i++) free(c->bufs[i].data);
    pthread_mutex_destroy(&c->lock);
    free(c->bufs);
    free(c);
}

static capture_buf *buf_of(capture_set *c, int layer, bool post) { return &c->bufs[2 * layer + (post ? 1 : 0)]; }

void capture_set_enable(capture_set *c, int layer, bool post, bool on) { atomic_store(&buf_of(c, layer, post)->on, on); }

bool capture_set_enabled(capture_set *c, int layer, bool post) { return atomic_load(&buf_of(c, layer, post)->on); }

innsteer_status capture_set_append(capture_set *c, int layer, bool post, const float *rows, int64_t n_rows, char *err,
                                   size_t err_size) {
    capture_buf *b = buf_of(c, layer, post);
    if (!atomic_load(&b->on)) return INNSTEER_OK;
    size_t n_embd = (size_t)c->n_embd;
    innsteer_status st = INNSTEER_OK;
    pthread_mutex_lock(&c->lock);
    if (b->rows + n_rows > b->cap) {
        int64_t cap = b->cap ? b->cap : 256;
        while (cap < b->rows + n_rows) cap *= 2;
        float *grown = realloc(b->data, sizeof(float) * (size_t)cap * n_embd);
        if (grown) {
            b->data = grown;
            b->cap = cap;
        } else {
            st = set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory capturing %lld rows of layer %d",
                           (long long)(b->rows + n_rows), layer);
        }
    }
    if (st == INNSTEER_OK) {
        memcpy(b->data + (size_t)b->rows * n_embd, rows, sizeof(float) * (size_t)n_rows * n_embd);
        b->rows += n_rows;
    }
    pthread_mutex_unlock(&c->lock);
    return st;
}

int64_t capture_set_rows(capture_set *c, int layer, bool post) {
    pthread_mutex_lock(&c->lock);
    int64_t rows = buf_of(c, layer, post)->rows;
    pthread_mutex_unlock(&c->lock);
    return rows;
}

int64_t capture_set_copy(capture_set *c, int layer, bool post, float *dst, int64_t max_rows) {
    pthread_mutex_lock(&c->lock);
    const capture_buf *b = buf_of(c, layer, post);
    int64_t n = b->rows < max_rows ? b->rows : max_rows;
    if (n) memcpy(dst, b->data, sizeof(float) * (size_t)n * (size_t)c->n_embd);
    pthread_mutex_unlock(&c->lock);
    return n;
}

void capture_set_clear(capture_set *c) {
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < 2 * c->n_layer; i++) c->bufs[i].rows = 0;
    pthread_mutex_unlock(&c->lock);
}
