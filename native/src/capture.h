/* Captured rows of l_out-<layer>, before and after steering, appended in evaluation order. The
 * set has its own lock: the eval callback appends (and grows the buffers) while the application
 * reads them from another thread, and a reader never waits for a whole batch to be steered. */
#ifndef INNSTEER_CAPTURE_H
#define INNSTEER_CAPTURE_H

#include "innsteer.h"

typedef struct capture_set capture_set;

/* Layers 0..n_layer-1 of n_embd-wide rows. NULL when out of memory. */
capture_set *capture_set_new(int n_layer, int n_embd);
void capture_set_free(capture_set *c);

/* The functions below take a layer in range (the caller checks). */
void capture_set_enable(capture_set *c, int layer, bool post, bool on);
bool capture_set_enabled(capture_set *c, int layer, bool post);
/* Appends n_rows rows when capturing is on for (layer, post). Out of memory: nothing is appended,
 * INNSTEER_ERR_NOMEM with a message in err. */
innsteer_status capture_set_append(capture_set *c, int layer, bool post, const float *rows, int64_t n_rows, char *err,
                                   size_t err_size);
int64_t capture_set_rows(capture_set *c, int layer, bool post);
/* Copies up to max_rows of the captured rows into dst; returns how many. */
int64_t capture_set_copy(capture_set *c, int layer, bool post, float *dst, int64_t max_rows);
/* Drops the captured rows (keeps the buffers and what is switched on). */
void capture_set_clear(capture_set *c);

#endif
