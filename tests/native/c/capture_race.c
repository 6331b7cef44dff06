/* Captured rows read while the eval callback appends them, under ThreadSanitizer.
 *
 *   capture_race FLOW ROUNDS ITERATIONS
 *
 * FLOW is 64 wide with a site at layer 1. Each round makes a new steerer that steers and captures
 * l_out-1 before and after steering. One thread drives innsteer_eval_callback on a real ggml
 * tensor named l_out-1 (48 rows in a CPU backend buffer, written with ggml_backend_tensor_set), so
 * both capture buffers grow by realloc over and over; the main thread meanwhile reads them with
 * innsteer_steerer_captured_rows / innsteer_steerer_copy_captured and changes the strength. Every
 * row read must be a row the callback captured. Prints "ok" and exits 0; the sanitizer reports any
 * unsynchronised access (and exits non-zero) on its own.
 *
 * llama-cpp-python installs ggml without headers: the few functions used here are declared by
 * their public signatures (ggml.h, ggml-alloc.h, ggml-backend.h, ggml-cpu.h). */
#include "innsteer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

struct ggml_context;
struct ggml_backend_buffer;
struct ggml_backend_buffer_type;
struct ggml_init_params {
    size_t mem_size;
    void *mem_buffer;
    bool no_alloc;
};
#define GGML_TYPE_F32 0
struct ggml_context *ggml_init(struct ggml_init_params params);
void ggml_free(struct ggml_context *ctx);
size_t ggml_tensor_overhead(void);
struct ggml_tensor *ggml_new_tensor_2d(struct ggml_context *ctx, int type, int64_t ne0, int64_t ne1);
struct ggml_tensor *ggml_set_name(struct ggml_tensor *tensor, const char *name);
struct ggml_backend_buffer_type *ggml_backend_cpu_buffer_type(void);
struct ggml_backend_buffer *ggml_backend_alloc_ctx_tensors_from_buft(struct ggml_context *ctx,
                                                                      struct ggml_backend_buffer_type *buft);
void ggml_backend_buffer_free(struct ggml_backend_buffer *buffer);
void ggml_backend_tensor_set(struct ggml_tensor *tensor, const void *data, size_t offset, size_t size);

#define N_EMBD 64
#define N_LAYER 4
#define LAYER 1
#define ROWS 48 /* at least PARALLEL_MIN_ROWS: the pool's threads steer too */

typedef struct {
    innsteer_steerer *st;
    struct ggml_tensor *layer_out, *other;
    int iterations;
    atomic_bool done;
    atomic_int failed;
} drive;

/* Row j of iteration i: exact in f32, so a reader can tell every captured row apart. */
static float value(int i, int j, int c) { return (float)(i * 64 + j) + (float)c / 128.0f; }

static void *run_callback(void *arg) {
    drive *d = arg;
    static float rows[ROWS * N_EMBD];
    for (int i = 0; i < d->iterations && !atomic_load(&d->failed); i++) {
        for (int j = 0; j < ROWS; j++) {
            for (int c = 0; c < N_EMBD; c++) rows[j * N_EMBD + c] = value(i, j, c);
        }
        ggml_backend_tensor_set(d->layer_out, rows, 0, sizeof rows);
        /* the scheduler's protocol: asked, then called with the computed tensor */
        if (!innsteer_eval_callback(d->layer_out, true, d->st) || !innsteer_eval_callback(d->layer_out, false, d->st) ||
            innsteer_eval_callback(d->other, true, d->st)) {
            fprintf(stderr, "callback refused l_out-%d at iteration %d: %s\n", LAYER, i, innsteer_steerer_last_error(d->st));
            atomic_store(&d->failed, 1);
        }
    }
    atomic_store(&d->done, true);
    return NULL;
}

/* Reads the captures until the driver is done; false on a row the callback never wrote. */
static bool read_captures(drive *d, int id, float *dst, int64_t cap) {
    for (unsigned k = 0; !atomic_load(&d->done); k++) {
        for (int post = 0; post < 2; post++) {
            int64_t n = innsteer_steerer_captured_rows(d->st, LAYER, post);
            if (n < 0 || n > cap || n % ROWS) {
                fprintf(stderr, "captured_rows returned %lld\n", (long long)n);
                return false;
            }
            if (innsteer_steerer_copy_captured(d->st, LAYER, post, dst, n) != INNSTEER_OK) return false;
            for (int64_t r = 0; !post && r < n; r++) {
                int i = (int)(r / ROWS), j = (int)(r % ROWS);
                for (int c = 0; c < N_EMBD; c++) {
                    if (dst[r * N_EMBD + c] != value(i, j, c)) {
                        fprintf(stderr, "captured row %lld column %d is %g, expected %g\n", (long long)r, c,
                                (double)dst[r * N_EMBD + c], (double)value(i, j, c));
                        return false;
                    }
                }
            }
        }
        if (innsteer_steerer_set_strength(d->st, id, k % 2 ? 1.0f : 0.5f) != INNSTEER_OK) return false;
    }
    return true;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s FLOW ROUNDS ITERATIONS\n", argv[0]);
        return 2;
    }
    int rounds = atoi(argv[2]), iterations = atoi(argv[3]);
    char err[256];
    innsteer_flow *flow = NULL;
    if (innsteer_flow_load(argv[1], &flow, err, sizeof err) != INNSTEER_OK) {
        fprintf(stderr, "cannot load %s: %s\n", argv[1], err);
        return 3;
    }
    struct ggml_init_params params = {.mem_size = 4 * ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true};
    struct ggml_context *ctx = ggml_init(params);
    struct ggml_tensor *layer_out = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, N_EMBD, ROWS);
    struct ggml_tensor *other = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, N_EMBD, ROWS);
    ggml_set_name(layer_out, "l_out-1");
    ggml_set_name(other, "attn_norm-1");
    struct ggml_backend_buffer *buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
    if (!buf) return 4;
    int64_t cap = (int64_t)iterations * ROWS;
    float *dst = malloc(sizeof(float) * (size_t)cap * N_EMBD);
    int rc = 0;
    for (int round = 0; round < rounds && rc == 0; round++) {
        /* max_rows below the batch: the callback's own row buffer grows too */
        innsteer_steerer *st = innsteer_steerer_new(N_EMBD, N_LAYER, 8);
        int id = -1;
        if (!st || innsteer_steerer_attach(st, flow, 1.0f, &id, err, sizeof err) != INNSTEER_OK ||
            innsteer_steerer_set_threads(st, 2) != INNSTEER_OK || innsteer_steerer_capture(st, LAYER, false, true) ||
            innsteer_steerer_capture(st, LAYER, true, true)) {
            fprintf(stderr, "steerer setup failed: %s\n", err);
            return 5;
        }
        drive d = {.st = st, .layer_out = layer_out, .other = other, .iterations = iterations};
        pthread_t driver;
        if (pthread_create(&driver, NULL, run_callback, &d) != 0) return 6;
        if (!read_captures(&d, id, dst, cap)) {
            atomic_store(&d.failed, 1);
            rc = 1;
        }
        pthread_join(driver, NULL);
        if (atomic_load(&d.failed)) rc = 1;
        if (rc == 0 && (innsteer_steerer_captured_rows(st, LAYER, false) != cap ||
                        innsteer_steerer_captured_rows(st, LAYER, true) != cap || innsteer_steerer_rows_steered(st) == 0)) {
            fprintf(stderr, "round %d: captured %lld and %lld rows, steered %llu; expected %lld captured\n", round,
                    (long long)innsteer_steerer_captured_rows(st, LAYER, false),
                    (long long)innsteer_steerer_captured_rows(st, LAYER, true),
                    (unsigned long long)innsteer_steerer_rows_steered(st), (long long)cap);
            rc = 1;
        }
        innsteer_steerer_free(st);
    }
    free(dst);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    innsteer_flow_free(flow);
    if (rc == 0) printf("ok\n");
    return rc;
}
